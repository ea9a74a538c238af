"""Figures of the level-set geometry (:mod:`manip_bench.geometry`).

Every function builds a ``matplotlib.figure.Figure`` (no pyplot, no backend selection)
and saves it with ``fig.savefig``; matplotlib is imported only when a figure is drawn.
"""
from pathlib import Path

import numpy as np

#: betas of the toy figure's softplus panels (ReLU is drawn first)
TOY_BETAS = (1.0, 3.0, 10.0)


def _figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path, dpi=130):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def curvature_vs_beta_figure(betas, values, path, labels=None, title=None):
    """|principal curvature| against beta, log-log.

    Parameters
    ----------
    betas : sequence of float
        (B,) softplus betas.
    values : array_like
        (N, B, k) signed curvatures: N images, B betas, top-k each (largest first).
    labels : list of str, optional
        Image names. One image: its top-k curvatures, one line each. Several images:
        each image's ``|lambda_max|`` (thin) and their median (thick).
    """
    betas = np.asarray(betas, dtype=float)
    values = np.abs(np.asarray(values, dtype=float))
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot()
    if values.shape[0] == 1:
        for j in range(values.shape[2]):
            ax.plot(betas, values[0, :, j], marker="o", lw=2 if j == 0 else 1,
                    label=r"$|\lambda_{%d}|$" % (j + 1))
        reference = values[0, :, 0]
    else:
        for i in range(values.shape[0]):
            ax.plot(betas, values[i, :, 0], color="0.6", lw=0.8, alpha=0.8,
                    label="per image" if i == 0 else None)
        reference = np.median(values[:, :, 0], axis=0)
        ax.plot(betas, reference, color="C3", lw=2.5, marker="o",
                label=r"median $|\lambda_{max}|$ (%d images)" % values.shape[0])
    anchor = reference[0] / betas[0]
    ax.plot(betas, anchor * betas, color="k", ls="--", lw=1, label=r"$\propto \beta$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"softplus $\beta$")
    ax.set_ylabel("|principal curvature| of the logit's level set")
    ax.set_title(title or r"curvature vs $\beta$", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def trajectory_figure(attack_path, level_set_path, path, title=None):
    """Theorem 1 along attack paths, per path and per step.

    ``attack_path`` and ``level_set_path`` are :func:`manip_bench.geometry.trajectory_bound`
    results (the attack's paths, and the same paths moved onto the level set through
    their start). Left: the ratio |h(x_T) - h(x_0)| / (lambda_max * length) of each pair
    on both paths (the bound holds below 1). Right: the same ratio for every single step
    of every path (``step_ratio``), as histograms.
    """
    fig = _figure(11.5, 4.3)
    left, right = fig.subplots(1, 2)
    n = len(attack_path["ratio"])
    order = np.argsort(attack_path["ratio"])
    pairs = np.arange(n)
    left.scatter(pairs, np.asarray(attack_path["ratio"])[order], color="C3", label="attack path")
    left.scatter(pairs, np.asarray(level_set_path["ratio"])[order], color="C0", marker="s",
                 s=18, label="the same path moved onto the level set")
    left.axhline(1.0, color="k", ls="--", lw=1, label="Theorem 1's bound")
    left.set_yscale("log")
    left.set_xlabel("pair (sorted by the attack path's ratio)")
    left.set_ylabel(r"$|h(x_T) - h(x_0)|\ /\ (|\lambda_{max}|\ L)$")
    left.set_title("Theorem 1 ratio per pair", fontsize=10)
    left.legend(fontsize=8)
    for label, result, color in (("attack paths", attack_path, "C3"),
                                 ("moved onto the level set", level_set_path, "C0")):
        ratios = np.concatenate([np.asarray(r, dtype=float) for r in result["step_ratio"]])
        ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
        over = np.mean(ratios > 1)
        bins = np.logspace(np.log10(ratios.min()), np.log10(max(ratios.max(), 1.01)), 40)
        right.hist(ratios, bins=bins, histtype="step", lw=1.5, color=color,
                   label=f"{label} ({over:.1%} of steps > 1)")
    right.axvline(1.0, color="k", ls="--", lw=1)
    right.set_xscale("log")
    right.set_xlabel(r"per step: $|h(x_{t+1}) - h(x_t)|\ /\ (|\lambda_{max}|\ |x_{t+1} - x_t|)$")
    right.set_ylabel("steps (all pairs)")
    right.set_title("the same test step by step", fontsize=10)
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def curvature_pcc_figure(lambda_max, pcc, path, rho=None, p=None, beta=None):
    """Per-image ``|lambda_max|`` at the original image against the target PCC reached."""
    fig = _figure(5.2, 4.2)
    ax = fig.add_subplot()
    ax.scatter(lambda_max, pcc, color="C0")
    ax.set_xscale("log")
    ax.set_xlabel(r"$|\lambda_{max}|$ at the original image"
                  + ("" if beta is None else r" ($\beta$ = %g)" % beta))
    ax.set_ylabel("target PCC the attack reaches")
    if rho is not None:
        ax.set_title(f"Spearman rho = {rho:.2f} (p = {p:.2g}, n = {len(pcc)})", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def toy_figure(fields, path, title=None):
    """The paper's intuition: equipotential lines and the unit-normal field of a 2-D network.

    ``fields`` is a list of ``(label, (xs, ys, g, h))`` with the tuples of
    :func:`manip_bench.geometry.normal_field`, drawn side by side.
    """
    fig = _figure(3.3 * len(fields), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(fields)))
    for ax, (label, (xs, ys, g, h)) in zip(axes, fields):
        ax.contour(xs, ys, g, levels=14, cmap="viridis", linewidths=1)
        step = max(1, len(xs) // 14)
        xx, yy = np.meshgrid(xs[::step], ys[::step])
        ax.quiver(xx, yy, h[::step, ::step, 0], h[::step, ::step, 1], color="C3",
                  scale=22, width=0.004)
        ax.set_title(label, fontsize=10)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi=90)


def toy_fields(betas=TOY_BETAS, hidden=8, seed=0, resolution=41):
    """The fields of :func:`toy_figure`: ReLU, then Softplus(beta) for each beta."""
    from . import geometry
    net = geometry.toy_network(hidden, seed)
    fields = [("ReLU", geometry.normal_field(net, None, resolution=resolution))]
    fields += [(r"softplus, $\beta$ = %g" % beta,
                geometry.normal_field(net, beta, resolution=resolution)) for beta in betas]
    return fields


__all__ = ["TOY_BETAS", "curvature_pcc_figure", "curvature_vs_beta_figure", "toy_fields",
           "toy_figure", "trajectory_figure"]
