"""Zennit's LRP rules with less work per explanation (same relevance, same graph in x).

Zennit's ``BasicHook.backward`` re-runs each hooked layer once per rule branch inside the
backward pass and differentiates those re-runs with ``torch.autograd.grad``. For the
attack's double backpropagation, five things in that are pure overhead on the frozen
private model copy an attributor owns, and :class:`FastRule` removes them:

1. **Modified weights are rebuilt on every call** (``ParamMod`` wraps ``W.clamp(min=0)``
   and the like in new ``nn.Parameter`` objects that *require grad*, so the attack's
   backward also computes and accumulates weight gradients for every copy).
   :class:`FrozenParams` computes each modified tensor once per (module, modification),
   without grad, and recomputes it only if the module's own parameters change.
2. **Branches that are exactly zero are computed.** ZPlus, AlphaBeta and Gamma split the
   layer input into ``x.clamp(min=0)`` and ``x.clamp(max=0)``; after a ReLU the second is
   all zeros, and its branch (with the bias zeroed, as those rules do) contributes exactly
   zero. It is skipped when the layer input is a ReLU output (:func:`_after_relu`, read
   from the autograd graph, so no device synchronisation).
3. **Branches that repeat the forward pass are recomputed.** Epsilon's single branch and
   Gamma's sign mask are the layer's own forward output, which is reused; on a ReLU
   output, Gamma's two live branches are the forward output plus or minus one shared
   convolution (:meth:`FastRule._gamma_after_relu`).
4. **The input gradient of each branch goes through autograd.** Differentiating a
   convolution's backward again makes PyTorch also compute a weight-gradient-shaped
   convolution nobody asked for (on a GPU with cuDNN, at 224x224, a pathologically slow
   one: measured 23 ms per call on an H100 for each of ZBox's three first-layer branches
   at batch 16); for ``nn.Conv2d`` / ``nn.Linear`` the branch gradient is written out
   (``conv_transpose2d`` / matrix product), whose own derivative is one convolution. This
   holds for every rule whose output modifiers are the identity (all of Zennit's).
5. **The layer's own input gradient is computed and thrown away**: autograd runs each
   layer's backward before Zennit's hook replaces its result. For the prepared copy's
   ``FrozenConv2d`` layers that backward returns zeros instead while the explanation's
   backward runs (:func:`replaced_input_gradients`).

Everything else (stabilisers, gradient mappers, reducers: the rule itself) is Zennit's own
code. The relevance equals Zennit's to rounding, and so does its derivative in x (a
skipped branch's derivative is nonzero only at the ReLU's zeros, where the ReLU passes
no gradient). Layers of other types use Zennit's backward unchanged.
The rule layouts below are those of Zennit 0.5.1, which ``setup.cfg`` pins.
"""
import contextlib
import weakref

import torch
from torch import nn
from torch.nn import functional as F
from zennit.core import BasicHook, ParamMod
from zennit.rules import AlphaBeta, ClampMod, Epsilon, Gamma, ZPlus

from .base import FrozenConv2d, conv2d_input_gradient

#: rule class -> (number of branches, branches that are exactly zero for a ReLU output as
#: input, branch that is the layer's forward output used only through a comparison);
#: other rules (ZBox, Flat, WSquare, ...) compute every branch
_PLANS = {
    ZPlus: (2, (1,), None),
    AlphaBeta: (4, (1, 3), None),
    Gamma: (5, (1, 3), 4),
    Epsilon: (1, (), None),
}


class FrozenParams:
    """Modified parameters of a frozen model, computed once per (module, modification).

    A modification is identified by the ``ParamMod``'s function (code and closure values,
    e.g. the clamp bounds or gamma) and its ``param_keys``/``zero_params``; an entry is
    recomputed when the module's parameters are replaced or changed in place.
    """

    def __init__(self):
        self._cache = {}

    @staticmethod
    def signature(param_mod):
        """A hashable identity of a ``ParamMod`` (``None`` if it has none)."""
        try:
            function = param_mod.modifier
            cells = tuple(cell.cell_contents for cell in (function.__closure__ or ()))
            keys, zero = param_mod.param_keys, param_mod.zero_params
            signature = (function.__code__, cells, None if keys is None else tuple(keys),
                         zero if zero is None or isinstance(zero, str) else tuple(zero),
                         param_mod.require_params)
            hash(signature)
        except (AttributeError, TypeError, ValueError):
            return None
        return signature

    @staticmethod
    def _state(module):
        return tuple((name, id(p), p.data_ptr(), p._version, p.device, p.dtype)
                     for name, p in module.named_parameters(recurse=False))

    def get(self, param_mod, module):
        """``{name: tensor}`` of the modified parameters (``None`` when not cacheable)."""
        param_mod = ParamMod.ensure(param_mod)
        signature = self.signature(param_mod)
        if signature is None:
            return None
        key, state = (id(module), signature), self._state(module)
        entry = self._cache.get(key)
        if entry is None or entry[0]() is not module or entry[1] != state:
            original = dict(module.named_parameters(recurse=False))
            with param_mod(module):
                modified = {name: getattr(module, name) for name in original}
            entry = (weakref.ref(module), state,
                     {name: None if value is None else value.detach()
                      for name, value in modified.items()})
            self._cache[key] = entry
        return entry[2]


