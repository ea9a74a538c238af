"""How manipulable are an existing pipeline's explanations? One call: recognise, attack, report.

:func:`check_robustness` takes what a user already has -- a Captum attribution object, a
Zennit composite plus the model, or a registry name plus the model -- recognises the method
and its settings, maps it onto the matching differentiable adapter of
:mod:`manip_bench.attributors`, and runs the manipulation attack
(:class:`~manip_bench.attack.ManipulationAttack`) on every input within an L-inf budget.
This is a worst case, not the random-noise sensitivity of Captum's ``sensitivity_max`` or
Quantus' ``MaxSensitivity``.

The score
---------
For each assessed input ``i`` the attack returns ``x_adv_i`` with ``|x_adv_i - x_i|_inf <= linf``
and pixels in [0, 1]. Its per-sample manipulability is::

    s_i = min(max(PCC(h(x_adv_i), t_i), 0), 1)   if top-1 class of x_adv_i == top-1 class of x_i
    s_i = 0                                       otherwise (also when the PCC is undefined)

with ``h`` the heatmap (sum over channels of |relevance|, normalised to sum 1) computed
exactly as the user's method computes it on the network the user explains (the ReLU
network; the Softplus(beta) network for the beta-smoothed variant), ``t_i`` the target map
and PCC the Pearson correlation over pixels. ``score = median_i s_i``: 0 means the
explanations could not be moved toward the targets, 1 means an imperceptible perturbation
makes every explanation look like an arbitrary other one while the prediction is kept.
The PCC the target had *before* the attack is reported next to it (``target_pcc_before``).

Nothing of the user's is changed: the model is copied (by the attributors), the Captum
object and the composite are only read, and the random number generators of torch and
NumPy are restored afterwards (also on an interrupt).
"""
import contextlib
import dataclasses
import io
import math
import types
from pathlib import Path

