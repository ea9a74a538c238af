"""The attributor protocol and the model preparation every attributor shares.

An attributor is called as ``output, relevance = explain(x, target)``. The relevance is
differentiable in ``x`` with correct second-order terms, so a loss on it can be minimised
over ``x`` (double backpropagation). Every attributor works on a private copy of the
caller's model: the caller's module, parameters, hooks and mode are never touched.
"""
import copy

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import _compat, image_size
from ..errors import ManipBenchError
from .activations import (SmoothReLU, functional_relu_of,  # noqa: F401
                          install_functional_activations, rule_active)


def conv2d_input_gradient(module, grad, weight, input_shape, padding=None):
    """Gradient of ``module`` (an ``nn.Conv2d``, here with ``weight``) w.r.t. its input.

    ``padding``: the module's padding as a pair of ints (default ``module.padding``; give it
    where that is a string such as ``"same"``).
    """
    padding = module.padding if padding is None else padding
    output_padding = [
        input_shape[2 + d] - ((grad.shape[2 + d] - 1) * module.stride[d] - 2 * padding[d]
                              + module.dilation[d] * (module.kernel_size[d] - 1) + 1)
        for d in range(2)]
    return F.conv_transpose2d(grad, weight, None, module.stride, padding, output_padding,
                              module.groups, module.dilation)


