"""Relevance -> heatmap, the paper's post-processing, and target-map helpers."""
import torch
from torch.nn import functional as F

from .errors import ManipBenchError

_TINY = 1e-12


def heatmap(relevance, signed=False):
    """(N, C, H, W) relevance -> (N, H, W) heatmap.

    Default: sum of |relevance| over channels, normalised to sum 1 per image (the paper).
    ``signed=True``: plain channel sum, no normalisation (total-relevance preservation).
    """
    if signed:
        return relevance.sum(1)
    return normalize(relevance.abs().sum(1))


def normalize(maps):
    """Scale each (H, W) map of a (N, H, W) batch to sum 1."""
    return maps / maps.flatten(1).sum(1).clamp_min(_TINY).view(-1, 1, 1)


def center_of_mass(maps):
    """(N, H, W) non-negative maps -> (N, 2) centre of mass (row, column) in pixels.

    Differentiable; a map without mass gives (0, 0) (callers that need to know check
    the mass themselves).
    """
    height, width = maps.shape[-2:]
    rows = torch.arange(height, dtype=maps.dtype, device=maps.device)
    columns = torch.arange(width, dtype=maps.dtype, device=maps.device)
    total = maps.flatten(1).sum(1).clamp_min(_TINY)
    return torch.stack([(maps.sum(2) * rows).sum(1) / total,
                        (maps.sum(1) * columns).sum(1) / total], dim=1)


def rescale_total(target, reference):
    """Scale each target map so its total equals the reference map's total (paper's extended code)."""
    totals = reference.flatten(1).sum(1) / target.flatten(1).sum(1).clamp_min(_TINY)
    return target * totals.view(-1, 1, 1)


def prepare_target(target_map, batch, size):
    """Check a user's target maps and bring them to shape (N, H, W), float, resized, sum 1."""
    if not isinstance(target_map, torch.Tensor):
        raise ManipBenchError("target_map must be a tensor of shape (N, H, W) or (H, W)")
    if target_map.dim() == 2:
        target_map = target_map.expand(batch, -1, -1)
    if target_map.dim() != 3 or target_map.shape[0] != batch:
        raise ManipBenchError(f"target_map must have shape ({batch}, H, W) to match the images, "
                              f"got {tuple(target_map.shape)}")
    target_map = target_map.float()
    if not torch.isfinite(target_map).all():
        raise ManipBenchError("target_map contains NaN or infinite values")
    if (target_map < 0).any():
        raise ManipBenchError("target_map must be non-negative (a heatmap)")
    if tuple(target_map.shape[1:]) != tuple(size):
        target_map = F.interpolate(target_map[:, None], size=size, mode="area")[:, 0]
    if (target_map.flatten(1).sum(1) <= 0).any():
        raise ManipBenchError("every target map needs some positive mass (an all-zero map was given)")
    return normalize(target_map)