def _input_gradient(module, grad, weight, input_shape):
    """Gradient of the (linear) layer ``module`` with ``weight`` w.r.t. its input, for ``grad``."""
    if isinstance(module, nn.Linear):
        return grad @ weight
    return conv2d_input_gradient(module, grad, weight, input_shape)


#: autograd nodes that keep a ReLU output's zeros where its derivative is zero (names of
#: PyTorch's nodes; ``IdentityBackward`` is Zennit's hook anchor)
_TRANSPARENT = ("CloneBackward", "IdentityBackward", "ViewBackward", "ReshapeAliasBackward",
                "UnsafeViewBackward", "MaxPool2DWithIndicesBackward", "AdaptiveAvgPool2DBackward",
                "AvgPool2DBackward")


def _after_relu(tensor):
    """Whether ``tensor`` is a ReLU output, seen through pooling, views and copies.

    Such a tensor is non-negative, so ``tensor.clamp(max=0)`` is all zeros, and the
    derivative of that branch can only matter at the tensor's zeros, where the ReLU passes
    no gradient anyway. Read from the graph, so it needs no device synchronisation; any
    other input (image pixels, say) keeps every branch.
    """
    node = tensor.grad_fn
    for _ in range(32):
        if node is None:
            return False
        name = node.name()
        if name.startswith("ReluBackward"):
            return True
        edges = [edge for edge, _ in node.next_functions if edge is not None]
        if not name.startswith(_TRANSPARENT) or len(edges) != 1:
            return False
        node = edges[0]
    return False


def _layer_forward(module, input, params):
    if isinstance(module, nn.Linear):
        return F.linear(input, params["weight"], params.get("bias"))
    return module._conv_forward(input, params["weight"], params.get("bias"))


