"""Attack losses: small objects that score one explanation against the clean one.

A loss is called as ``loss(current, reference)`` and returns one value per sample (N,);
the attack minimises the sum of its losses, each already multiplied by its ``weight``
inside :meth:`Loss.weighted`. ``current`` and ``reference`` are :class:`Explanation`
objects (output logits, relevance, heatmap); the reference also carries the target map
of a targeted attack. Families live in their own files:

- :mod:`.targeted`: the paper's heatmap MSE toward a target map;
- :mod:`.preservation`: keep the network output, keep the total relevance;
- :mod:`.untargeted`: Ghorbani et al. (2019): top-k and center-of-mass attacks.

New losses register with :func:`register` and are then available by name.
"""
import dataclasses

import torch

from .. import plugins
from ..errors import ManipBenchError, unknown_name


@dataclasses.dataclass
class Explanation:
    """One explanation of a batch: ``output`` logits (N, K), ``relevance`` (N, C, H, W), ``heatmap`` (N, H, W)."""

    output: torch.Tensor
    relevance: torch.Tensor
    heatmap: torch.Tensor


@dataclasses.dataclass
class Reference(Explanation):
    """The clean images' explanation, plus ``target_map`` (N, H, W) for targeted attacks."""

    target_map: torch.Tensor = None


class Loss:
    """Base class: ``weight * value(current, reference)`` per sample.

    Subclasses set ``name`` and implement :meth:`value`. ``explanation`` marks losses
    that move the explanation (the attack's objective) rather than constrain it;
    ``needs_target`` marks losses that steer toward a target map.
    """

    name = ""
    explanation = False
    needs_target = False
    #: default weight relative to the output-preservation term (weight 1)
    relative_weight = 1.0

    def __init__(self, weight=None):
        self.weight = self.relative_weight if weight is None else float(weight)
        if not self.weight >= 0:
            raise ManipBenchError(f"loss {self.name}: weight must be >= 0, got {weight!r}")

    def value(self, current, reference):
        """Unweighted per-sample loss, shape (N,)."""
        raise NotImplementedError

    def __call__(self, current, reference):
        return self.weight * self.value(current, reference)

    def options(self):
        """Settings other than the weight (for results files)."""
        return {}

    def to_json(self):
        return {"name": self.name, "weight": self.weight, **self.options()}

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.to_json().items() if k != "name")
        return f"{type(self).__name__}({settings})"


LOSSES = {}


def register(cls):
    """Class decorator: make a :class:`Loss` subclass available by its ``name``."""
    LOSSES[cls.name] = cls
    return cls


def get_class(name):
    """The loss class registered as ``name`` (a clear error with a close match otherwise)."""
    plugins.load()
    if name not in LOSSES:
        raise unknown_name("loss", name, LOSSES)
    return LOSSES[name]


def available(explanation_only=False):
    """Sorted names of the registered losses (``explanation_only``: the attack objectives)."""
    plugins.load()
    return sorted(n for n, c in LOSSES.items() if c.explanation or not explanation_only)


def create(name, **options):
    """An instance of the loss registered as ``name``."""
    cls = get_class(name)
    try:
        return cls(**options)
    except TypeError as error:
        raise ManipBenchError(f"loss {name}: {error}") from error


from . import preservation, targeted, untargeted  # noqa: E402,F401  (they register themselves)
from .preservation import OutputPreservation, TotalRelevance  # noqa: E402
from .targeted import TargetMap  # noqa: E402
from .untargeted import CenterOfMass, TopK, center_of_mass  # noqa: E402

__all__ = ["CenterOfMass", "Explanation", "LOSSES", "Loss", "OutputPreservation", "Reference",
           "TargetMap", "TopK", "TotalRelevance", "available", "center_of_mass", "create",
           "get_class", "register"]