import numpy as np
import torch
from captum._utils.gradient import compute_gradients
from captum.attr import (
    LRP,
    DeepLift,
    Deconvolution,
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES
from captum.attr._utils.attribution import Attribution, GradientAttribution
from captum.attr._utils.lrp_rules import EpsilonRule
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import nn
from zennit import composites as zennit_composites
from zennit import core as zennit_core
from zennit import rules as zennit_rules

from . import attributors, data, heatmaps, metrics, models
from .attack import ManipulationAttack
from .attributors.zennit import default_canonizers
from .errors import ManipBenchError

#: default L-inf budget in pixel units (images in [0, 1])
DEFAULT_LINF = 8 / 255
#: default number of attack iterations
DEFAULT_ITERATIONS = 200
#: default Adam step as a fraction of the L-inf budget (the budget's edge is ~16 steps away)
LR_PER_LINF = 1 / 16

SUPPORTED_CAPTUM = ("Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop",
                    "NoiseTunnel(Saliency) with nt_type='smoothgrad'", "GradientShap", "LRP")
SUPPORTED_ZENNIT = ("EpsilonPlusFlat", "EpsilonPlus", "EpsilonAlpha2Beta1", "EpsilonGammaBox")


# --------------------------------------------------------------------------- recognising

@dataclasses.dataclass
class Method:
    """A recognised explanation method: registry ``name`` + ``options`` on ``model``.

    ``source`` says what the user passed, with the settings that were read from it.
    """

    name: str
    options: dict
    model: nn.Module
    source: str

    def create(self, smooth_beta=None):
        """The differentiable attributor (on a private copy of the model)."""
        return attributors.create(self.name, self.model, smooth_beta=smooth_beta, **self.options)


class _Arguments:
    """``attribute()`` keyword arguments: take the supported ones, refuse the rest by name."""

    def __init__(self, method, kwargs):
        self.method, self.kwargs, self.accepted, self.shown = method, dict(kwargs), [], {}

    def take(self, key, default, show=True):
        """The value of ``key`` (``default`` if not given); ``show``: name it in the report."""
        self.accepted.append(key)
        if show and key in self.kwargs:
            self.shown[key] = self.kwargs[key]
        return self.kwargs.pop(key, default)

    def refuse(self, key, allowed, why):
        """Take ``key``; anything but the ``allowed`` value(s) is an error saying ``why``."""
        value = self.take(key, allowed[0], show=False)
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise ManipBenchError(f"{self.method}: {key}={value!r} is not supported ({why})")
        return value

    def done(self):
        self.refuse("additional_forward_args", (None,), "the model must take the image alone")
        if self.kwargs:
            raise ManipBenchError(
                f"{self.method}: attribute() argument(s) {', '.join(sorted(self.kwargs))} not "
                f"supported here; supported: {', '.join(self.accepted)}")
        return self.shown


def _zero_baseline(args, method):
    """Accept only a zero baseline (None, 0 or an all-zero tensor) under ``baselines``."""
    value = args.take("baselines", None, show=False)
    zero = (value is None or (isinstance(value, (int, float)) and value == 0)
            or (isinstance(value, torch.Tensor) and not value.any()))
    if not zero:
        raise ManipBenchError(f"{method}: only a zero baseline is supported (the differentiable "
                              f"adapter integrates from black); got baselines of type "
                              f"{type(value).__name__} with non-zero values")


def _no_delta(args, method):
    args.refuse("return_convergence_delta", (False,), "the check needs the map only")


def _multiplies(explainer, method):
    if not explainer.multiplies_by_inputs:
        raise ManipBenchError(f"{method}: multiply_by_inputs=False is not supported; "
                              f"construct it with the default multiply_by_inputs=True")


def _saliency(explainer, args):
    return "captum.saliency", {"abs": bool(args.take("abs", True))}


def _input_x_gradient(explainer, args):
    return "captum.input_x_gradient", {}


def _integrated_gradients(explainer, args):
    _multiplies(explainer, "IntegratedGradients")
    _zero_baseline(args, "IntegratedGradients")
    _no_delta(args, "IntegratedGradients")
    args.take("internal_batch_size", None, show=False)  # only splits the work into chunks
    return "captum.integrated_gradients", {"steps": int(args.take("n_steps", 50)),
                                           "method": args.take("method", "gausslegendre")}


def _noise_tunnel(explainer, args):
    inner = explainer.attribution_method
    if type(inner) is not Saliency:
        raise ManipBenchError(f"NoiseTunnel({type(inner).__name__}) is not supported; only "
                              f"NoiseTunnel(Saliency) (SmoothGrad) is")
    args.refuse("nt_type", ("smoothgrad",), "only 'smoothgrad' has a differentiable adapter; "
                "'smoothgrad_sq' and 'vargrad' do not")
    args.refuse("draw_baseline_from_distrib", (False,), "Saliency takes no baselines")
    args.refuse("abs", (True,), "the SmoothGrad adapter averages |gradient|")
    _no_delta(args, "NoiseTunnel")
    args.take("nt_samples_batch_size", None, show=False)  # only splits the samples into chunks
    stdevs = args.take("stdevs", 1.0)
    if not isinstance(stdevs, (int, float)) or isinstance(stdevs, bool):
        raise ManipBenchError(f"NoiseTunnel: stdevs must be one number for the single image "
                              f"input, got {stdevs!r}")
    return "captum.smoothgrad", {"samples": int(args.take("nt_samples", 5)), "stdev": float(stdevs)}


def _gradient_shap(explainer, args):
    _multiplies(explainer, "GradientShap")
    _zero_baseline(args, "GradientShap")
    _no_delta(args, "GradientShap")
    stdevs = args.take("stdevs", 0.0)
    if not isinstance(stdevs, (int, float)) or isinstance(stdevs, bool):
        raise ManipBenchError(f"GradientShap: stdevs must be one number, got {stdevs!r}")
    return "captum.gradient_shap", {"samples": int(args.take("n_samples", 5)),
                                    "stdev": float(stdevs)}


def _guided_backprop(explainer, args):
    return "captum.guided_backprop", {}


def _deconvolution(explainer, args):
    return "captum.deconvolution", {}


def _deeplift(explainer, args):
    _multiplies(explainer, "DeepLift")
    _zero_baseline(args, "DeepLift")
    _no_delta(args, "DeepLift")
    args.refuse("custom_attribution_func", (None,), "the adapter uses DeepLift's own rule")
    return "captum.deeplift", {}


def _lrp(explainer, args):
    _no_delta(args, "LRP")
    args.take("verbose", False, show=False)
    return "captum.lrp", {"epsilon": _lrp_epsilon(explainer.model)}


_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _lrp_epsilon(model):
    """The single epsilon of Captum's LRP on ``model``: default rules or one EpsilonRule.

    The adapter applies epsilon to convolutions, linear and average-pool layers and passes
    relevance through max-pool layers as Captum's default (epsilon 1e-9) does.
    """
    default = EpsilonRule().STABILITY_FACTOR
    epsilons = set()
    for name, module in model.named_modules():
        rule = getattr(module, "rule", "default")
        if rule == "default" and type(module) not in SUPPORTED_LAYERS_WITH_RULES:
            continue
        if rule is not None and rule != "default" and type(rule) is not EpsilonRule:
            raise ManipBenchError(f"LRP: layer {name!r} has rule {type(rule).__name__}; only "
                                  f"Captum's default rules or EpsilonRule are supported (use a "
                                  f"Zennit composite for other rules)")
        epsilon = default if rule in ("default", None) else rule.STABILITY_FACTOR
        if isinstance(module, _MAX_POOL):
            if epsilon != default:
                raise ManipBenchError(f"LRP: EpsilonRule({epsilon}) on max-pool layer {name!r} is "
                                      f"not supported; leave max-pool layers at Captum's default")
        elif rule is not None:
            epsilons.add(epsilon)
    if len(epsilons) > 1:
        raise ManipBenchError(f"LRP: the layers use different EpsilonRule epsilons "
                              f"{sorted(epsilons)}; one epsilon for all layers is supported")
    return float(epsilons.pop()) if epsilons else default


#: exact Captum class -> reader of its attribute() arguments
_CAPTUM = {
    Saliency: _saliency, InputXGradient: _input_x_gradient,
    IntegratedGradients: _integrated_gradients, NoiseTunnel: _noise_tunnel,
    GradientShap: _gradient_shap, GuidedBackprop: _guided_backprop,
    Deconvolution: _deconvolution, DeepLift: _deeplift, LRP: _lrp,
}


def _from_captum(explainer, model, kwargs):
    method = type(explainer).__name__
    reader = _CAPTUM.get(type(explainer))
    if reader is None:
        subclass = next((c.__name__ for c in _CAPTUM if isinstance(explainer, c)), None)
        why = (f"a subclass of {subclass} may change attribute(), so it is not recognised"
               if subclass else "it has no differentiable adapter")
        raise ManipBenchError(f"captum.attr.{method} is not supported ({why}). Supported Captum "
                              f"methods: {', '.join(SUPPORTED_CAPTUM)}")
    forward = explainer.forward_func
    if not isinstance(forward, nn.Module):
        raise ManipBenchError(f"{method}: its forward_func must be a torch.nn.Module (got "
                              f"{type(forward).__name__}); construct it as {method}(model)")
    if model is not None and model is not forward:
        raise ManipBenchError(f"{method}: model= differs from the Captum object's forward_func; "
                              f"leave model out (the Captum object's own model is used)")
    inner = getattr(explainer, "attribution_method", explainer)
    if isinstance(inner, GradientAttribution) and inner.gradient_func is not compute_gradients:
        raise ManipBenchError(f"{method}: a replaced gradient_func is not supported; use the "
                              f"object as Captum constructs it")
    args = _Arguments(method, kwargs)
    name, options = reader(explainer, args)
    shown = args.done()
    label = type(inner).__name__
    label = f"NoiseTunnel({label})" if inner is not explainer else label
    settings = ", ".join(f"{k}={_plain(v)!r}" for k, v in shown.items())
    return Method(name, options, forward, f"captum.attr.{label}({settings})")


#: exact Zennit composite class -> (registry name, parameters it carries)
_ZENNIT = {
    zennit_composites.EpsilonPlusFlat: ("zennit.epsilon_plus_flat", ("epsilon",)),
    zennit_composites.EpsilonPlus: ("zennit.zplus", ("epsilon",)),
    zennit_composites.EpsilonAlpha2Beta1: ("zennit.alpha2beta1", ("epsilon",)),
    zennit_composites.EpsilonGammaBox: ("zennit.epsilon_gamma_box",
                                        ("low", "high", "epsilon", "gamma")),
}


def _closure(function):
    """A function's captured variables by name."""
    cells = function.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(function.__code__.co_freevars, cells)}


