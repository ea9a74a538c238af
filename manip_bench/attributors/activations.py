"""ReLU activations that become Softplus(beta) on demand: modules and functional calls alike.

:class:`SmoothReLU` replaces every ``nn.ReLU`` module of a prepared model. Models that call
``F.relu``, ``torch.relu``, ``Tensor.relu`` or their in-place forms inside ``forward`` are
covered by :class:`FunctionalActivations`, a ``TorchFunctionMode`` active only while the
prepared model runs, which routes those calls through one shared :class:`SmoothReLU`. So
the softplus swap (the attack's beta growth, beta-smoothing) reaches every ReLU without
editing the user's code. Piecewise-linear activations that have no smooth counterpart here
(leaky ReLU, ReLU6, hardtanh, ...) are refused while a beta is set: their second derivative
is zero, so an attack would have no curvature to follow and report a false robustness.
"""
import contextlib

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..errors import ManipBenchError

class _RuleBackward(torch.autograd.Function):
    """ReLU/softplus whose backward follows ``module.backward_rule`` while ``module.rule_active``.

    The rule (guided backprop, deconvolution) must shape only the explanation's own
    backward pass. Any later backward through the forward path (the attack's second
    backward) gets the true derivative, because the rule is switched off by then. Both
    backwards are written in differentiable operations, so the explanation's backward
    can itself be differentiated (``create_graph=True``).
    """

    @staticmethod
    def forward(ctx, x, module):
        ctx.save_for_backward(x)
        ctx.module, ctx.beta = module, module.beta
        return F.relu(x) if module.beta is None else F.softplus(x, module.beta)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        local = (x > 0).to(grad.dtype) if ctx.beta is None else torch.sigmoid(ctx.beta * x)
        rule = ctx.module.backward_rule if ctx.module.rule_active else None
        if rule == "deconv":
            return grad.clamp(min=0), None
        if rule == "guided":
            return grad.clamp(min=0) * local, None
        return grad * local, None


#: depth of SmoothReLU module calls in progress: their own F.relu is not intercepted again
_MODULE_CALLS = [0]


#: attribute of a beta-smoothed copy (:mod:`manip_bench.defences`) holding its beta
SMOOTHING_ATTRIBUTE = "manip_bench_smoothing"
#: plain attribute (not a registered submodule: an ``nn.Sequential`` would run it as one
#: more layer) of a beta-smoothed copy: the SmoothReLU its functional ReLU calls go through
FUNCTIONAL_RELU = "manip_bench_functional_relu"


def functional_relu_of(model):
    """The SmoothReLU that a beta-smoothed model's ``F.relu`` calls go through, else None."""
    return model.__dict__.get(FUNCTIONAL_RELU)


class SmoothReLU(nn.ReLU):
    """A ReLU that becomes Softplus(beta) when ``beta`` is set (cheap to change per step).

    ``backward_rule`` ("guided" or "deconv") replaces the backward pass while
    ``rule_active`` is set (guided backpropagation, deconvolution). Being an ``nn.ReLU``
    subclass, Zennit and Captum still treat it as an activation.
    """

    def __init__(self, smoothing=None):
        super().__init__(inplace=False)
        self.smoothing = smoothing
        self.beta = None
        self.backward_rule = None
        self.rule_active = False

    @property
    def beta(self):
        """Softplus beta in use: the model's own ``smoothing`` when set (a beta-smoothed
        model, :mod:`manip_bench.defences`), else the attack's surrogate beta (or None: ReLU)."""
        return self.smoothing if self.smoothing is not None else self._surrogate_beta

    @beta.setter
    def beta(self, value):
        self._surrogate_beta = value

    def forward(self, x):
        _MODULE_CALLS[0] += 1
        try:
            if self.backward_rule is not None:
                return _RuleBackward.apply(x, self)
            return F.relu(x) if self.beta is None else F.softplus(x, self.beta)
        finally:
            _MODULE_CALLS[0] -= 1

    def extra_repr(self):
        return f"smoothing={self.smoothing}, beta={self.beta}, backward_rule={self.backward_rule}"


_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}
#: activations with zero second derivative and no softplus counterpart here
_PIECEWISE_LINEAR = {F.leaky_relu, F.leaky_relu_, torch.nn.functional.relu6, F.hardtanh,
                     F.hardtanh_, F.hardswish, F.prelu, F.rrelu, F.rrelu_}


class FunctionalActivations(TorchFunctionMode):
    """Route functional ReLU calls through ``relu`` (a :class:`SmoothReLU`) while active.

    In-place forms write the result back into their input (as ``relu_`` would), computed
    on a copy so that the softplus graph keeps the values it needs. ``calls`` counts the
    functional ReLUs seen.
    """

    def __init__(self, relu):
        super().__init__()
        self.relu, self.calls = relu, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _MODULE_CALLS[0] or not (func in _RELU or func in _RELU_INPLACE):
            if self.relu.beta is not None and func in _PIECEWISE_LINEAR:
                raise ManipBenchError(
                    f"the model uses {getattr(func, '__name__', func)}, a piecewise-linear "
                    f"activation with zero second derivative that cannot be swapped for "
                    f"softplus; gradient-type explanations of it cannot be attacked or "
                    f"beta-smoothed (use ReLU or a smooth activation such as GELU)")
            return func(*args, **kwargs)
        self.calls += 1
        x = args[0]
        inplace = func in _RELU_INPLACE or kwargs.get("inplace", False) or \
            (func is F.relu and len(args) > 1 and args[1])
        if not inplace:
            return self.relu(x)
        return x.copy_(self.relu(x.clone()))


def install_functional_activations(model, relu):
    """Make ``model`` (a private copy) run its forward under :class:`FunctionalActivations`.

    The copy's ``forward`` is wrapped on the instance (no hooks): the mode is active
    exactly while the model computes, and left also when the forward raises.
    """
    mode = FunctionalActivations(relu)
    forward = model.forward

    def forward_with_smooth_activations(*args, **kwargs):
        with mode:
            return forward(*args, **kwargs)

    model.forward = forward_with_smooth_activations
    return mode


@contextlib.contextmanager
def rule_active(modules):
    """Switch on ``rule_active`` of ``modules`` for the explanation's own backward pass only."""
    for module in modules:
        module.rule_active = True
    try:
        yield
    finally:
        for module in modules:
            module.rule_active = False


