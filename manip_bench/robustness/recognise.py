"""Recognise the user's explanation method: a Captum object, a Zennit composite, a
pytorch-grad-cam object or a registry name.

:func:`recognise` maps what the user already explains with onto a registry attributor name
plus options (:class:`RecognisedMethod`), reading the settings from the Captum object's
``attribute()`` arguments, from the composite's rules or from the CAM object's target layers,
and refusing by name what has no matching differentiable adapter. The user's objects are
only read; pytorch-grad-cam is imported only when one of its objects is passed.
"""
import dataclasses
import types

import torch
from captum.attr import (
    LRP,
    Attribution,
    DeepLift,
    Deconvolution,
    GradientAttribution,
    GradientShap,
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from torch import nn
from zennit import composites as zennit_composites
from zennit.canonizers import MergeBatchNorm
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit import core as zennit_core
from zennit import rules as zennit_rules

from .. import _compat, attributors, defences
from ..attributors.cam import layer_names
from ..errors import ManipBenchError

SUPPORTED_CAPTUM = ("Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop",
                    "NoiseTunnel(Saliency) with nt_type='smoothgrad'", "GradientShap", "LRP",
                    "LayerGradCam", "GuidedGradCam", "LayerGradientXActivation",
                    "LayerIntegratedGradients")
#: pytorch-grad-cam class name -> registry name (EigenCAM is recognised, then refused)
GRAD_CAM = {"GradCAM": "gradcam.gradcam", "GradCAMPlusPlus": "gradcam.gradcam_plus_plus",
            "XGradCAM": "gradcam.xgradcam", "HiResCAM": "gradcam.hirescam",
            "LayerCAM": "gradcam.layercam", "ScoreCAM": "gradcam.scorecam",
            "EigenCAM": "gradcam.eigencam"}
SUPPORTED_GRAD_CAM = tuple(GRAD_CAM)
SUPPORTED_ZENNIT = ("EpsilonPlusFlat", "EpsilonPlus", "EpsilonAlpha2Beta1", "EpsilonGammaBox")


@dataclasses.dataclass
class RecognisedMethod:
    """A recognised explanation method: registry ``name`` + ``options`` on ``model``.

    ``source`` says what the user passed, with the settings that were read from it;
    ``target`` the classes its own call names (pytorch-grad-cam's ``targets=``), if any.
    """

    name: str
    options: dict
    model: nn.Module
    source: str
    target: list = None

    def create(self, defence=None):
        """The differentiable attributor (on a private copy of the model, under ``defence``)."""
        return attributors.create(self.name, defences.apply(defence, self.model), **self.options)


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
    epsilon_rule = _compat.EpsilonRule
    default = epsilon_rule().STABILITY_FACTOR
    epsilons = set()
    for name, module in model.named_modules():
        rule = getattr(module, "rule", "default")
        if rule == "default" and type(module) not in _compat.SUPPORTED_LAYERS_WITH_RULES:
            continue
        if rule is not None and rule != "default" and type(rule) is not epsilon_rule:
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


def _layer_options(explainer, args):
    """The layer (by name) and the upsampling of a Captum layer method."""
    args.refuse("attribute_to_layer_input", (False,), "the CAM is taken of the layer's output")
    if isinstance(explainer.layer, (list, tuple)):
        raise ManipBenchError(f"{type(explainer).__name__}: one layer is supported, got "
                              f"{len(explainer.layer)}")
    layer = layer_names(explainer.forward_func, explainer.layer)[0]
    # not an attribute() argument: the mode of the user's LayerAttribution.interpolate
    return {"layer": layer, "interpolate_mode": args.take("interpolate_mode", "nearest")}


def _layer_gradcam(explainer, args):
    options = _layer_options(explainer, args)
    args.refuse("attr_dim_summation", (True,), "the adapter sums over channels, as the default")
    args.refuse("grad_kwargs", (None,), "the adapter takes the plain gradient")
    return "captum.layer_gradcam", dict(
        options, relu_attributions=bool(args.take("relu_attributions", False)))


def _guided_gradcam(explainer, args):
    layer = explainer.grad_cam.layer
    args.refuse("attribute_to_layer_input", (False,), "the CAM is taken of the layer's output")
    return "captum.guided_gradcam", {
        "layer": layer_names(explainer.forward_func, layer)[0],
        "interpolate_mode": args.take("interpolate_mode", "nearest")}


def _layer_gradient_x_activation(explainer, args):
    _multiplies(explainer, "LayerGradientXActivation")
    return "captum.layer_gradient_x_activation", _layer_options(explainer, args)


def _layer_integrated_gradients(explainer, args):
    method = "LayerIntegratedGradients"
    _multiplies(explainer, method)
    _zero_baseline(args, method)
    _no_delta(args, method)
    args.refuse("grad_kwargs", (None,), "the adapter takes the plain gradient")
    args.take("internal_batch_size", None, show=False)  # only splits the work into chunks
    return "captum.layer_integrated_gradients", dict(
        _layer_options(explainer, args), steps=int(args.take("n_steps", 50)),
        method=args.take("method", "gausslegendre"))


#: exact Captum class -> reader of its attribute() arguments
_CAPTUM = {
    Saliency: _saliency, InputXGradient: _input_x_gradient,
    IntegratedGradients: _integrated_gradients, NoiseTunnel: _noise_tunnel,
    GradientShap: _gradient_shap, GuidedBackprop: _guided_backprop,
    Deconvolution: _deconvolution, DeepLift: _deeplift, LRP: _lrp,
    LayerGradCam: _layer_gradcam, GuidedGradCam: _guided_gradcam,
    LayerGradientXActivation: _layer_gradient_x_activation,
    LayerIntegratedGradients: _layer_integrated_gradients,
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
    if isinstance(inner, GradientAttribution) and not _compat.has_default_gradient_func(inner):
        raise ManipBenchError(f"{method}: a replaced gradient_func is not supported; use the "
                              f"object as Captum constructs it")
    args = _Arguments(method, kwargs)
    name, options = reader(explainer, args)
    shown = args.done()
    label = type(inner).__name__
    label = f"NoiseTunnel({label})" if inner is not explainer else label
    settings = ", ".join(f"{k}={_plain(v)!r}" for k, v in shown.items())
    return RecognisedMethod(name, options, forward, f"captum.attr.{label}({settings})")


#: exact Zennit composite class -> (registry name, parameters it carries)
_ZENNIT = {
    zennit_composites.EpsilonPlusFlat: ("zennit.epsilon_plus_flat", ("epsilon",)),
    zennit_composites.EpsilonPlus: ("zennit.zplus", ("epsilon",)),
    zennit_composites.EpsilonAlpha2Beta1: ("zennit.alpha2beta1", ("epsilon",)),
    zennit_composites.EpsilonGammaBox: ("zennit.epsilon_gamma_box",
                                        ("low", "high", "epsilon", "gamma")),
}


def _composite_parameters(composite):
    """Read epsilon (and gamma, low, high) back from a built-in composite's rules."""
    params = {}
    rules = [rule for _, rule in composite.layer_map + getattr(composite, "first_map", [])]
    for rule in rules:
        if type(rule) is zennit_rules.Epsilon:
            params["epsilon"] = _compat.rule_stabilizer(rule).epsilon
        elif type(rule) is zennit_rules.Gamma:
            params["gamma"] = _compat.rule_gamma(rule)
        elif type(rule) is zennit_rules.ZBox:
            params["low"], params["high"] = _compat.rule_box_bounds(rule)
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
    function = _compat.function_parts(value)
    if function is not None:
        code, closure = function
        return ("function", code, _fingerprint(closure, depth + 1))
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
    return RecognisedMethod(name, options, model, f"zennit.composites.{method}({shown})")


#: Zennit's own canonizers for batch norm and torchvision's ResNet/VGG blocks
STANDARD_CANONIZERS = (MergeBatchNorm, ResNetCanonizer, VGGCanonizer)


def _canonizers(canonizers, model, method):
    """The composite's canonizers for the attributor: none, the automatic ones, or fresh copies."""
    if not canonizers:
        return None
    if all(isinstance(c, STANDARD_CANONIZERS) for c in canonizers):
        return "auto"  # batch-norm merging and ResNet sums: what "auto" finds by behaviour
    try:
        return [canonizer.copy() for canonizer in canonizers]
    except Exception as error:  # noqa: BLE001 - any failure means the same to the user
        raise ManipBenchError(f"{method}: cannot copy its canonizers ({error})") from error


def _is_grad_cam(explainer):
    return any(cls.__module__.split(".")[0] == "pytorch_grad_cam"
               for cls in type(explainer).__mro__)


def _from_grad_cam(cam, model, kwargs):
    """A pytorch-grad-cam object (``GradCAM(model=model, target_layers=[layer])``)."""
    method = type(cam).__name__
    if type(cam).__module__.split(".")[0] != "pytorch_grad_cam" or method not in GRAD_CAM:
        raise ManipBenchError(f"pytorch_grad_cam {method} is not supported (subclasses may "
                              f"change the map). Supported: {', '.join(SUPPORTED_GRAD_CAM)}")
    if model is not None and model is not cam.model:
        raise ManipBenchError(f"{method}: model= differs from the CAM object's model; leave "
                              f"model out (the object's own model is used)")
    args = _Arguments(method, kwargs)
    target = _grad_cam_classes(method, args.take("targets", None, show=False))
    args.refuse("aug_smooth", (False,), "test-time augmentation has no differentiable adapter")
    args.refuse("eigen_smooth", (False,), "the SVD projection's sign is not differentiable")
    args.done()
    layers = layer_names(cam.model, cam.target_layers)
    options = {"layer": layers if len(layers) > 1 else layers[0]}
    if cam.reshape_transform is not None:
        options["reshape_transform"] = cam.reshape_transform
    if method == "ScoreCAM" and hasattr(cam, "batch_size"):
        options["batch_size"] = int(cam.batch_size)
    shown = f"target_layers={layers!r}" + (
        ", reshape_transform=..." if cam.reshape_transform is not None else "")
    return RecognisedMethod(GRAD_CAM[method], options, cam.model,
                            f"pytorch_grad_cam.{method}({shown})", target)


def _grad_cam_classes(method, targets):
    """The classes of pytorch-grad-cam's ``targets=[ClassifierOutputTarget(c), ...]``."""
    if targets is None:
        return None
    classes = [getattr(t, "category", None) for t in targets]
    if not classes or any(not isinstance(c, int) for c in classes):
        raise ManipBenchError(
            f"{method}: targets= must be ClassifierOutputTarget(c) objects (one class each); "
            "other pytorch-grad-cam targets (soft-max, regression, segmentation) have no "
            "differentiable adapter here")
    return classes


def recognise(explainer, model=None, **attribute_kwargs):
    """Map what the user explains with onto a registry attributor.

    Parameters
    ----------
    explainer : captum Attribution, zennit Composite, pytorch-grad-cam CAM or str
        A Captum attribution object (its ``forward_func`` must be an ``nn.Module``), a
        built-in Zennit composite, a pytorch-grad-cam object (``GradCAM(model=model,
        target_layers=[layer])``, its ``reshape_transform`` kept), or a registry name
        (:func:`manip_bench.attributors.available`).
    model : torch.nn.Module, optional
        Needed with a composite or a registry name; with a Captum object its own model is used.
    **attribute_kwargs
        Captum: the arguments the user passes to ``attribute()`` (``abs``, ``n_steps``,
        ``method``, ``baselines`` (zero only), ``nt_type`` ('smoothgrad' only), ``nt_samples``,
        ``stdevs``, ``n_samples`` ...), with Captum's defaults when left out; for Captum's
        layer methods also ``interpolate_mode`` (how the user upsamples the layer map with
        ``LayerAttribution.interpolate``, default ``"nearest"``). pytorch-grad-cam:
        ``aug_smooth``/``eigen_smooth`` (False only); ``targets=[ClassifierOutputTarget(c),
        ...]`` (their classes become ``target``). Registry name:
        the attributor's options (:func:`manip_bench.attributors.options`).

    Returns
    -------
    RecognisedMethod
    """
    if isinstance(explainer, Attribution):
        return _from_captum(explainer, model, attribute_kwargs)
    if isinstance(explainer, zennit_core.Composite):
        return _from_zennit(explainer, model, attribute_kwargs)
    if _is_grad_cam(explainer):
        return _from_grad_cam(explainer, model, attribute_kwargs)
    if isinstance(explainer, str):
        attributors.get_class(explainer)
        if model is None:
            raise ManipBenchError(f"{explainer}: pass the model too: "
                                  f"check_robustness({explainer!r}, inputs, model=model)")
        accepted = list(attributors.options(explainer))
        unknown = sorted(set(attribute_kwargs) - set(accepted))
        if unknown:
            raise ManipBenchError(f"{explainer} does not take option(s) {', '.join(unknown)}; it "
                                  f"takes: {', '.join(accepted) or 'none'}")
        shown = ", ".join(f"{k}={_plain(v)!r}" for k, v in attribute_kwargs.items())
        return RecognisedMethod(explainer, dict(attribute_kwargs), model,
                                f"{explainer}({shown})" if shown else explainer)
    if isinstance(explainer, type) and issubclass(explainer, Attribution):
        raise ManipBenchError(f"pass an instance, e.g. {explainer.__name__}(model), not the class")
    raise ManipBenchError(
        f"cannot recognise {type(explainer).__name__!r} as an explanation method. Pass a Captum "
        f"object ({', '.join(SUPPORTED_CAPTUM)}), a Zennit composite "
        f"({', '.join(SUPPORTED_ZENNIT)}) with model=, a pytorch-grad-cam object "
        f"({', '.join(SUPPORTED_GRAD_CAM)}), or a registry name with model=")


def _plain(value):
    """JSON-friendly form of an option value."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


__all__ = ["GRAD_CAM", "SUPPORTED_CAPTUM", "SUPPORTED_GRAD_CAM", "SUPPORTED_ZENNIT",
           "RecognisedMethod", "recognise"]
