"""Defences as model transforms: the paper's beta-smoothing for every explanation method.

``beta_smooth(model, beta)`` returns a private copy of ``model`` whose every ReLU --
``nn.ReLU`` modules and ``F.relu``/``torch.relu``/``Tensor.relu`` calls in ``forward`` --
computes Softplus(beta) (Dombrowski et al. 2019, Sec. 4: the explanation of the smoothed
network is the defence). The other activation families get their beta version of equal
peak curvature beta / 4 (:mod:`manip_bench.attributors.activations`): leaky ReLU, ReLU6,
hardswish and the rest of the piecewise-linear ones are built from softplus, SiLU and GELU
get a temperature (``x sigmoid(beta x / 2)``, ``x Phi(0.313 beta x)``; the original
network is beta = 2 for SiLU, 3.19 for GELU). ELU, Mish, tanh and other smooth activations
are left as they are. Anything that takes a model takes the smoothed one: attributors
(gradients, LRP rules, PatternAttribution alike; the rules then run on the softplus
network's activations), the attack (which attacks and judges that network as it is, with
no surrogate), the bench and the robustness check::

    from manip_bench import attributors, defences
    smoothed = defences.beta_smooth(model, 2.0)
    explain = attributors.create("zennit.epsilon", smoothed)

The training-time defence, :class:`FineTuned` (``"finetuned=cifar_vgg_robust"``), swaps the
model for weights fine-tuned against manipulation (a zoo model of the same architecture).

A defence is also named by a short text, its ``spec`` (``"beta=2"``), which bench rows
record (``"defence"``) and :func:`parse` reads back. LRP on a softplus network no longer
conserves relevance (softplus(0) > 0); every attack result reports the
``relevance_conservation`` it gets.
"""
import math

from .attributors.activations import (FUNCTIONAL_RELU, SMOOTHING_ATTRIBUTE,
                                     FunctionalActivations, SmoothReLU, functional_relu_of)
from .attributors.base import prepare_model
from .errors import ManipBenchError



class Defence:
    """A defence: ``defence(model)`` is the network the explanation is computed on.

    Subclasses set ``kind`` and ``value`` (the text after ``kind=`` in the spec) and keep
    their parameters as attributes; defences of one class with equal attributes are equal.
    """

    kind = ""

    @property
    def spec(self):
        """Short text that names the defence in results (``parse(spec)`` gives it back)."""
        return f"{self.kind}={self.value}"

    def classifier(self, model, defended):
        """The network that classifies under this defence, given the user's ``model`` and
        ``defended`` = ``self(model)``: by default the user's own (only the explanation
        comes from the defended network)."""
        return model

    def _identity(self):
        return type(self), tuple(sorted(vars(self).items()))

    def __eq__(self, other):
        return isinstance(other, Defence) and other._identity() == self._identity()

    def __hash__(self):
        return hash(self._identity())

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(repr(v) for v in vars(self).values())})"


class BetaSmoothing(Defence):
    """The beta-smoothing defence: ``BetaSmoothing(beta)(model)`` is the Softplus(beta) copy."""

    kind = "beta"

    def __init__(self, beta):
        try:
            beta = float(beta)
        except (TypeError, ValueError):
            raise ManipBenchError(f"beta must be a positive number, got {beta!r}") from None
        if not (beta > 0 and math.isfinite(beta)):
            raise ManipBenchError(f"beta must be a positive number, got {beta!r}")
        self.beta = beta

    @property
    def value(self):
        return f"{self.beta:g}"

    def label(self):
        """Short label for tables (``β=2``)."""
        return f"β={self.beta:g}"

    def describe(self):
        """What it is, for a sentence (``β-smoothed (β=2)``)."""
        return f"β-smoothed ({self.label()})"

    def __call__(self, model):
        if smoothing_of(model) is not None:
            raise ManipBenchError(f"the model is already beta-smoothed (beta="
                                  f"{smoothing_of(model):g}); smooth the original model instead")
        smoothed = prepare_model(model, swap_relu=True)
        for module in smoothed.modules():
            if isinstance(module, SmoothReLU):
                module.smoothing = self.beta
        has_modules = any(isinstance(m, SmoothReLU) for m in smoothed.modules())
        # F.relu calls inside forward go through one more SmoothReLU, a plain attribute:
        # copies of the smoothed model (an attributor's) carry their own, and it is not a
        # submodule, which nn.Sequential (or a forward looping over children) would run
        smoothed.__dict__[FUNCTIONAL_RELU] = SmoothReLU(smoothing=self.beta)
        smoothed.register_forward_pre_hook(_enter_functional)
        smoothed.register_forward_hook(_ExitFunctional(has_modules, type(model).__name__),
                                       always_call=True)
        setattr(smoothed, SMOOTHING_ATTRIBUTE, self.beta)
        return smoothed