def _supported(module):
    """Layers whose branch gradient is written out here (others use Zennit's backward)."""
    if type(module) is nn.Linear:
        return True
    return (type(module) in (nn.Conv2d, FrozenConv2d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


class FastRule:
    """Mixin over a Zennit ``BasicHook`` rule class (see the module docstring)."""

    frozen = None

    def copy(self):
        copy = super().copy()
        copy.frozen = self.frozen
        return copy

    def forward(self, module, input, output):
        self.stored_tensors["input"] = input
        self.stored_tensors["output"] = output
        self.stored_tensors["module"] = module

    def _plan(self):
        """``(branches, zero for a ReLU input, mask only)``, or None for Zennit's backward."""
        probe = torch.empty(0)
        if any(out_mod(probe) is not probe for out_mod in self.output_modifiers):
            return None  # a branch gradient through a non-identity output modifier
        rule = next((cls for cls in type(self).__mro__ if cls in _PLANS), None)
        if rule is None:
            return len(self.input_modifiers), (), None  # every branch computed
        return _PLANS[rule] if len(self.input_modifiers) == _PLANS[rule][0] else None

    def handles(self, module):
        """Whether :meth:`backward` computes this module's relevance (else Zennit's does)."""
        return self._plan() is not None and _supported(module) and all(
            self.frozen.signature(ParamMod.ensure(mod)) is not None for mod in self.param_modifiers)

    def backward(self, module, grad_input, grad_output):
        if not self.handles(module):
            return super().backward(module, grad_input, grad_output)
        _, zero_if_nonneg, mask_only = self._plan()
        original_input = self.stored_tensors["input"][0]
        forward_output = self.stored_tensors["output"]
        skip = set(zero_if_nonneg) if zero_if_nonneg and _after_relu(original_input) else set()
        if skip and isinstance(self, Gamma) and self._gamma() is not None:
            return self._gamma_after_relu(module, original_input, forward_output, grad_output,
                                          grad_input)
        idle = skip | {mask_only}  # branches whose gradient is not needed
        params = [None if index in idle else self.frozen.get(mod, module)
                  for index, mod in enumerate(self.param_modifiers)]
        if isinstance(self, Epsilon) and not self.param_modifiers[0].zero_params:
            # the single branch is the layer itself: reuse the forward output (and its graph)
            inputs, outputs = [original_input], [forward_output]
        else:
            inputs, outputs = [], []
            for index, (in_mod, out_mod, param) in enumerate(
                    zip(self.input_modifiers, self.output_modifiers, params)):
                inputs.append(in_mod(original_input))
                if index == mask_only:
                    outputs.append(forward_output.detach())
                elif index in skip:
                    outputs.append(None)
                else:
                    outputs.append(out_mod(_layer_forward(module, inputs[-1], param)))
            live = next(output for output in outputs if output is not None)
            outputs = [torch.zeros_like(live) if output is None else output for output in outputs]
        grad_outputs = self.gradient_mapper(grad_output[0], outputs)
        if isinstance(grad_outputs, torch.Tensor):
            grad_outputs = (grad_outputs,)
        gradients = [
            torch.zeros_like(input) if index in idle
            else _input_gradient(module, grad, param["weight"], input.shape)
            for index, (input, grad, param) in enumerate(zip(inputs, grad_outputs, params))]
        relevance = self.reducer(inputs, gradients)
        return tuple(relevance if original.shape == relevance.shape else None
                     for original in grad_input)

    def _gamma(self):
        """Gamma's gamma, if its branches have Zennit's layout with the bias kept where usual."""
        mods = [ParamMod.ensure(mod) for mod in self.param_modifiers]
        if len(mods) != 5 or mods[0].zero_params or mods[2].zero_params:
            return None
        function = mods[0].modifier
        cells = dict(zip(function.__code__.co_freevars,
                         (cell.cell_contents for cell in function.__closure__ or ())))
        return cells.get("gamma")

    def _gamma_after_relu(self, module, x, z, grad_output, grad_input):
        """Gamma on a ReLU output in one convolution and two transposed ones (not 2 and 2+2).

        With ``x >= 0`` and ``q = W+ x + b+`` (``W+``, ``b+`` the positive parts), Zennit's
        two live branches are ``o0 = (W + gW+) x + b + gb+ = z + g q`` and
        ``o2 = (W + gW-) x + b + gb- = (1 + g) z - g q`` (no cancellation: they are used
        where ``z > 0`` and ``z < 0``), and their gradients sum to
        ``W^T (a + (1 + g) b) + g W+^T (a - b)``. Zennit's gradient mapper and reducer
        (stabiliser, sign masks) are used unchanged.
        """
        gamma = self._gamma()
        positive = self.frozen.get(_POSITIVE_PARTS, module)
        q = _layer_forward(module, x, positive)
        inputs = [in_mod(x) for in_mod in self.input_modifiers]
        zeros = torch.zeros_like(z)
        outputs = [z + gamma * q, zeros, (1 + gamma) * z - gamma * q, zeros, z.detach()]
        grad_outputs = self.gradient_mapper(grad_output[0], outputs)
        a, b = grad_outputs[0], grad_outputs[2]
        gradient = (_input_gradient(module, a + (1 + gamma) * b, module.weight, x.shape)
                    + gamma * _input_gradient(module, a - b, positive["weight"], x.shape))
        gradients = [gradient] + [torch.zeros_like(x)] * 4
        relevance = self.reducer(inputs, gradients)
        return tuple(relevance if original.shape == relevance.shape else None
                     for original in grad_input)


#: ``W+``, ``b+`` of a layer (cached by :class:`FrozenParams` like a rule's own modifications)
_POSITIVE_PARTS = ClampMod(min=0.0)

_FAST_CLASSES = {}


def fast_rule(template, frozen):
    """A copy of the rule ``template`` that computes with :class:`FastRule` (other hooks as-is)."""
    if not isinstance(template, BasicHook) or isinstance(template, FastRule):
        return template
    cls = type(template)
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(f"Fast{cls.__name__}", (FastRule, cls), {})
    fast = template.copy()
    fast.__class__ = _FAST_CLASSES[cls]
    fast.frozen = frozen
    return fast


@contextlib.contextmanager
def replaced_input_gradients(composite):
    """While active, convolutions whose relevance a :class:`FastRule` computes skip their own
    input gradient (Zennit's hook replaces it anyway): use around the explanation's backward.

    The layers' own backward is back to normal on exit, before any other backward (the
    attack's) runs through the same graph.
    """
    layers = []
    for hook in list(composite.hook_refs):
        layer = hook.stored_tensors.get("module") if isinstance(hook, FastRule) else None
        if isinstance(layer, FrozenConv2d) and hook.handles(layer):
            layers.append(layer)
    try:
        for layer in layers:
            layer.discard_input_gradient = True
        yield
    finally:
        for layer in layers:
            layer.discard_input_gradient = False


def speed_up(composite, frozen):
    """Make ``composite`` register :class:`FastRule` copies of its rules (before ``register``)."""
    module_map = composite.module_map

    def fast_module_map(ctx, name, module):
        return fast_rule(module_map(ctx, name, module), frozen)

    composite.module_map = fast_module_map
    return composite
