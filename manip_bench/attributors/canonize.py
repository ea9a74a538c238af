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

Operations Zennit has no rule for (LayerNorm, GELU/SiLU and other smooth activations,
attention, gates that multiply two input-dependent tensors) are found in the same pass,
and :func:`canonize` refuses the model naming the module that ran them: plain gradient
flow through them would give a map that is neither LRP nor conserving.

The canonized copy must compute the original logits on the probe images, or
:func:`canonize` refuses with a message. It is returned wrapped in a
:class:`CanonicalModel` that holds the ``Sum`` modules: nothing is added to the model's
own module tree, where a ``forward`` that runs its children (``nn.Sequential``) would
run them.
"""
import dataclasses

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from zennit.canonizers import MergeBatchNorm
from zennit.layer import Sum
from zennit.types import Activation, BatchNorm, Linear

from ..errors import ManipBenchError

_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
        torch.Tensor.__iadd__, torch.Tensor.add_}
_MULTIPLY = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
             torch.Tensor.__imul__, torch.Tensor.mul_, torch.matmul, torch.Tensor.matmul,
             torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.einsum}
F = torch.nn.functional
#: operations that no LRP rule of Zennit's composites covers, by what they compute
_NO_RULE = {
    F.layer_norm: "layer normalisation", F.group_norm: "group normalisation",
    F.instance_norm: "instance normalisation", F.local_response_norm: "local response norm",
    F.softmax: "softmax (attention)", torch.softmax: "softmax (attention)",
    torch.Tensor.softmax: "softmax (attention)",
    F.scaled_dot_product_attention: "attention", F.multi_head_attention_forward: "attention",
}
#: element-wise non-linearities: covered (Zennit's Pass rule, the identity rule) when an
#: activation module computes them, plain gradient flow when a forward calls them itself
_ELEMENTWISE = {
    F.gelu: "GELU", F.silu: "SiLU", F.mish: "Mish", F.elu: "ELU", F.selu: "SELU",
    F.celu: "CELU", F.hardswish: "hardswish", F.hardsigmoid: "hard sigmoid",
    torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", torch.Tensor.tanh: "tanh", F.tanh: "tanh",
}


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


class Unsupported(TorchFunctionMode):
    """Record the operations no Zennit rule covers, with the module whose forward ran them.

    ``modules`` is a stack of the module calls in progress (kept by forward hooks); a
    product of two input-dependent tensors (a gate, attention's bilinear products) counts
    too. ``found`` lists ``(module name, what)`` in forward order.
    """

    def __init__(self, names):
        super().__init__()
        self.names, self.modules, self.found = names, [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        module = self.modules[-1] if self.modules else None
        what = _NO_RULE.get(func)
        if func in _ELEMENTWISE and not isinstance(module, Activation):
            what = f"{_ELEMENTWISE[func]} outside an activation module"
        if what is None and func in _MULTIPLY:
            tensors = [a for a in (*args, *kwargs.values()) if _branch(a)]
            if func is torch.einsum:
                tensors = [a for a in args[1:] if _branch(a)]
            what = "a product of two input-dependent tensors (a gate or attention)" \
                if len(tensors) > 1 else None
        if what is not None:
            name = self.names.get(module, "")
            self.found.append((f"module '{name}'" if name else "the model's own forward", what))
        return func(*args, **kwargs)


class CanonicalModel(nn.Module):
    """A canonized copy: ``net`` runs with its residual additions routed through ``sums``."""

    def __init__(self, net, sums):
        super().__init__()
        self.net, self.sums = net, sums

    def forward(self, *args, **kwargs):
        mode = ResidualSums(self.sums)
        with mode:
            output = self.net(*args, **kwargs)
        if mode.count not in (0, len(self.sums)):
            raise ManipBenchError(
                f"the model ran {mode.count} residual additions, {len(self.sums)} when it was "
                "canonized for LRP; a forward pass whose structure depends on the input "
                "cannot be explained with LRP here")
        return output


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
    """One forward pass: batch norms fed by a linear layer, additions, linear resolutions,
    operations without an LRP rule."""
    produced, pairs, resolutions, handles = {}, [], {}, []
    names = {module: name for name, module in model.named_modules()}
    unsupported = Unsupported(names)

    def enter(module, inputs):
        unsupported.modules.append(module)

    def leave(module, inputs, output):
        unsupported.modules.pop()

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
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
        if not list(module.children()):
            handles.append(module.register_forward_hook(after))
            if isinstance(module, BatchNorm):
                handles.append(module.register_forward_pre_hook(before_norm))
    counter = ResidualSums()
    try:
        with torch.enable_grad(), counter, unsupported:
            model(x.detach().requires_grad_())
    finally:
        for handle in handles:
            handle.remove()
    return pairs, counter.count, resolutions, unsupported.found


def _refuse_unsupported(found):
    name, what = found[0]
    others = len({n for n, _ in found}) - 1
    more = f" (and {others} other module(s))" if others > 0 else ""
    raise ManipBenchError(
        f"LRP cannot explain this model: {name} computes {what}{more}, which Zennit's "
        "composites have no rule for, so its map would be neither LRP nor conserving. For "
        "transformers use the AttnLRP attributors (lrp.attnlrp), for other networks a "
        "gradient method (captum.saliency, captum.input_x_gradient, ...)")


def canonize(model, x, merge_and_sum=True):
    """Canonize the private copy ``model`` for LRP, probing with images ``x``.

    With ``merge_and_sum`` batch norms are merged (in place) and residual additions routed
    through ``Sum`` modules; the input map is always recognised, and operations without an
    LRP rule are refused. Returns ``(canonized, found)``: the model to explain (a
    :class:`CanonicalModel` around ``model`` when it has additions, else ``model``) and a
    :class:`Canonical`.
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
    pairs, additions, found.resolutions, unsupported = _watch(model, x)
    if unsupported:
        _refuse_unsupported(unsupported)
    if not merge_and_sum:
        return model, found
    for linear, norm in pairs:
        MergeBatchNorm.merge_batch_norm([linear], norm)
    found.merged_batch_norms, found.additions = len(pairs), additions
    canonized = model
    if additions:
        canonized = CanonicalModel(model, nn.ModuleList(Sum() for _ in range(additions)))
    with torch.enable_grad():
        output = canonized(x.requires_grad_())
    if not torch.allclose(output, reference, rtol=1e-3,
                          atol=1e-4 * max(reference.abs().max().item(), 1.0)):
        raise ManipBenchError(
            "canonizing the model for LRP changed its output (merged batch norms: "
            f"{len(pairs)}, residual additions: {additions}); pass canonizers=None to use "
            "the model as it is, or your own Zennit canonizers")
    return canonized, found


def resolution_blocks(resolutions):
    """Group layer names into blocks by output resolution, in forward order (VGG blocks,
    ResNet stages). Returns a list of ``(resolution, [names])``."""
    blocks = {}
    for name, shape in resolutions.items():
        blocks.setdefault(shape, []).append(name)
    return list(blocks.items())
