"""Registry of differentiable attributors: ``available()`` and ``create(name, model, **options)``.

Every attributor is called as ``output, relevance = explain(x, target)``; the relevance
is differentiable in ``x`` (see :mod:`manip_bench.attributors.base`).
"""
import inspect

from .. import plugins
from ..errors import ManipBenchError, unknown_name
from . import cam, captum, pattern, transformer_lrp, zennit
from .base import Attributor, SmoothReLU, conservation_gap, prepare_model, total_relevance

_CLASSES = (
    captum.Saliency, captum.InputXGradient, captum.IntegratedGradients, captum.SmoothGrad,
    captum.GradientShap, captum.GuidedBackprop, captum.Deconvolution, captum.DeepLift,
    zennit.CaptumLRP, zennit.EpsilonLRP, zennit.EpsilonPlusFlatLRP, zennit.EpsilonPlusLRP,
    zennit.Alpha2Beta1LRP, zennit.EpsilonGammaBoxLRP, zennit.GammaPerBlockLRP, zennit.PaperLRP,
    pattern.PatternAttribution, transformer_lrp.AttnLRP, transformer_lrp.CPLRP, *cam.CLASSES,
)
REGISTRY = {cls.name: cls for cls in _CLASSES}

#: named groups of registry names, for grids and the CLI
#: (ScoreCAM, one forward pass per channel, is left out of the groups: too slow for grids)
_GROUPED = {n: c for n, c in REGISTRY.items() if c.in_default_groups}
GROUPS = {
    "gradient": [n for n, c in _GROUPED.items() if c.needs_softplus and c.attackable
                 and not issubclass(c, cam.CamAttributor)],
    "lrp": [n for n, c in _GROUPED.items() if issubclass(c, zennit.ZennitAttributor)],
    "cam": [n for n, c in _GROUPED.items() if issubclass(c, cam.CamAttributor) and c.attackable],
    # methods that explain one architecture only (``cls.architecture``), not in "all"
    "transformer": [n for n, c in _GROUPED.items() if c.architecture],
}
GROUPS["all"] = sorted(n for n, c in _GROUPED.items() if c.attackable and not c.architecture)


def register(cls):
    """Class decorator: add an :class:`Attributor` subclass to the registry as ``cls.name``.

    Third-party packages call it from a module named by a ``manip_bench.plugins`` entry
    point (:mod:`manip_bench.plugins`). Its group membership follows its facts: attackable
    classes join ``all``, attackable ``needs_softplus`` ones also ``gradient``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Attributor)) or not cls.name:
        raise ManipBenchError(f"register() takes an Attributor subclass with a name, got {cls!r}")
    REGISTRY[cls.name] = cls
    if cls.attackable and not cls.architecture:
        GROUPS["all"] = sorted({*GROUPS["all"], cls.name})
        if cls.needs_softplus:
            GROUPS["gradient"] = sorted({*GROUPS["gradient"], cls.name})
    return cls


def available():
    """Sorted list of registry names (built-in and from installed plugins)."""
    plugins.load()
    return sorted(REGISTRY)


def get_class(name):
    """The attributor class registered as ``name`` (clear error with a close match if unknown)."""
    plugins.load()
    if name not in REGISTRY:
        raise unknown_name("attributor", name, REGISTRY)
    return REGISTRY[name]


def options(name):
    """Keyword options ``create(name, model, ...)`` accepts, with their defaults."""
    signature = inspect.signature(get_class(name).__init__)
    return {key: p.default for key, p in signature.parameters.items()
            if key not in ("self", "model") and p.kind is p.POSITIONAL_OR_KEYWORD}


def create(name, model, **opts):
    """Build the attributor ``name`` on a private copy of ``model``.

    For the beta-smoothing defence pass the smoothed model
    (:func:`manip_bench.defences.beta_smooth`).
    """
    cls = get_class(name)
    accepted = options(name)
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise ManipBenchError(f"{name} does not take option(s) {', '.join(unknown)}; "
                              f"it takes: {', '.join(accepted) or 'none'}")
    return cls(model, **opts)


def describe():
    """One row per attributor: name, library, rule, needs softplus, attackable."""
    plugins.load()
    return [
        {"name": n, "library": c.library, "rule": c.rule, "needs_softplus": c.needs_softplus,
         "attackable": c.attackable}
        for n, c in sorted(REGISTRY.items())
    ]


__all__ = ["Attributor", "GROUPS", "REGISTRY", "SmoothReLU", "available", "conservation_gap",
           "create", "describe", "get_class", "options", "prepare_model", "register",
           "total_relevance"]
