"""The robustness check as a Quantus-style metric, :class:`ManipulationRobustness` (no Quantus)."""
import math

import numpy as np
import torch
from captum.attr import (
    LRP,
    Attribution,
    DeepLift,
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)

from ..errors import ManipBenchError
from ..threat import DEFAULT_BUDGET
from .check import DEFAULT_ITERATIONS, _device, check_robustness

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

        metric = ManipulationRobustness(iterations=200, budget="8/255")
        scores = metric(model, x_batch, y_batch, explain_func=Saliency)   # list of floats

    Each score is ``s_i`` of :func:`check_robustness` (:mod:`manip_bench.manipulability`;
    NaN for an input whose prediction is not ``y_batch[i]``, or whose own map already
    matches its target). ``a_batch`` is accepted and ignored: the attack needs its own,
    differentiable maps. The method comes from ``explain_func`` -- a Captum attribution
    class or object, a Zennit composite, a registry name, or ``quantus.explain`` with
    ``explain_func_kwargs={"method": "Saliency", ...}`` (Saliency, Gradient, InputXGradient,
    GuidedBackprop, IntegratedGradients, GradientShap, LRP) -- or else from ``method``.
    """

    score_direction = "lower"

    def __init__(self, method=None, iterations=DEFAULT_ITERATIONS, budget=DEFAULT_BUDGET,
                 lr=None, seed=0, return_aggregate=False, aggregate_func=np.nanmedian,
                 **attribute_kwargs):
        self.method, self.attribute_kwargs = method, attribute_kwargs
        self.options = dict(iterations=iterations, budget=budget, lr=lr, seed=seed)
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


__all__ = ["ManipulationRobustness"]