class FineTuned(Defence):
    """The training-time defence: the zoo model ``name`` (fine-tuned with a curvature
    penalty, e.g. ``cifar_vgg_robust``) replaces the given model, on the same device.

    Both explanation and classification come from the fine-tuned network. The given model
    must have the same architecture (class and parameter shapes); it is not changed.
    """

    kind = "finetuned"

    def __init__(self, name):
        from . import models
        name = str(name).strip()
        if name not in models.available():
            raise ManipBenchError(f"finetuned={name}: no such zoo model; available: "
                                  f"{', '.join(models.available())}")
        self.name = name

    @property
    def value(self):
        return self.name

    def label(self):
        return f"fine-tuned ({self.name})"

    def describe(self):
        return f"replaced by the fine-tuned {self.name}"

    def __call__(self, model):
        from . import models
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else "cpu"
        tuned = models.load(self.name, device=device)
        given = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if type(tuned) is not type(model) or \
                given != {k: tuple(v.shape) for k, v in tuned.state_dict().items()}:
            raise ManipBenchError(f"finetuned={self.name} is a {type(tuned).__name__} of another "
                                  f"shape than the given {type(model).__name__}; fine-tuned "
                                  "weights replace a model of the same architecture")
        return tuned

    def classifier(self, model, defended):
        """The fine-tuned network classifies too."""
        return defended


#: the defences by the kind their spec starts with
KINDS = {BetaSmoothing.kind: BetaSmoothing, FineTuned.kind: FineTuned}

_MODES = "_manip_bench_modes"


def _enter_functional(module, args):
    """Forward pre-hook of a smoothed copy: route its F.relu calls through its SmoothReLU."""
    mode = FunctionalActivations(functional_relu_of(module))
    mode.__enter__()
    module.__dict__.setdefault(_MODES, []).append(mode)


class _ExitFunctional:
    """Forward hook (always called): leave the mode; refuse a model it does not change."""

    def __init__(self, has_modules, name):
        self.has_modules, self.name = has_modules, name

    def __call__(self, module, args, output):
        mode = module.__dict__[_MODES].pop()
        mode.__exit__(None, None, None)
        if not self.has_modules and mode.smoothed == 0 and output is not None:
            raise ManipBenchError(f"{self.name} has no activation that beta-smoothing changes "
                                  "(ReLU and the other piecewise-linear ones, SiLU, GELU)")


def positive_numbers(values, what="betas", allow_empty=False):
    """Positive finite floats from numbers or a comma-separated string (betas, noise levels)."""
    if isinstance(values, str):
        values = [value for value in values.split(",") if value.strip()]
    try:
        numbers = [float(value) for value in values]
    except (TypeError, ValueError):
        raise ManipBenchError(f"{what} must be numbers, e.g. 1,2,5; got {values!r}") from None
    if (not numbers and not allow_empty) or \
            any(not value > 0 or not math.isfinite(value) for value in numbers):
        raise ManipBenchError(f"{what} must be positive finite numbers, got {values!r}")
    return numbers


def beta_smooth(model, beta):
    """The Softplus(``beta``) copy of ``model`` (the paper's defence); ``model`` is untouched."""
    return BetaSmoothing(beta)(model)


def smoothing_of(model):
    """The beta of a model made by :func:`beta_smooth`, else None."""
    return getattr(model, SMOOTHING_ATTRIBUTE, None)


def parse(spec):
    """The defence named by ``spec`` (``"beta=2"``, ``"finetuned=cifar_vgg_robust"``;
    ``None``/``"none"``: no defence)."""
    if spec is None or isinstance(spec, Defence):
        return spec
    text = str(spec).strip()
    if text.lower() in ("", "none"):
        return None
    kind, _, value = text.partition("=")
    if kind.strip() not in KINDS or not value.strip():
        raise ManipBenchError(f"unknown defence {spec!r}; write beta=<positive number> "
                              "(e.g. beta=2) or finetuned=<zoo model> (e.g. "
                              "finetuned=cifar_vgg_robust)")
    return KINDS[kind.strip()](value)


def apply(spec, model):
    """``model`` under the defence ``spec`` (unchanged when it names none)."""
    defence = parse(spec)
    return model if defence is None else defence(model)


def spec_of(defence):
    """The text that names ``defence`` in results (None for no defence)."""
    defence = parse(defence)
    return None if defence is None else defence.spec


__all__ = ["BetaSmoothing", "Defence", "FineTuned", "KINDS", "apply", "beta_smooth", "parse", "positive_numbers", "smoothing_of",
           "spec_of"]
