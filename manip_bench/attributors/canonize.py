"""A user's model made ready for LRP, found by what it computes rather than by class names.

LRP rules assume a chain of linear layers and activations. Three common things in real
models break that assumption silently; :func:`canonize` finds each by watching one forward
pass of the private model copy (no ``torch.fx`` trace, so any Python ``forward`` works):

residual additions
    ``a + b``, ``a += b``, ``torch.add(a, b)``, ``a.add_(b)`` with both operands computed
    from the input. Plain gradient flow copies the relevance into both branches, so it
    multiplies at every skip connection. Each addition is routed through its own Zennit
    ``Sum`` module, which the composites give the ``Norm`` rule (relevance split in
    proportion to each branch's contribution), as Zennit's ResNet canonizer does for
    torchvision's blocks. :class:`ResidualSums`, a ``TorchFunctionMode`` active only while
    the copy runs, does the routing.
batch norm right after a linear layer
    found by tensor identity (the norm's input *is* the layer's output) and merged into
    the layer with Zennit's ``MergeBatchNorm``, whatever the modules are called.
input normalisation
    whatever the model does to the image before its first linear layer, when it is an
    elementwise affine map ``z = slope * x + offset`` (a per-channel normalisation, a
    rescaling to [-1, 1], or nothing): it gives the first layer's input bounds for [0, 1]
    images (the zB / box rules need them), and the relevance reaching the first layer's
    input is handed to the image unchanged, as Zennit's ``Pass`` rule would.

The canonized copy must compute the original logits on the probe images, or
:func:`canonize` refuses with a message.
"""
import dataclasses

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from zennit.canonizers import MergeBatchNorm
from zennit.layer import Sum
from zennit.types import BatchNorm, Linear

from ..errors import ManipBenchError

_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
        torch.Tensor.__iadd__, torch.Tensor.add_}


def _branch(value):
    """A tensor computed from the input (the prepared copy's weights never require grad)."""
    return isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point()


class ResidualSums(TorchFunctionMode):
    """Route additions of two input-dependent tensors through ``sums`` (Zennit ``Sum``).

    With ``sums=None`` the additions are only counted (``count``). The ``i``-th addition of
    a forward pass goes through ``sums[i]``; a forward with another number of additions
    than the model was canonized with is refused.
    """

    def __init__(self, sums=None):
        super().__init__()
        self.sums, self.count = sums, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _ADD or len(args) != 2 or kwargs or not (_branch(args[0])
                                                                 and _branch(args[1])):
            return func(*args, **kwargs)
        index, self.count = self.count, self.count + 1
        if self.sums is None:
            return func(*args)
        if index >= len(self.sums):
            raise ManipBenchError(
                f"the model ran more residual additions ({index + 1}) than when it was "
                f"canonized for LRP ({len(self.sums)}); a forward pass whose structure "
                f"depends on the input cannot be explained with LRP here")
        total = self.sums[index](torch.stack(torch.broadcast_tensors(*args), dim=-1))
        return args[0].copy_(total) if func is torch.Tensor.add_ else total


@dataclasses.dataclass
class Canonical:
    """What :func:`canonize` found and changed in a model copy.

    ``slope``/``offset`` describe the map from the image to the first linear layer's input
    (``None`` when it is not elementwise affine); ``resolutions`` is each linear layer's
    output spatial shape, in the order the forward pass reaches them.
    """

    additions: int = 0
    merged_batch_norms: int = 0
    first_layer: str = ""
    slope: torch.Tensor = None
    offset: torch.Tensor = None
    resolutions: dict = dataclasses.field(default_factory=dict)

    def bounds(self):
        """``(low, high)`` of the first layer's input for [0, 1] images, or ``None``."""
        if self.slope is None:
            return None
        ends = torch.stack([self.offset, self.offset + self.slope])
        low, high = ends.amin(0), ends.amax(0)
        if torch.equal(low, low[..., :1, :1].expand_as(low)) and \
                torch.equal(high, high[..., :1, :1].expand_as(high)):
            low, high = low[..., :1, :1], high[..., :1, :1]  # per channel
        return low, high

    def describe(self):
        """Plain data for results files."""
        return {"residual_additions": self.additions,
                "merged_batch_norms": self.merged_batch_norms,
                "first_layer": self.first_layer,
                "input_affine": self.slope is not None}


def first_linear(model):
    """Name and module of the first linear layer in module order (Zennit's "first layer")."""
    return next(((name, module) for name, module in model.named_modules()
                 if isinstance(module, Linear)), ("", None))


class _Stop(Exception):
    pass


