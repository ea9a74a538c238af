"""A third-party manip-bench plugin, as a user's package would ship it (used by tests)."""
import torch
from torch import nn

from manip_bench import attributors, models
from manip_bench.attributors.base import Attributor, input_with_grad, one_hot


@attributors.register
class GradientSquared(Attributor):
    """The squared input gradient of the target logit (softplus during attacks)."""

    name, library, rule = "demo.gradient_squared", "demo", "(d logit / dx)^2"
    needs_softplus = True

    def attribute(self, x, target):
        x = input_with_grad(x)
        with torch.enable_grad():
            output = self.model(x)
            (gradient,) = torch.autograd.grad(output, x, one_hot(target, output),
                                              create_graph=True)
        return output, gradient.square()


@models.register("demo_tiny", input_size=32, classes=[f"class {i}" for i in range(4)])
def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 4)).eval()
