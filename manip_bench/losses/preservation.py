"""Constraints that keep what should not change: the network output, the total relevance."""
from ..attributors.base import total_relevance
from ..errors import ManipBenchError
from . import Loss, register


@register
class OutputPreservation(Loss):
    """``mean((f(g(x_adv)) - f(g(x)))^2)`` over classes, f = softmax (default) or identity."""

    name = "output"

    def __init__(self, weight=None, output="softmax"):
        super().__init__(weight)
        if output not in ("softmax", "logits"):
            raise ManipBenchError(f"output must be 'softmax' or 'logits', got {output!r}")
        self.output = output

    def _transform(self, logits):
        return logits.softmax(1) if self.output == "softmax" else logits

    def value(self, current, reference):
        return (self._transform(current.output) - self._transform(reference.output)
                ).square().mean(1)

    def options(self):
        return {"output": self.output}


@register
class TotalRelevance(Loss):
    """``(sum R(x_adv) - sum R(x))^2``: the paper's extended code keeps the total relevance."""

    name = "total_relevance"

    def value(self, current, reference):
        return (total_relevance(current.relevance) - total_relevance(reference.relevance)
                ).square()
