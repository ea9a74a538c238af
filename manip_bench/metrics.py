"""Similarity of heatmaps, images and outputs, per sample.

SSIM comes from scikit-image, Pearson and Spearman correlation from SciPy (both imported
on first use: ``scipy.stats`` alone costs ~55 MB and a second of start-up).
Every function takes batched tensors and returns ``{metric: list of floats}``.
"""
import math

import numpy as np
import torch

from .heatmaps import center_of_mass


def _numpy(tensor):
    return tensor.detach().to("cpu", torch.float64).numpy()


def _correlation(fn, a, b):
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # undefined for a constant map
    return float(fn(a.ravel(), b.ravel())[0])


def pcc(a, b):
    """Pearson correlation of two arrays (NaN if either is constant)."""
    from scipy.stats import pearsonr
    return _correlation(pearsonr, a, b)


def spearman(a, b):
    """Spearman rank correlation of two arrays (NaN if either is constant)."""
    from scipy.stats import spearmanr
    return _correlation(spearmanr, a, b)


def ssim(a, b, channel_axis=None, data_range=None):
    """Structural similarity (scikit-image); the data range defaults to that of both arrays."""
    if data_range is None:
        data_range = max(a.max(), b.max()) - min(a.min(), b.min())
    if data_range == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    side = min(a.shape[-2:])
    win_size = min(7, side if side % 2 else side - 1)
    from skimage.metrics import structural_similarity
    return float(structural_similarity(a, b, data_range=data_range, channel_axis=channel_axis,
                                       win_size=win_size))


def top_k_intersection(a, b, fraction=0.05):
    """Fraction of the top-k pixels of ``b`` that are also among the top-k of ``a`` (Ghorbani et al.)."""
    k = max(1, math.ceil(fraction * a.size))
    top_a = set(np.argpartition(-a.ravel(), k - 1)[:k].tolist())
    top_b = set(np.argpartition(-b.ravel(), k - 1)[:k].tolist())
    return len(top_a & top_b) / k


def map_similarity(maps, reference, top_k_fraction=0.05):
    """Per-sample similarity of (N, H, W) heatmaps to reference maps.

    MSE, SSIM, PCC, Spearman rank correlation, top-k intersection (Ghorbani et al.) and
    ``com_shift``, the distance between the two maps' centres of mass in pixels.
    """
    result = {"mse": [], "ssim": [], "pcc": [], "topk": [], "spearman": []}
    for a, b in zip(_numpy(maps), _numpy(reference)):
        result["mse"].append(float(np.mean((a - b) ** 2)))
        result["ssim"].append(ssim(a, b))
        result["pcc"].append(pcc(a, b))
        result["topk"].append(top_k_intersection(a, b, top_k_fraction))
        result["spearman"].append(spearman(a, b))
    result["com_shift"] = com_shift(maps, reference)
    return result


def com_shift(maps, reference):
    """Per-sample distance in pixels between the centres of mass of |maps| and |reference|
    (NaN where either map has no mass)."""
    maps, reference = (m.detach().to("cpu", torch.float64).abs() for m in (maps, reference))
    shift = (center_of_mass(maps) - center_of_mass(reference)).norm(dim=1)
    empty = (maps.flatten(1).sum(1) == 0) | (reference.flatten(1).sum(1) == 0)
    return shift.masked_fill(empty, math.nan).tolist()


def image_similarity(images, reference):
    """Per-sample MSE, SSIM, PCC, L-inf and L2 between (N, C, H, W) images in [0, 1]."""
    result = {"mse": [], "ssim": [], "pcc": [], "linf": [], "l2": []}
    for a, b in zip(_numpy(images), _numpy(reference)):
        result["mse"].append(float(np.mean((a - b) ** 2)))
        result["ssim"].append(ssim(a, b, channel_axis=0, data_range=1.0))
        result["pcc"].append(pcc(a, b))
        result["linf"].append(float(np.abs(a - b).max()))
        result["l2"].append(float(np.sqrt(((a - b) ** 2).sum())))
    return result


def output_similarity(outputs, reference):
    """Per-sample output MSE (softmax), top-1 class kept, and the original class's probability."""
    probs, ref_probs = outputs.detach().softmax(1), reference.detach().softmax(1)
    original = ref_probs.argmax(1)
    return {
        "output_mse": ((probs - ref_probs) ** 2).mean(1).tolist(),
        "class_kept": (probs.argmax(1) == original).tolist(),
        "prob_before": ref_probs.gather(1, original[:, None])[:, 0].tolist(),
        "prob_after": probs.gather(1, original[:, None])[:, 0].tolist(),
    }


@torch.no_grad()
def deletion_curve(model, images, heatmaps, target, steps=16, baseline=0.0):
    """Pixel flipping (Samek et al. 2017; "deletion", Petsiuk et al. 2018): the
    probability of class ``target`` as the most relevant pixels are removed first.

    ``heatmaps`` (N, H, W) ranks the pixels; after step k of ``steps`` the top k/steps of
    them hold ``baseline`` in every channel (ties broken by position). Returns (N, steps+1),
    column 0 being the intact image. A faithful map makes the curve fall fast.
    """
    n, _, height, width = images.shape
    order = heatmaps.reshape(n, -1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(height * width, device=order.device).expand(n, -1))
    rank = rank.reshape(n, 1, height, width)
    curve = []
    for k in range(steps + 1):
        removed = rank < round(k * height * width / steps)
        perturbed = torch.where(removed, torch.as_tensor(baseline, dtype=images.dtype), images)
        probs = torch.softmax(model(perturbed), dim=1)
        curve.append(probs.gather(1, target.view(-1, 1))[:, 0])
    return torch.stack(curve, dim=1)


def deletion_score(model, images, heatmaps, target, steps=16, baseline=0.0):
    """Area under :func:`deletion_curve` over the fraction removed (0 to 1), per sample;
    lower means the map finds the pixels the class depends on."""
    curve = deletion_curve(model, images, heatmaps, target, steps, baseline).cpu().double()
    return np.trapezoid(curve.numpy(), dx=1.0 / steps, axis=1).tolist()


def deletion_gap(model, images, heatmaps, target, steps=16, baseline=0.0):
    """Faithfulness as the area between the two pixel-flipping curves: least relevant
    pixels removed first minus most relevant first, per sample (higher: more faithful;
    a random ranking gives about 0). Taking the difference cancels most of what removal
    itself does to the network (removed pixels are unlike any training image), which
    on its own makes a random ranking look as good as any map."""
    most = deletion_score(model, images, heatmaps, target, steps, baseline)
    least = deletion_score(model, images, -heatmaps, target, steps, baseline)
    return [lerf - morf for lerf, morf in zip(least, most)]


def prefixed(prefix, values):
    """``{'mse': ...}`` -> ``{'prefix_mse': ...}``."""
    return {f"{prefix}_{key}": value for key, value in values.items()}


def summarize(per_sample):
    """Median of each per-sample metric (NaNs ignored; booleans as the fraction true)."""
    summary = {}
    for key, values in per_sample.items():
        array = np.asarray(values, dtype=float)
        fraction = key == "class_kept" or all(isinstance(v, (bool, np.bool_)) for v in values)
        summary[key] = float(array.mean()) if fraction else float(np.nanmedian(array))
    return summary
