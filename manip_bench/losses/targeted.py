"""The paper's targeted loss: mean squared distance of the heatmap to a target map."""
from . import Loss, register


@register
class TargetMap(Loss):
    """``mean((h(x_adv) - h_target)^2)`` over pixels (Dombrowski et al. 2019, eq. 4)."""

    name = "target_map"
    explanation = True
    needs_target = True
    relative_weight = 1e5  # the paper's ratio (1e11 / 1e6, 1e7 / 1e2)

    def value(self, current, reference):
        return (current.heatmap - reference.target_map).square().flatten(1).mean(1)
