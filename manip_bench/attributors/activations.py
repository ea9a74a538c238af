"""Activation families: which ones the attack must smooth, and the beta-smooth version of each.

A gradient-type explanation is differentiable in the input exactly when the network's
activations have a second derivative. Piecewise-linear activations (ReLU, leaky ReLU,
PReLU, ReLU6, hardtanh, hardsigmoid, and hardswish's linear pieces) have none, so the
attack computes them through a smooth surrogate built from Softplus(beta); smooth
activations (GELU, SiLU, ELU, Mish, tanh, ...) and products (attention, gates) are kept
as they are. :data:`FAMILIES` is the one table of these facts; everything else reads it.

Each family has one beta-parametrised smooth version with **peak curvature beta / 4**
(the maximum of its second derivative), the value Softplus(beta) has at 0:

* piecewise-linear families: every kink ``relu(x - k)`` becomes ``softplus_beta(x - k)``
  (leaky ReLU ``a x + (1 - a) relu(x)``, ReLU6 ``relu(x) - relu(x - 6)``, ...);
* SiLU ``x sigmoid(x)`` and GELU ``x Phi(x)`` by a temperature: ``f(c x) / c``, whose
  peak curvature is ``c`` times the original's (SiLU 1/2, GELU 2 phi(0) = 0.798), so
  ``c = beta / 2`` (SiLU) and ``c = beta sqrt(2 pi) / 8`` (GELU). The original network is
  the one at beta = 2 (SiLU) and beta = 3.19 (GELU); smaller beta smooths it further.

This equal-peak-curvature parametrisation makes one beta mean the same for every family,
which the beta-smoothing defence (:mod:`manip_bench.defences`) relies on. Other smooth
activations (ELU, Mish, tanh, sigmoid, ...) have no beta version: the defence leaves them
as they are.

How calls are reached: ``nn.ReLU`` modules of a prepared copy are swapped for
:class:`SmoothReLU` (Zennit and Captum still see a ReLU; guided backprop's rule lives in
its backward). Everything else -- ``F.relu`` calls and every other family, whose modules
(``nn.LeakyReLU``, ``nn.ReLU6``, ``nn.GELU``, ...) call their functional form -- goes
through :class:`FunctionalActivations`, a ``TorchFunctionMode`` active only while the
prepared copy runs, so a user's ``forward`` needs no editing.
"""
import contextlib
import dataclasses
import inspect
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..errors import ManipBenchError


def _kinks(x, beta, kinks, slope=0.0):
    """``slope * x + sum_k sign_k * softplus_beta(x - k)``: the smooth form of a sum of kinks."""
    out = slope * x if slope else 0.0
    for offset, sign in kinks:
        out = out + sign * F.softplus(x - offset, beta)
    return out


def _relu(beta, input, inplace=False):  # noqa: A002 - torch's argument names
    return F.softplus(input, beta)


def _leaky_relu(beta, input, negative_slope=0.01, inplace=False):  # noqa: A002
    return negative_slope * input + (1 - negative_slope) * F.softplus(input, beta)


def _prelu(beta, input, weight):  # noqa: A002
    if weight.numel() > 1:  # one slope per channel (dimension 1)
        weight = weight.view(1, -1, *([1] * (input.dim() - 2)))
    return weight * input + (1 - weight) * F.softplus(input, beta)


def _rrelu(beta, input, lower=1 / 8, upper=1 / 3, training=False, inplace=False):  # noqa: A002
    if training:
        raise ManipBenchError("rrelu in training mode draws random slopes; explain the model "
                              "in eval mode")
    return _leaky_relu(beta, input, (lower + upper) / 2)


def _hardtanh(beta, input, min_val=-1.0, max_val=1.0, inplace=False):  # noqa: A002
    return min_val + _kinks(input, beta, ((min_val, 1), (max_val, -1)))


def _relu6(beta, input, inplace=False):  # noqa: A002
    return _kinks(input, beta, ((0.0, 1), (6.0, -1)))


def _hardsigmoid(beta, input, inplace=False):  # noqa: A002
    return _kinks(input, beta, ((-3.0, 1), (3.0, -1))) / 6


def _hardswish(beta, input, inplace=False):  # noqa: A002
    return input * _hardsigmoid(beta, input)


#: peak curvature (max second derivative) of SiLU and GELU at temperature 1
SILU_PEAK_CURVATURE = 0.5
GELU_PEAK_CURVATURE = 2 / math.sqrt(2 * math.pi)


def temperature(beta, peak_curvature):
    """``c`` with peak curvature ``c * peak_curvature == beta / 4`` (see the module doc)."""
    return beta / (4 * peak_curvature)