def _composite_parameters(composite):
    """Read epsilon (and gamma, low, high) back from a built-in composite's rules."""
    params = {}
    rules = [rule for _, rule in composite.layer_map + getattr(composite, "first_map", [])]
    for rule in rules:
        if type(rule) is zennit_rules.Epsilon:
            params["epsilon"] = _closure(rule.gradient_mapper)["stabilizer_fn"].epsilon
        elif type(rule) is zennit_rules.Gamma:
            params["gamma"] = _closure(rule.param_modifiers[0].modifier)["gamma"]
        elif type(rule) is zennit_rules.ZBox:
            params["low"] = _closure(rule.input_modifiers[1])["low"]
            params["high"] = _closure(rule.input_modifiers[2])["high"]
    return params


def _fingerprint(value, depth=0):
    """A comparable summary of a composite's rules: types, code and captured values."""
    if depth > 16:
        return type(value)
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu", torch.float64)
        return ("tensor", tuple(data.shape), data.numpy().tobytes())
    if value is None or isinstance(value, (bool, int, float, str, type)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_fingerprint(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return tuple((k, _fingerprint(v, depth + 1)) for k, v in sorted(value.items()))
    if isinstance(value, types.BuiltinFunctionType):
        return value
    if hasattr(value, "__code__"):
        return ("function", value.__code__, _fingerprint(_closure(value), depth + 1))
    if isinstance(value, zennit_core.BasicHook):
        parts = (value.input_modifiers, value.param_modifiers, value.output_modifiers,
                 value.gradient_mapper, value.reducer)
        return (type(value), _fingerprint(parts, depth + 1))
    if isinstance(value, (zennit_core.ParamMod, zennit_core.Stabilizer)):
        return (type(value), _fingerprint(vars(value), depth + 1))
    return type(value)


def _composite_map(composite):
    maps = [composite.layer_map, getattr(composite, "first_map", [])]
    return _fingerprint([[(types, rule) for types, rule in entries] for entries in maps])


def _from_zennit(composite, model, kwargs):
    method = type(composite).__name__
    if type(composite) not in _ZENNIT:
        raise ManipBenchError(f"zennit composite {method} is not supported. Supported: "
                              f"{', '.join(SUPPORTED_ZENNIT)} (built-in classes, their own "
                              f"parameters), or a registry name such as 'zennit.epsilon'")
    if model is None:
        raise ManipBenchError(f"{method}: pass the model too: check_robustness(composite, "
                              f"inputs, model=model)")
    if kwargs:
        raise ManipBenchError(f"{method}: keyword argument(s) {', '.join(sorted(kwargs))} not "
                              f"supported with a composite (its parameters are read from it)")
    name, keys = _ZENNIT[type(composite)]
    customised = ManipBenchError(
        f"{method}: only its parameters {', '.join(keys)} can be mapped; a customised "
        f"layer_map/first_map, stabilizer or zero_params is not supported")
    try:
        params = _composite_parameters(composite)
        reference = type(composite)(**params)
    except (AttributeError, KeyError, IndexError, TypeError) as error:
        raise customised from error
    if set(params) != set(keys) or _composite_map(composite) != _composite_map(reference):
        raise customised
    options = dict(params, canonizers=_canonizers(composite.canonizers, model, method))
    shown = ", ".join(f"{k}={_plain(v)!r}" for k, v in params.items())
    return Method(name, options, model, f"zennit.composites.{method}({shown})")


def _canonizers(canonizers, model, method):
    """The composite's canonizers for the attributor: none, the automatic ones, or fresh copies."""
    if not canonizers:
        return None
    if [type(c) for c in canonizers] == [type(c) for c in default_canonizers(model)]:
        return "auto"
    try:
        return [canonizer.copy() for canonizer in canonizers]
    except Exception as error:  # noqa: BLE001 - any failure means the same to the user
        raise ManipBenchError(f"{method}: cannot copy its canonizers ({error})") from error


def recognise(explainer, model=None, **attribute_kwargs):
    """Map what the user explains with onto a registry attributor.

    Parameters
    ----------
    explainer : captum Attribution, zennit Composite or str
        A Captum attribution object (its ``forward_func`` must be an ``nn.Module``), a
        built-in Zennit composite, or a registry name (:func:`manip_bench.attributors.available`).
    model : torch.nn.Module, optional
        Needed with a composite or a registry name; with a Captum object its own model is used.
    **attribute_kwargs
        Captum: the arguments the user passes to ``attribute()`` (``abs``, ``n_steps``,
        ``method``, ``baselines`` (zero only), ``nt_type`` ('smoothgrad' only), ``nt_samples``,
        ``stdevs``, ``n_samples`` ...), with Captum's defaults when left out. Registry name:
        the attributor's options (:func:`manip_bench.attributors.options`).

    Returns
    -------
    Method
    """
    if isinstance(explainer, Attribution):
        return _from_captum(explainer, model, attribute_kwargs)
    if isinstance(explainer, zennit_core.Composite):
        return _from_zennit(explainer, model, attribute_kwargs)
    if isinstance(explainer, str):
        attributors.get_class(explainer)
        if model is None:
            raise ManipBenchError(f"{explainer}: pass the model too: "
                                  f"check_robustness({explainer!r}, inputs, model=model)")
        accepted = [key for key in attributors.options(explainer) if key != "smooth_beta"]
        unknown = sorted(set(attribute_kwargs) - set(accepted))
        if unknown:
            raise ManipBenchError(f"{explainer} does not take option(s) {', '.join(unknown)}; it "
                                  f"takes: {', '.join(accepted) or 'none'} (and check_robustness "
                                  f"takes smooth_beta=)")
        shown = ", ".join(f"{k}={_plain(v)!r}" for k, v in attribute_kwargs.items())
        return Method(explainer, dict(attribute_kwargs), model,
                      f"{explainer}({shown})" if shown else explainer)
    if isinstance(explainer, type) and issubclass(explainer, Attribution):
        raise ManipBenchError(f"pass an instance, e.g. {explainer.__name__}(model), not the class")
    raise ManipBenchError(
        f"cannot recognise {type(explainer).__name__!r} as an explanation method. Pass a Captum "
        f"object ({', '.join(SUPPORTED_CAPTUM)}), a Zennit composite "
        f"({', '.join(SUPPORTED_ZENNIT)}) with model=, or a registry name with model=")


# --------------------------------------------------------------------------- attacking

def manipulability(target_pcc, class_kept):
    """Per-sample ``s_i = clip(PCC_i, 0, 1)`` if the class is kept, else 0 (NaN PCC: 0)."""
    return [min(max(p, 0.0), 1.0) if kept and not math.isnan(p) else 0.0
            for p, kept in zip(target_pcc, class_kept)]


@contextlib.contextmanager
def _private_random_state(seed, device):
    """Seed torch and NumPy for the check, and give the caller back their own streams after."""
    devices = [device] if device.type == "cuda" else []
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
                np.random.seed(seed)
            yield
    finally:
        np.random.set_state(state)


def _images(inputs, device):
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(inputs)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ManipBenchError("inputs must be one image tensor of shape (N, C, H, W) "
                              "(tuples of inputs are not supported)")
    x = inputs.detach().to(device=device, dtype=torch.float32)
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ManipBenchError(
            f"inputs must be images in [0, 1] (got values in [{x.min():.3g}, {x.max():.3g}]): the "
            f"L-inf budget is in pixel units. If your pipeline feeds normalised tensors, put the "
            f"normalisation into the model, e.g. nn.Sequential(manip_bench.models.cifar_vgg."
            f"Normalize(mean, std), model), and pass [0, 1] images")
    return x


def _classes(target, n, device):
    if target is None:
        return None
    target = torch.as_tensor(target, device=device).reshape(-1)
    if target.numel() == 1:
        target = target.expand(n)
    if target.numel() != n or target.is_floating_point():
        raise ManipBenchError(f"target must be an int or {n} class indices, "
                              f"got shape {tuple(target.shape)}")
    return target.long()


def _device(model):
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _plain(value):
    """JSON-friendly form of an option value."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def check_robustness(explainer, inputs, target=None, *, model=None, target_map=None,
                     iterations=DEFAULT_ITERATIONS, linf=DEFAULT_LINF, lr=None, smooth_beta=None,
                     seed=0, progress=False, **attribute_kwargs):
    """Attack the explanations of ``inputs`` and report how far they can be manipulated.

    Parameters
    ----------
    explainer : captum Attribution, zennit Composite or str
        The user's own Captum object (``Saliency(model)``, ``InputXGradient``,
        ``IntegratedGradients``, ``GuidedBackprop``, ``NoiseTunnel(Saliency(model))``,
        ``GradientShap``, ``LRP``), a built-in Zennit composite (``EpsilonPlusFlat``,
        ``EpsilonPlus``, ``EpsilonAlpha2Beta1``, ``EpsilonGammaBox``) with ``model=``, or a
        registry name with ``model=``. See :func:`recognise`. DeepLift and Deconvolution
        are recognised but cannot be attacked here: a :class:`ManipBenchError` says why.
    inputs : torch.Tensor or numpy.ndarray
        Images ``(N, C, H, W)`` in [0, 1] (the model normalises inside).
    target : int or sequence of int, optional
        As in Captum's ``attribute()``. The attack keeps the model's prediction, so it
        explains the predicted class; inputs predicted as another class than ``target``
        are skipped and listed in ``report.skipped``.
    model : torch.nn.Module, optional
        With a composite or a registry name.
    target_map : torch.Tensor, optional
        ``(H, W)`` or ``(N, H, W)`` heatmap(s) to steer toward. Default: input ``i`` is
        steered toward the explanation of input ``(i + 1) mod N`` (N >= 2 needed).
    iterations : int
        Attack steps (Adam).
    linf : float or None
        Largest change of any pixel, in [0, 1] pixel units (default 8/255); None: unbounded.
    lr : float, optional
        Adam step in pixel units; default ``linf / 16`` (without a budget: the method's
        paper preset).
    smooth_beta : float, optional
        Also assess the beta-smoothed explanation (Softplus(beta) network; gradient-type
        methods), reported in ``report.smoothed``: what the defence buys.
    seed : int or None
        Seeds torch and NumPy inside the check (the caller's random state is restored).
    progress : bool
        Show progress bars.
    **attribute_kwargs
        The arguments the user passes to Captum's ``attribute()`` (``abs=``, ``n_steps=``,
        ``method=``, ``baselines=`` (zero only), ``nt_type=`` ('smoothgrad' only),
        ``nt_samples=``, ``stdevs=``, ``n_samples=``); with a registry name: its options.

    Returns
    -------
    RobustnessReport
        ``print(report)`` shows tables, ``report.score`` is the manipulability in [0, 1]
        (see the module docstring), ``report.to_dict()`` everything as plain data.
    """
    method = recognise(explainer, model, **attribute_kwargs)
    cls = attributors.get_class(method.name)
    if not cls.attackable:
        raise ManipBenchError(
            f"{method.source} cannot be assessed: {cls.not_attackable_reason}, so no gradient "
            f"attack can run on it (this is no evidence that it is robust). Supported: "
            f"{', '.join(SUPPORTED_CAPTUM)}; zennit {', '.join(SUPPORTED_ZENNIT)}")
    if smooth_beta is not None and not cls.needs_softplus:
        raise ManipBenchError(f"{method.source}: smooth_beta applies to gradient-type methods "
                              f"only (LRP rules on a softplus network do not conserve relevance)")
    device = _device(method.model)
    x = _images(inputs, device)
    budget = {"iterations": int(iterations), "linf": linf,
              "lr": lr if lr is not None else (linf * LR_PER_LINF if linf else None)}
    with _private_random_state(seed, device):
        explain = method.create()
        with torch.no_grad():
            predicted = explain.model(x).argmax(1)
        classes = _classes(target, x.shape[0], device)
        skipped = {} if classes is None else {
            i: f"predicted class {int(p)} is not target {int(t)}"
            for i, (p, t) in enumerate(zip(predicted, classes)) if p != t}
        keep = [i for i in range(x.shape[0]) if i not in skipped]
        if not keep:
            raise ManipBenchError("no input is predicted as its target class; the attack keeps "
                                  "the prediction, so it explains the predicted class "
                                  "(pass target=None)")
        if target_map is None and len(keep) < 2:
            raise ManipBenchError("the default targets are the other inputs' explanations: pass "
                                  "at least 2 inputs (predicted as their target), or a target_map")
        maps = _target_maps(target_map, keep, x.shape[0])
        run = dict(method=method, x=x, keep=keep, target_map=maps, budget=budget,
                   progress=progress, seed=seed, skipped=skipped)
        report = _assess(explain, **run)
        if smooth_beta is not None:
            report.smoothed = _assess(method.create(smooth_beta), **run)
            pairs = zip(report.smoothed.per_sample["class"], report.per_sample["class"])
            report.smoothed.agreement = float(np.mean([a == b for a, b in pairs]))
    return report


def check_folder(folder, model="cifar_vgg", weights="default", method="captum.saliency", n=8,
                 seed=0, device="cpu", **options):
    """:func:`check_robustness` of a zoo model on ``n`` images of a folder (``manip-bench check``).

    ``model`` is a zoo name (:func:`manip_bench.models.available`), ``weights`` as for
    :func:`manip_bench.models.load` (e.g. a checkpoint path), ``method`` a registry name.
    ``n`` images are drawn with ``seed`` by :func:`manip_bench.data.image_files` (all of
    them if the folder has no more) and resized to the model's input size. ``options`` go
    to :func:`check_robustness`.
    """
    net = models.load(model, weights, device)
    paths = data.image_files(folder)
    if n is not None and n < len(paths):
        paths = data.image_files(folder, n=n, seed=seed)
    x = data.load_batch(paths, models.input_size(model)).to(device)
    report = check_robustness(method, x, model=net, seed=seed, **options)
    for part in (report, report.smoothed):
        if part is not None:
            part.names = [Path(path).name for path in paths]
    return report


def _target_maps(target_map, keep, n):
    if target_map is None:
        return None
    target_map = torch.as_tensor(target_map)
    if target_map.dim() == 3 and target_map.shape[0] == n:
        return target_map[keep]
    if target_map.dim() == 2:
        return target_map
    raise ManipBenchError(f"target_map must have shape (H, W) or ({n}, H, W), "
                          f"got {tuple(target_map.shape)}")


def _assess(explain, method, x, keep, target_map, budget, progress, seed, skipped):
    attack = ManipulationAttack(method.model, explain, iterations=budget["iterations"],
                                lr=budget["lr"], linf=budget["linf"], progress=progress)
    x = x[keep]
    if target_map is None:
        targets = attack.target_maps(x.roll(-1, 0))
        sources = [keep[(k + 1) % len(keep)] for k in range(len(keep))]
    else:
        targets = heatmaps.prepare_target(target_map.to(x.device), x.shape[0], x.shape[2:])
        sources = ["given"] * len(keep)
    result = attack(x, targets)
    m = result.metrics
    before = metrics.map_similarity(result.original_map, result.target_map)["pcc"]
    per_sample = {
        "input": list(keep), "target": sources, "class": result.original_class.tolist(),
        "target_pcc_before": before, "target_pcc": m["expl_target_pcc"],
        "target_ssim": m["expl_target_ssim"], "original_pcc": m["expl_original_pcc"],
        "original_ssim": m["expl_original_ssim"], "input_linf": m["input_linf"],
        "input_ssim": m["input_ssim"], "output_mse": m["output_mse"],
        "prob_before": m["prob_before"], "prob_after": m["prob_after"],
        "class_kept": m["class_kept"],
    }
    per_sample["manipulability"] = manipulability(m["expl_target_pcc"], m["class_kept"])
    return RobustnessReport(
        method=method.name, source=method.source, options=method.options,
        smooth_beta=explain.smooth_beta, budget=dict(budget), seed=seed, per_sample=per_sample,
        score=float(np.median(per_sample["manipulability"])), skipped=dict(skipped),
        seconds=result.seconds, result=result)


# --------------------------------------------------------------------------- reporting

#: per-sample columns of the table: key, header, format
_COLUMNS = (
    ("input", "in", "{}".format), ("class", "class", "{}".format),
    ("target", "map\nof", "{}".format),
    ("target_pcc_before", "target\nPCC\nbefore", "{:.2f}".format),
    ("target_pcc", "target\nPCC\nafter", "{:.2f}".format),
    ("target_ssim", "target\nSSIM\nafter", "{:.2f}".format),
    ("original_pcc", "PCC to\nown\nmap", "{:.2f}".format),
    ("input_linf", "input\nL∞\n×255", lambda v: f"{v * 255:.1f}"),
    ("input_ssim", "input\nSSIM", "{:.3f}".format),
    ("class_kept", "class\nkept", lambda v: f"{v:.0%}" if isinstance(v, float) else
     ("yes" if v else "no")),
    ("manipulability", "s_i", "{:.2f}".format),
)


@dataclasses.dataclass
class RobustnessReport:
    """What :func:`check_robustness` found, per input and aggregated.

    ``score`` is the median of ``per_sample["manipulability"]`` (module docstring);
    ``smoothed`` the same report for the beta-smoothed explanation (or None), with
    ``agreement`` the fraction of inputs whose smoothed prediction equals the original one;
    ``result`` the underlying :class:`~manip_bench.attack.AttackResult` (images, maps);
    ``names`` optional names of the inputs (file names), indexed like the inputs.
    """

    method: str
    source: str
    options: dict
    smooth_beta: float
    budget: dict
    seed: int
    per_sample: dict
    score: float
    skipped: dict
    seconds: float
    result: object = dataclasses.field(repr=False, default=None)
    smoothed: "RobustnessReport" = None
    agreement: float = None
    names: list = None

    def summary(self):
        """Median of each numeric per-sample value (``class_kept``: the fraction kept)."""
        keys = [k for k in self.per_sample if k not in ("input", "target", "class")]
        return metrics.summarize({k: self.per_sample[k] for k in keys})

    def to_dict(self):
        """Everything as JSON-friendly plain data (no tensors)."""
        return {
            "method": self.method, "source": self.source,
            "options": {k: _plain(v) for k, v in self.options.items()},
            "smooth_beta": self.smooth_beta, "budget": dict(self.budget), "seed": self.seed,
            "score": self.score, "summary": self.summary(),
            "per_sample": {k: list(v) for k, v in self.per_sample.items()},
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "seconds": round(self.seconds, 3), "agreement": self.agreement, "names": self.names,
            "smoothed": self.smoothed.to_dict() if self.smoothed is not None else None,
        }

    def _parts(self):
        """Headline, per-sample table and budget line (rich renderables)."""
        beta = f", β-smoothed (β={self.smooth_beta:g})" if self.smooth_beta is not None else ""
        options = ", ".join(f"{k}={_plain(v)}" for k, v in self.options.items())
        method = (self.source if self.source.startswith(self.method)
                  else f"{self.source} → {self.method}({options})")
        headline = Text.assemble((f"{method}{beta}: ", "bold"),
                                 (f"manipulability {self.score:.2f}", "bold magenta"))
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False)
        for _, header, _ in _COLUMNS:
            table.add_column(header, justify="right", no_wrap=True)
        if self.names:
            table.add_column("image", overflow="ellipsis", no_wrap=True, max_width=16)
        for row in zip(*(self.per_sample[key] for key, _, _ in _COLUMNS)):
            names = [self.names[row[0]]] if self.names else []
            table.add_row(*(fmt(v) for v, (_, _, fmt) in zip(row, _COLUMNS)), *names)
        summary = self.summary()
        table.add_row("med", "", "", *(fmt(summary[key]) for key, _, fmt in _COLUMNS[3:]),
                      style="bold")
        linf = self.budget["linf"]
        budget = Text(f"{self.budget['iterations']} iterations, "
                      f"{f'L∞ ≤ {linf * 255:.3g}/255' if linf else 'no L∞ budget'}, "
                      f"{self.seconds:.1f} s; median output MSE {summary['output_mse']:.1e}",
                      style="dim")
        return [headline, table, budget]

    def __rich__(self):
        parts = self._parts()
        if self.skipped:
            parts.append("skipped: " + "; ".join(f"input {i}: {why}"
                                                 for i, why in self.skipped.items()))
        if self.smoothed is not None:
            parts += ["", *self.smoothed._parts()]
            parts.append(f"β-smoothing (β={self.smoothed.smooth_beta:g}) changes the "
                         f"manipulability from {self.score:.2f} to {self.smoothed.score:.2f}; "
                         f"its prediction agrees with the original model's on "
                         f"{self.smoothed.agreement:.0%} of the inputs")
        parts.append(Text("s_i: target PCC after the attack, clipped to [0, 1], 0 where the "
                          "class flipped; manipulability: median s_i (0 robust, 1 fully "
                          "manipulable)", style="dim"))
        return Group(*parts)

    def __str__(self):
        console = Console(file=io.StringIO(), width=100, color_system=None, force_terminal=False)
        console.print(self)
        return "\n".join(line.rstrip() for line in console.file.getvalue().rstrip().splitlines())


# --------------------------------------------------------------------------- Quantus

#: ``quantus.explain`` method names -> (Captum class, the attribute() arguments Quantus adds)
_QUANTUS_CAPTUM = {
    "Saliency": (Saliency, {}), "Gradient": (Saliency, {"abs": False}),
    "InputXGradient": (InputXGradient, {}), "GuidedBackprop": (GuidedBackprop, {}),
    "IntegratedGradients": (IntegratedGradients, {"method": "riemann_trapezoid"}),
    "GradientShap": (GradientShap, {}), "DeepLift": (DeepLift, {}), "LRP": (LRP, {}),
}


class ManipulationRobustness:
    """A Quantus-style robustness metric: per-sample worst-case manipulability (lower is better).

    Called like Quantus' robustness metrics, without Quantus as a dependency::

        metric = ManipulationRobustness(iterations=200, linf=8 / 255)
        scores = metric(model, x_batch, y_batch, explain_func=Saliency)   # list of floats

    Each score is ``s_i`` of :func:`check_robustness` (NaN for an input whose prediction
    is not ``y_batch[i]``). ``a_batch`` is accepted and ignored: the attack needs its own,
    differentiable maps. The method comes from ``explain_func`` -- a Captum attribution
    class or object, a Zennit composite, a registry name, or ``quantus.explain`` with
    ``explain_func_kwargs={"method": "Saliency", ...}`` (Saliency, Gradient, InputXGradient,
    GuidedBackprop, IntegratedGradients, GradientShap, LRP) -- or else from ``method``.
    """

    score_direction = "lower"

    def __init__(self, method=None, iterations=DEFAULT_ITERATIONS, linf=DEFAULT_LINF, lr=None,
                 seed=0, return_aggregate=False, aggregate_func=np.nanmedian, **attribute_kwargs):
        self.method, self.attribute_kwargs = method, attribute_kwargs
        self.options = dict(iterations=iterations, linf=linf, lr=lr, seed=seed)
        self.return_aggregate, self.aggregate_func = return_aggregate, aggregate_func
        self.last_results, self.all_results, self.last_report = [], [], None

    def __call__(self, model, x_batch, y_batch, a_batch=None, s_batch=None, channel_first=None,
                 explain_func=None, explain_func_kwargs=None, model_predict_kwargs=None,
                 softmax=False, device=None, batch_size=None, custom_batch=None, **kwargs):
        if device is not None and torch.device(device) != _device(model):
            raise ManipBenchError(f"device={device} differs from the model's device "
                                  f"{_device(model)}; the model is not moved (it is the caller's)")
        x = _channel_first(np.asarray(x_batch) if not isinstance(x_batch, torch.Tensor)
                           else x_batch, channel_first)
        explainer, kwargs = self._explainer(model, explain_func, dict(explain_func_kwargs or {}))
        report = check_robustness(explainer, x, target=np.asarray(y_batch).reshape(-1),
                                  model=None if isinstance(explainer, Attribution) else model,
                                  **self.options, **kwargs)
        scores = [math.nan] * x.shape[0]
        for i, s in zip(report.per_sample["input"], report.per_sample["manipulability"]):
            scores[i] = s
        if self.return_aggregate:
            scores = [float(self.aggregate_func(np.asarray(scores)))]
        self.last_results, self.last_report = scores, report
        self.all_results.append(scores)
        return scores

    def _explainer(self, model, explain_func, explain_kwargs):
        """(explainer for :func:`recognise`, its keyword arguments)."""
        kwargs = dict(self.attribute_kwargs)
        source = explain_func if explain_func is not None else self.method
        if callable(source) and getattr(source, "__module__", "").startswith("quantus"):
            name = explain_kwargs.get("method", "Gradient")
            if name not in _QUANTUS_CAPTUM:
                raise ManipBenchError(f"quantus.explain method {name!r} is not supported; "
                                      f"supported: {', '.join(_QUANTUS_CAPTUM)}")
            cls, added = _QUANTUS_CAPTUM[name]
            kwargs.update(added, **explain_kwargs.get("xai_lib_attrib_kwargs", {}))
            return cls(model, **explain_kwargs.get("xai_lib_kwargs", {})), kwargs
        kwargs.update(explain_kwargs)
        if isinstance(source, type) and issubclass(source, Attribution):
            return source(model), kwargs
        if source is None:
            raise ManipBenchError("give the method: explain_func (a Captum class or object, a "
                                  "Zennit composite, a registry name) or method=")
        return source, kwargs


def _channel_first(x, channel_first):
    x = torch.as_tensor(x)
    if x.dim() != 4:
        raise ManipBenchError(f"x_batch must have 4 dimensions, got shape {tuple(x.shape)}")
    if channel_first is None:
        channel_first = x.shape[1] <= 4 or x.shape[-1] > 4
    return x if channel_first else x.permute(0, 3, 1, 2).contiguous()


__all__ = ["DEFAULT_ITERATIONS", "DEFAULT_LINF", "ManipulationRobustness", "Method",
           "RobustnessReport", "check_folder", "check_robustness", "manipulability", "recognise"]
