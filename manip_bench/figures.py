"""Figures for one attack: images, their explanations on the user's network, the loss curve.

Figures are ``matplotlib.figure.Figure`` objects saved with ``savefig`` (no pyplot), so no
backend is selected and matplotlib is imported only when a figure is drawn.
"""


def _image(ax, tensor, title):
    ax.imshow(tensor.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _map(ax, tensor, title):
    ax.imshow(tensor.detach().cpu().numpy(), cmap="inferno")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def overview_figure(result, path, index=0, target_image=None):
    """Save original / manipulated / target with their maps, plus the loss curve, as PNG."""
    from matplotlib.figure import Figure
    columns = 4
    fig = Figure(figsize=(3 * columns, 6))
    axes = fig.subplots(2, columns)
    summary = {key: values[index] for key, values in result.metrics.items()}
    _image(axes[0, 0], result.x[index], "original")
    _image(axes[0, 1], result.x_adv[index],
           f"manipulated (SSIM {summary['input_ssim']:.3f})")
    if target_image is not None:
        _image(axes[0, 2], target_image, "target image")
    else:
        axes[0, 2].axis("off")
    _map(axes[1, 0], result.original_map[index], "original explanation")
    if result.target_map is not None:
        _map(axes[1, 1], result.adversarial_map[index],
             f"manipulated explanation (PCC {summary['expl_target_pcc']:.3f})")
        _map(axes[1, 2], result.target_map[index], "target explanation")
    else:
        _map(axes[1, 1], result.adversarial_map[index],
             f"manipulated explanation (top-k kept {summary['expl_original_topk']:.2f})")
        axes[1, 2].axis("off")
    axes[0, 3].axis("off")
    axes[0, 3].text(0, 0.5, "\n".join([
        result.attributor,
        f"iterations: {result.iterations}",
        f"class kept: {summary['class_kept']}",
        f"budget: {result.budget.label()}",
        f"L-inf: {summary['input_linf'] * 255:.1f}/255",
        f"output MSE: {summary['output_mse']:.2e}",
    ]), fontsize=9, va="center")
    ax = axes[1, 3]
    for key, values in result.history.items():
        if key != "beta" and any(values):
            ax.semilogy([abs(v) for v in values], label=key)
    ax.set_xlabel("iteration")
    ax.set_title("loss (batch mean, attacked network)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