def _silu(beta, input, inplace=False):  # noqa: A002
    c = temperature(beta, SILU_PEAK_CURVATURE)
    return F.silu(c * input) / c


def _gelu(beta, input, approximate="none"):  # noqa: A002
    c = temperature(beta, GELU_PEAK_CURVATURE)
    return F.gelu(c * input, approximate=approximate) / c


@dataclasses.dataclass(frozen=True)
class Family:
    """One activation family.

    ``functions``: the torch functions that compute it (modules call these);
    ``in_place``: those among them that always write into their input;
    ``piecewise_linear``: zero second derivative, so the attack swaps it for its smooth
    version; ``smooth(beta, *args, **kwargs)``: that version, called with the original's
    arguments, peak curvature ``beta / 4``; ``routed``: computed by the
    :class:`SmoothReLU` that holds the beta (ReLU: guided backprop's rule lives there).
    """

    name: str
    functions: tuple
    smooth: object
    piecewise_linear: bool = True
    in_place: tuple = ()
    routed: bool = False

    def in_place_call(self, func, args, kwargs):
        """Whether ``func(*args, **kwargs)`` writes into its input."""
        bound = inspect.signature(self.smooth).bind(None, *args, **kwargs).arguments
        return func in self.in_place or bool(bound.get("inplace", False))


FAMILIES = (
    Family("relu", (F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.relu_,
                    torch.Tensor.relu_), _relu, in_place=(F.relu_, torch.relu_,
                                                           torch.Tensor.relu_), routed=True),
    Family("leaky_relu", (F.leaky_relu, F.leaky_relu_), _leaky_relu, in_place=(F.leaky_relu_,)),
    Family("prelu", (F.prelu, torch.prelu), _prelu),
    Family("rrelu", (F.rrelu, F.rrelu_), _rrelu, in_place=(F.rrelu_,)),
    Family("hardtanh", (F.hardtanh, F.hardtanh_), _hardtanh, in_place=(F.hardtanh_,)),
    Family("relu6", (F.relu6,), _relu6),
    Family("hardsigmoid", (F.hardsigmoid,), _hardsigmoid),
    Family("hardswish", (F.hardswish,), _hardswish),
    Family("silu", (F.silu,), _silu, piecewise_linear=False),
    Family("gelu", (F.gelu,), _gelu, piecewise_linear=False),
)
#: torch function -> its family
FAMILY_OF = {function: family for family in FAMILIES for function in family.functions}


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
#: more layer) of a beta-smoothed copy: the SmoothReLU its functional calls go through
FUNCTIONAL_RELU = "manip_bench_functional_relu"


def functional_relu_of(model):
    """The SmoothReLU that a beta-smoothed model's functional activations follow, else None."""
    return model.__dict__.get(FUNCTIONAL_RELU)


class SmoothReLU(nn.ReLU):
    """A ReLU that becomes Softplus(beta) when ``beta`` is set (cheap to change per step).

    ``backward_rule`` ("guided" or "deconv") replaces the backward pass while
    ``rule_active`` is set (guided backpropagation, deconvolution). Being an ``nn.ReLU``
    subclass, Zennit and Captum still treat it as an activation. ``smoothing`` is the
    beta of a beta-smoothed model (:mod:`manip_bench.defences`), fixed for its lifetime.
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


class FunctionalActivations(TorchFunctionMode):
    """Route activation calls of every family through its smooth version while active.

    ``relu`` (a :class:`SmoothReLU`) holds the beta: ReLU calls go through it (so that its
    backward rule applies), other piecewise-linear families use their smooth version at
    its ``beta`` (surrogate or smoothing), and smooth families (SiLU, GELU) theirs only at
    its ``smoothing`` (a beta-smoothed model; the attack's surrogate leaves them alone).
    In-place forms write the result back into their input, computed on a copy so that
    the graph keeps the values it needs. ``calls`` counts the functional ReLUs seen,
    ``smoothed`` the calls that computed a smooth version.
    """

    def __init__(self, relu):
        super().__init__()
        self.relu, self.calls, self.smoothed = relu, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        family = FAMILY_OF.get(func)
        if _MODULE_CALLS[0] or family is None:
            return func(*args, **kwargs)
        beta = self.relu.beta if family.piecewise_linear else self.relu.smoothing
        self.calls += family.routed
        if beta is None and not family.routed:
            return func(*args, **kwargs)
        inplace = family.in_place_call(func, args, kwargs)
        x = args[0]
        source = x.clone() if inplace else x
        if family.routed:
            value = self.relu(source)
        else:
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
            value = family.smooth(beta, source, *args[1:], **kwargs)
        if beta is not None:
            self.smoothed += 1
        return x.copy_(value) if inplace else value


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