def _first_layer_input(model, layer, x):
    """The input ``layer`` receives when ``model`` runs on ``x`` (``None`` if it never runs)."""
    captured = {}

    def stop(module, inputs):
        captured["input"] = inputs[0].detach()
        raise _Stop

    handle = layer.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured.get("input")


def input_affine_map(model, layer, x, seed=0):
    """``(slope, offset)`` with ``layer``'s input ``= slope * x + offset`` elementwise, or ``None``.

    Checked on all-zero, all-one and one random image shaped like ``x[:1]``.
    """
    zeros = torch.zeros_like(x[:1])
    generator = torch.Generator().manual_seed(seed)
    probe = torch.rand(zeros.shape, generator=generator, dtype=x.dtype).to(x.device)
    at_zero = _first_layer_input(model, layer, zeros)
    at_one = _first_layer_input(model, layer, torch.ones_like(zeros))
    at_probe = _first_layer_input(model, layer, probe)
    if at_zero is None or at_zero.shape != zeros.shape:
        return None
    slope = at_one - at_zero
    scale = max(at_zero.abs().max().item(), at_one.abs().max().item(), 1.0)
    if not torch.allclose(at_probe, at_zero + slope * probe, rtol=1e-4, atol=1e-5 * scale) \
            or not (slope.abs() > 1e-12).all():
        return None
    return slope, at_zero


def _watch(model, x):
    """One forward pass: batch norms fed by a linear layer, additions, linear resolutions."""
    produced, pairs, resolutions, handles = {}, [], {}, []
    names = {module: name for name, module in model.named_modules()}

    def after(module, inputs, output):
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (module, output)
            if isinstance(module, Linear) and output.dim() > 2:
                resolutions.setdefault(names[module], tuple(output.shape[2:]))

    def before_norm(module, inputs):
        source = produced.get(id(inputs[0]))
        if source is not None and source[1] is inputs[0] and isinstance(source[0], Linear) \
                and getattr(module, "running_mean", None) is not None:
            pairs.append((source[0], module))

    for module in model.modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(after))
            if isinstance(module, BatchNorm):
                handles.append(module.register_forward_pre_hook(before_norm))
    counter = ResidualSums()
    try:
        with torch.enable_grad(), counter:
            model(x.detach().requires_grad_())
    finally:
        for handle in handles:
            handle.remove()
    return pairs, counter.count, resolutions


def canonize(model, x, merge_and_sum=True):
    """Canonize the private copy ``model`` in place for LRP, probing with images ``x``.

    With ``merge_and_sum`` batch norms are merged and residual additions routed through
    ``Sum`` modules; the input map is always recognised. Returns a :class:`Canonical`.
    """
    x = x[:2].detach()
    name, layer = first_linear(model)
    found = Canonical(first_layer=name)
    if layer is not None:
        affine = input_affine_map(model, layer, x)
        if affine is not None:
            found.slope, found.offset = affine
    with torch.no_grad():
        reference = model(x)
    pairs, additions, found.resolutions = _watch(model, x)
    if not merge_and_sum:
        return found
    for linear, norm in pairs:
        MergeBatchNorm.merge_batch_norm([linear], norm)
    found.merged_batch_norms = len(pairs)
    if additions:
        sums = nn.ModuleList(Sum() for _ in range(additions))
        model.add_module("canonical_sums", sums)
        _route_additions(model, sums)
    found.additions = additions
    with torch.enable_grad():
        canonized = model(x.requires_grad_())
    if not torch.allclose(canonized, reference, rtol=1e-3,
                          atol=1e-4 * max(reference.abs().max().item(), 1.0)):
        raise ManipBenchError(
            "canonizing the model for LRP changed its output (merged batch norms: "
            f"{len(pairs)}, residual additions: {additions}); pass canonizers=None to use "
            "the model as it is, or your own Zennit canonizers")
    return found


def _route_additions(model, sums):
    """Make the copy's ``forward`` run under :class:`ResidualSums` (wrapped on the instance)."""
    forward = model.forward

    def forward_with_sums(*args, **kwargs):
        mode = ResidualSums(sums)
        with mode:
            output = forward(*args, **kwargs)
        if mode.count not in (0, len(sums)):
            raise ManipBenchError(
                f"the model ran {mode.count} residual additions, {len(sums)} when it was "
                "canonized for LRP; a forward pass whose structure depends on the input "
                "cannot be explained with LRP here")
        return output

    model.forward = forward_with_sums


def resolution_blocks(resolutions):
    """Group layer names into blocks by output resolution, in forward order (VGG blocks,
    ResNet stages). Returns a list of ``(resolution, [names])``."""
    blocks = {}
    for name, shape in resolutions.items():
        blocks.setdefault(shape, []).append(name)
    return list(blocks.items())
