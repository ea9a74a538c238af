"""Untargeted attacks of Ghorbani et al. (2019): no target map, only away from the original.

Both assume heatmaps that are non-negative and sum to one (the default post-processing).
"""
import torch

from ..errors import ManipBenchError
from ..heatmaps import center_of_mass
from . import Loss, register


def top_k_mask(maps, fraction):
    """(N, H, W) boolean mask of each map's ``fraction`` largest pixels (at least one)."""
    flat = maps.flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.topk(k, dim=1).indices, True)
    return mask.view_as(maps)


@register
class TopK(Loss):
    """Mass of the heatmap on the original map's top-k pixels (lower: the important pixels change)."""

    name = "topk"
    explanation = True

    def __init__(self, weight=None, fraction=0.05):
        super().__init__(weight)
        if not 0 < fraction < 1:
            raise ManipBenchError(f"topk fraction must be in (0, 1), got {fraction!r}")
        self.fraction = float(fraction)
        self._mask = None

    def value(self, current, reference):
        if self._mask is None or self._mask[0] is not reference.heatmap:
            self._mask = (reference.heatmap, top_k_mask(reference.heatmap.detach(), self.fraction))
        return (current.heatmap * self._mask[1]).flatten(1).sum(1)

    def options(self):
        return {"fraction": self.fraction}


@register
class CenterOfMass(Loss):
    """Minus the shift of the heatmap's centre of mass, measured along a fixed direction.

    The distance itself has no gradient where the attack starts (zero shift), so the
    shift is projected on the unit vector from the original centre toward the image
    corner farthest from it: the direction with the most room to move.
    """

    name = "center_of_mass"
    explanation = True
    relative_weight = 0.01

    def value(self, current, reference):
        start = center_of_mass(reference.heatmap.detach())
        height, width = reference.heatmap.shape[-2:]
        corners = torch.tensor([[0, 0], [0, width - 1], [height - 1, 0], [height - 1, width - 1]],
                               dtype=start.dtype, device=start.device)
        offsets = corners[None] - start[:, None]  # (N, 4, 2)
        far = offsets.norm(dim=2).argmax(1)
        direction = offsets[torch.arange(len(far)), far]
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return -((center_of_mass(current.heatmap) - start) * direction).sum(1)
