"""Threat models: how far the attack may move an image, and the projection that enforces it.

A :class:`Budget` is an L-inf or L2 ball around the original image, in [0, 1] pixel units,
or ``none`` (the paper's unconstrained attack). Every attack projects its image onto the
budget's ball and onto [0, 1] after each step, so the returned image lies inside both.
Budgets are written as text wherever a user gives one: ``8/255`` (L-inf),
``linf:8/255``, ``l2:0.5``, ``none``.
"""
import dataclasses
import math
from fractions import Fraction

import torch

from .defaults import DEFAULT_BUDGET
from .errors import ManipBenchError

NORMS = ("linf", "l2", "none")


def parse_number(text, what="budget"):
    """A non-negative number from ``0.03``, ``8/255`` or a number; a clear error otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        try:
            value = float(Fraction(str(text).strip()))
        except (ValueError, ZeroDivisionError):
            raise ManipBenchError(f"{what} must be a number or a fraction such as 8/255, "
                                  f"got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ManipBenchError(f"{what} must be a finite number >= 0, got {text!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Budget:
    """A ball around the original image: ``norm`` (``linf``, ``l2``, ``none``) and radius ``eps``.

    ``eps`` is in [0, 1] pixel units (for L2: the Euclidean norm of the whole change).
    """

    norm: str = "linf"
    eps: float = 8 / 255

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ManipBenchError(f"unknown budget norm {self.norm!r}; use {', '.join(NORMS)}")
        if self.norm == "none":
            object.__setattr__(self, "eps", None)
            return
        eps = parse_number(self.eps)
        if eps <= 0:
            raise ManipBenchError(f"a {self.norm} budget must be positive, got {self.eps!r} "
                                  f"(use 'none' for an unconstrained attack)")
        if self.norm == "linf" and eps > 1:
            raise ManipBenchError(f"an L-inf budget of {eps:g} exceeds the image range [0, 1]; "
                                  f"budgets are in pixel units, e.g. 8/255")
        object.__setattr__(self, "eps", eps)

    @classmethod
    def parse(cls, spec):
        """A budget from ``Budget``, ``None``/``'none'``, a number or ``[norm:]value`` text."""
        if isinstance(spec, Budget):
            return spec
        if spec is None or str(spec).strip().lower() == "none":
            return cls("none")
        if isinstance(spec, dict):
            return cls(spec.get("norm", "linf"), spec.get("eps"))
        norm, _, value = str(spec).strip().rpartition(":")
        return cls(norm.lower() or "linf", parse_number(value))

    @property
    def bounded(self):
        return self.norm != "none"

    def check_image_size(self, x):
        """Refuse an L2 budget larger than any change of an image like ``x`` could be."""
        if self.norm == "l2" and self.eps > math.sqrt(x[0].numel()):
            raise ManipBenchError(f"an L2 budget of {self.eps:g} exceeds the largest possible "
                                  f"change of a {tuple(x.shape[1:])} image in [0, 1] "
                                  f"({math.sqrt(x[0].numel()):.3g})")

    def project(self, x_adv, x):
        """Move ``x_adv`` (in place) into the ball around ``x`` and into [0, 1]; returns it."""
        with torch.no_grad():
            if self.norm == "linf":
                x_adv.copy_(torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps))
            elif self.norm == "l2":
                delta = x_adv - x
                norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
                x_adv.copy_(x + delta * (self.eps / norms.clamp_min(1e-12)).clamp(max=1))
            x_adv.clamp_(0, 1)
        return x_adv

    def size(self, delta):
        """Per-sample size of a change in this budget's norm (L-inf for ``none``)."""
        flat = delta.detach().flatten(1)
        return flat.norm(dim=1) if self.norm == "l2" else flat.abs().amax(dim=1)

    def scale(self, x):
        """The radius in L-inf-like pixel units, for step sizes (``none``: 8/255)."""
        if self.norm == "linf":
            return self.eps
        if self.norm == "l2":
            return self.eps / math.sqrt(x[0].numel())
        return 8 / 255

    def label(self):
        """Short text: ``L∞ 8/255``, ``L2 0.5``, ``none``."""
        if self.norm == "none":
            return "none"
        return f"{'L∞' if self.norm == 'linf' else 'L2'} {format_value(self.eps)}"

    def to_json(self):
        return {"norm": self.norm, "eps": self.eps}


def format_value(value):
    """``8/255`` for multiples of 1/255 (pixel levels), ``0.5`` otherwise."""
    levels = value * 255
    if abs(levels - round(levels)) < 1e-9 and round(levels) > 0:
        return f"{round(levels)}/255"
    return f"{value:g}"


__all__ = ["Budget", "DEFAULT_BUDGET", "NORMS", "format_value", "parse_number"]