class _InputOnlyConv2d(torch.autograd.Function):
    """``conv2d`` whose backward gives the input's gradient only, as a ``conv_transpose2d``.

    PyTorch's convolution backward, differentiated again (double backpropagation), also
    computes a weight-gradient-shaped convolution even when no weight needs a gradient.
    On a GPU that one runs as a forward convolution with an image-sized kernel: measured
    on an H100 (VGG-16, 224x224, batch 16) it took two thirds of a Saliency attack step.
    The backward written here differentiates into one plain convolution. While the
    module's ``discard_input_gradient`` is set (an LRP hook replaces that gradient, see
    :mod:`manip_bench.attributors.zennit_fast`), it returns zeros without computing.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        ctx.save_for_backward(weight)
        ctx.module, ctx.input_shape = module, x.shape
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation,
                        module.groups)

    @staticmethod
    def backward(ctx, grad):
        if ctx.module.discard_input_gradient:
            return grad.new_zeros(()).expand(ctx.input_shape), None, None, None
        (weight,) = ctx.saved_tensors
        return conv2d_input_gradient(ctx.module, grad, weight, ctx.input_shape), None, None, None


class FrozenConv2d(nn.Conv2d):
    """``nn.Conv2d`` of a frozen model: same output, no weight gradients, cheap double backprop."""

    #: set only while a backward pass runs whose input gradient for this layer is replaced
    discard_input_gradient = False

    def forward(self, x):
        return _InputOnlyConv2d.apply(x, self.weight, self.bias, self)


def _freezable_conv(module):
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def unwrap(model):
    """The module that computes: ``nn.DataParallel``/``DistributedDataParallel`` wrappers and
    ``torch.compile`` are looked through (explanations need the eager module: compiled
    graphs and scattered replicas cannot be differentiated twice)."""
    while True:
        inner = _compat.uncompiled(model)
        if isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = inner.module
        if inner is model:
            return model
        model = inner


def prepare_model(model, swap_relu=True):
    """Return a private copy of ``model``: eval mode, frozen, ReLUs swapped for ``SmoothReLU``.

    The copy's parameters and buffers are read-only aliases of the caller's tensors (same
    storage, ``requires_grad`` off): modules, hooks, flags and modes are private, the
    weights cost no second copy of memory (528 MB for VGG-16). Weights the caller later
    changes in place (an optimiser step) are therefore seen by the copy; replacing them
    (``.to()``, ``load_state_dict`` with ``assign=True``) is not.
    In-place activations become out-of-place (double backprop needs the inputs).
    Other activations (functional ReLU calls, leaky ReLU, GELU, ...) are reached while
    the copy runs (:mod:`.activations`). Plain ``nn.Conv2d`` layers become
    :class:`FrozenConv2d` (same output and input gradient, faster double
    backpropagation). A ``DataParallel`` or ``torch.compile`` wrapper is looked through
    (:func:`unwrap`).
    """
    if not isinstance(model, nn.Module):
        raise ManipBenchError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    model = unwrap(model)
    try:
        prepared = copy.deepcopy(model, memo=_read_only_aliases(model))
    except Exception as error:  # noqa: BLE001 - any deepcopy failure means the same to the user
        raise ManipBenchError(f"cannot copy the model ({error}); manip-bench never modifies "
                              "the caller's model and needs a deep-copyable nn.Module") from error
    prepared.eval()
    for parameter in prepared.parameters():
        parameter.requires_grad_(False)
    for parent in list(prepared.modules()):
        for name, child in list(parent.named_children()):
            if swap_relu and type(child) is nn.ReLU:
                setattr(parent, name, SmoothReLU())
            elif _freezable_conv(child):
                child.__class__ = FrozenConv2d
            elif hasattr(child, "inplace"):
                child.inplace = False
    return prepared


def _read_only_aliases(model):
    """``deepcopy`` memo mapping each parameter/buffer of ``model`` to a storage-sharing alias."""
    memo = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(parameter.detach(), requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach()
    return memo


def smooth_activations(model):
    """The ``SmoothReLU`` modules of a prepared model."""
    return [module for module in model.modules() if isinstance(module, SmoothReLU)]


def total_relevance(relevance):
    """Sum of the relevance per sample, shape (N,)."""
    return relevance.flatten(1).sum(1)


def conservation_gap(output, relevance, target):
    """Target logit minus total relevance per sample (zero for a conserving LRP rule)."""
    return output.gather(1, target.view(-1, 1)).squeeze(1) - total_relevance(relevance)


class Attributor:
    """Base class: ``explain(x, target) -> (output, relevance)``, differentiable in ``x``.

    Subclasses implement :meth:`attribute` and declare facts the attack engine reads:

    ``library``, ``rule``
        where the method comes from and what it computes (for tables).
    ``needs_softplus``
        a gradient-type map: on a piecewise-linear network (ReLU) it has zero
        derivative in ``x``, so the attack swaps those activations for their smooth
        surrogates (:mod:`.activations`); smooth activations (GELU, SiLU) and attention
        are kept, and a beta-smoothed model (:mod:`manip_bench.defences`) is attacked as
        it is.
    ``attackable``
        False when the map is locally constant in ``x`` (no attack can move it).
    ``preset``
        the attack's paper preset for this method (``manip_bench.attack.PRESETS``).
    """

    name = ""
    library = ""
    rule = ""
    needs_softplus = False
    attackable = True
    not_attackable_reason = ""
    swap_relu = True
    preset = "gradient"
    #: the one architecture a method explains (e.g. "vision transformer"); None: any
    architecture = None
    #: member of the registry's groups ("all", "gradient", ...) that grids run by default
    in_default_groups = True

    def __init__(self, model):
        self.model = prepare_model(model, self.swap_relu)
        self.activations = smooth_activations(self.model)
        hidden = functional_relu_of(self.model)  # a beta-smoothed model's F.relu calls
        if hidden is not None:
            self.activations.append(hidden)
        #: the model computes softplus already (a beta-smoothed model, see
        #: :mod:`manip_bench.defences`): its map is differentiable as it is
        self.smoothed = bool(self.activations) and all(
            a.smoothing is not None for a in self.activations)
        self.functional = None
        if self.needs_softplus and self.swap_relu and not self.smoothed:
            shared = SmoothReLU()  # functional activations follow the swap too
            self.functional = install_functional_activations(self.model, shared)
            self.activations.append(shared)
        self.set_beta(None)
        self._num_classes = {}

    def set_beta(self, beta):
        """Compute piecewise-linear activations through their smooth surrogates at ``beta``
        from now on (``None``: as they are). Smooth activations are never changed."""
        if beta is not None:
            if not self.needs_softplus:
                raise ManipBenchError(
                    f"{self.name}: the softplus surrogate applies to gradient-type methods "
                    "only; smooth the model instead (manip_bench.defences.beta_smooth)")
            if not beta > 0:
                raise ManipBenchError(f"beta must be positive, got {beta}")
        for activation in self.activations:
            activation.beta = beta

    @property
    def swaps_activations(self):
        """Whether a beta changes this network: it has ReLU modules, or an explanation with
        a beta set met piecewise-linear activation calls. False for a network that is
        smooth already (GELU, SiLU, attention): the attack follows its own derivative."""
        swapped_modules = any(a.smoothing is None for a in self.activations
                              if a is not getattr(self.functional, "relu", None))
        return swapped_modules or (self.functional is not None and self.functional.smoothed > 0)

    @property
    def device(self):
        tensor = next(self.model.parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def __call__(self, x, target):
        x, target = self._check_input(x, target)
        try:
            # attention through the math kernel: fused kernels have no double backward
            with sdpa_kernel(SDPBackend.MATH):
                return self.attribute(x, target)
        except RuntimeError as error:
            raise ManipBenchError(
                f"{self.name}: explaining input of shape {tuple(x.shape)} failed ({error}); "
                f"check that the images have the channels and size the model expects") from error

    def attribute(self, x, target):
        """Return ``(output, relevance)`` for validated ``x`` (N, C, H, W) and ``target`` (N,)."""
        raise NotImplementedError

    def check_images(self, x):
        """Raise ManipBenchError unless ``x`` is a finite (N, C, H, W) float tensor that fits
        the model's device and dtype."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ManipBenchError("x must be a floating-point torch.Tensor of shape (N, C, H, W)")
        if x.dim() != 4:
            raise ManipBenchError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
        if x.device != self.device:
            raise ManipBenchError(f"x is on {x.device} but the model is on {self.device}; "
                                  "move them to the same device")
        dtype = next((p.dtype for p in self.model.parameters()), x.dtype)
        if x.dtype != dtype:
            raise ManipBenchError(f"x is {x.dtype} but the model's weights are {dtype}; pass "
                                  f"x.to({dtype}) (or convert the model)")
        if not torch.isfinite(x).all():
            raise ManipBenchError("x contains NaN or infinite values")
        first_conv = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None and first_conv.in_channels != x.shape[1]:
            raise ManipBenchError(
                f"x has {x.shape[1]} channel(s) but the model's first convolution takes "
                f"{first_conv.in_channels}; pass images of shape (N, {first_conv.in_channels}, "
                "H, W)")

    def _check_input(self, x, target):
        self.check_images(x)
        if isinstance(target, int):
            target = torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
        if not isinstance(target, torch.Tensor) or target.dtype not in (torch.long, torch.int):
            raise ManipBenchError("target must be an int or an integer tensor of shape (N,)")
        target = target.to(device=x.device, dtype=torch.long).reshape(-1)
        if target.shape[0] != x.shape[0]:
            raise ManipBenchError(
                f"target has {target.shape[0]} entries for a batch of {x.shape[0]} images")
        num_classes = self.num_classes(x)
        if target.min() < 0 or target.max() >= num_classes:
            raise ManipBenchError(f"target must be a class index in [0, {num_classes}), "
                                  f"got {target.tolist()}")
        return x, target

    def num_classes(self, x):
        """Number of model outputs for inputs shaped like ``x`` (one small forward per new shape)."""
        shape = tuple(x.shape[1:])
        if shape not in self._num_classes:
            try:
                with torch.no_grad():
                    output = self.model(x[:1].detach())
            except image_size.FORWARD_ERRORS as error:  # names the sizes the model takes
                raise image_size.does_not_fit(self.model, x.detach(), error) from error
            if output.dim() != 2:
                raise ManipBenchError(
                    f"the model must return logits of shape (N, classes), got {tuple(output.shape)}")
            self._num_classes[shape] = output.shape[1]
        return self._num_classes[shape]


def input_with_grad(x):
    """``x`` itself when it is part of a graph, else a detached copy that requires grad."""
    return x if x.requires_grad else x.detach().requires_grad_()


def one_hot(target, output):
    """One-hot rows of ``target`` shaped and typed like ``output``."""
    return F.one_hot(target, output.shape[1]).to(output.dtype)
