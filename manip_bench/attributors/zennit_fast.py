"""Zennit's LRP rules with less work per explanation (same relevance, same graph in x).

Zennit's ``BasicHook.backward`` re-runs each hooked layer once per rule branch inside the
backward pass and differentiates those re-runs with ``torch.autograd.grad``. For the
attack's double backpropagation, seven things in that are pure overhead on the frozen
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
   from the autograd graph, so no device synchronisation): its input, output and gradient
   are expanded zeros that take no memory, and ``x.clamp(min=0)`` is ``x`` itself (same
   value, and clamp passes the gradient at ``x >= 0``), so the graph keeps no copies.
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
6. **Gradient mappers and reducers run every branch** through sign masks, bool-to-float
   conversions, five-operation stabilisers and sums with zero branches, in the
   explanation and again in its derivative. For Zennit's own Epsilon, ZPlus (on a ReLU
   output) and Gamma (on a ReLU output), recognised by the code of their mapper and
   reducer, the same values are written out in a few operations
   (:meth:`FastRule._written_out`, :func:`_fast_stabilizer`).
7. **Tensors outlive their use**: Zennit clones each hooked layer's input (for in-place
   layers) and the clone lives as long as the graph; the rules here keep the layer input
   from before the clone and the forward output only where they reuse it.

Everything else (other rules and first layers: Zennit's stabilisers, gradient mappers and
reducers) is Zennit's own code. The relevance equals Zennit's to rounding, and so does its
derivative in x (a skipped branch's derivative is nonzero only at the ReLU's zeros, where
the ReLU passes no gradient); ``tests/attributors/test_zennit_fast.py`` checks both against
Zennit's hooks for every LRP name. Layers of other types use Zennit's backward unchanged.
The rule layouts and the rules' closure variables this relies on are Zennit 0.5's; they
are read through :mod:`manip_bench._compat`, which checks them on first use.
"""
import contextlib
import functools
import weakref

import torch
from torch import nn
from torch.nn import functional as F
from zennit.core import BasicHook, ParamMod, Stabilizer
from zennit.rules import ClampMod, Epsilon, Gamma, ZPlus

from .. import _compat
from .base import FrozenConv2d, conv2d_input_gradient

#: Zennit's branch layout of a rule, as :class:`FastRule` exploits it; the layouts of ZPlus,
#: AlphaBeta, Gamma and Epsilon are ``_compat.branch_layouts``, other rules (ZBox, Flat,
#: WSquare, ...) compute every branch
_Plan = _compat.BranchLayout


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
            code, closure = _compat.function_parts(param_mod.modifier)
            keys, zero = param_mod.param_keys, param_mod.zero_params
            signature = (code, tuple(closure.values()), None if keys is None else tuple(keys),
                         zero if zero is None or isinstance(zero, str) else tuple(zero),
                         param_mod.require_params)
            hash(signature)
        except (AttributeError, TypeError, ValueError):
            return None
        return signature

    @staticmethod
    def _state(module):
        return tuple((name, id(p), p.data_ptr(), _compat.tensor_version(p), p.device, p.dtype)
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


def _after_relu(tensor):
    """Whether ``tensor`` is a ReLU output, seen through pooling, views and copies.

    Such a tensor is non-negative, so ``tensor.clamp(max=0)`` is all zeros, and the
    derivative of that branch can only matter at the tensor's zeros, where the ReLU passes
    no gradient anyway. Read from the graph, so it needs no device synchronisation; any
    other input (image pixels, say) keeps every branch.
    """
    # autograd nodes that keep a ReLU output's zeros where its derivative is zero
    relu, transparent = _compat.autograd_node_names
    node = tensor.grad_fn
    for _ in range(32):
        if node is None:
            return False
        name = node.name()
        if name.startswith(relu):
            return True
        edges = [edge for edge, _ in node.next_functions if edge is not None]
        if not name.startswith(transparent) or len(edges) != 1:
            return False
        node = edges[0]
    return False


def _zeros(tensor):
    """Zeros shaped like ``tensor`` that take no memory (one element, expanded)."""
    return tensor.new_zeros(()).expand(tensor.shape)


def _layer_forward(module, input, params):
    if isinstance(module, nn.Linear):
        return F.linear(input, params["weight"], params.get("bias"))
    return _compat.conv_forward(module, input, params["weight"], params.get("bias"))


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

    def pre_forward(self, module, input):
        self.stored_tensors["raw_input"] = input if isinstance(input, tuple) else (input,)
        return super().pre_forward(module, input)

    def forward(self, module, input, output):
        self.stored_tensors["module"] = module
        raw_input = self.stored_tensors.pop("raw_input", None)
        plan = self._plan() if self._handles(module) else None
        if plan is None:
            return super().forward(module, input, output)
        self.stored_tensors["plan"] = plan  # this layer's relevance is computed here
        # The layer input before Zennit's identity-and-clone (same values; the clone is
        # only there for in-place layers): the clone is then freed after this layer's
        # forward instead of living as long as the graph.
        self.stored_tensors["input"] = raw_input
        if plan.mask_only is not None or self._branch_is_layer():
            self.stored_tensors["output"] = output  # reused by Gamma and Epsilon
        return None

    def _plan(self):
        """The rule's :class:`_Plan`, or None for Zennit's backward."""
        probe = torch.empty(0)
        if any(out_mod(probe) is not probe for out_mod in self.output_modifiers):
            return None  # a branch gradient through a non-identity output modifier
        plans = _compat.branch_layouts
        rule = next((cls for cls in type(self).__mro__ if cls in plans), None)
        if rule is None:
            return _Plan(len(self.input_modifiers), (), ())  # every branch computed
        return plans[rule] if len(self.input_modifiers) == plans[rule].branches else None

    def _branch_is_layer(self):
        """Whether the rule's single branch is the layer itself (Epsilon, bias kept)."""
        return isinstance(self, Epsilon) and not self.param_modifiers[0].zero_params

    def _handles(self, module):
        """Whether :meth:`backward` can compute this module's relevance (else Zennit's does)."""
        return _supported(module) and all(
            self.frozen.signature(ParamMod.ensure(mod)) is not None for mod in self.param_modifiers)

    def backward(self, module, grad_input, grad_output):
        plan = self.stored_tensors.get("plan")  # decided once, in the layer's forward
        if plan is None:
            return super().backward(module, grad_input, grad_output)
        x = self.stored_tensors["input"][0]
        after_relu = bool(plan.zero_after_relu) and _after_relu(x)
        relevance = self._written_out(module, x, grad_output[0], after_relu)
        if relevance is None:
            relevance = self._branches(module, x, grad_output[0], plan, after_relu)
        return tuple(relevance if original.shape == relevance.shape else None
                     for original in grad_input)

    def _branches(self, module, x, grad, plan, after_relu):
        """Zennit's branches, gradient mapper and reducer, minus the zero and idle branches."""
        skip = set(plan.zero_after_relu) if after_relu else set()
        idle = skip | {plan.mask_only}  # branches whose gradient is not needed
        params = [None if index in idle else self.frozen.get(mod, module)
                  for index, mod in enumerate(self.param_modifiers)]
        inputs, outputs = [], []
        for index, (in_mod, out_mod, param) in enumerate(
                zip(self.input_modifiers, self.output_modifiers, params)):
            if index in skip:
                inputs.append(_zeros(x))
            elif after_relu and index in plan.same_after_relu:
                inputs.append(x)  # clamp(min=0) of x >= 0: same value and gradient
            else:
                inputs.append(in_mod(x))
            if index == plan.mask_only:
                outputs.append(self.stored_tensors["output"].detach())
            elif index in skip:
                outputs.append(None)
            else:
                outputs.append(out_mod(_layer_forward(module, inputs[-1], param)))
        live = next(output for output in outputs if output is not None)
        outputs = [_zeros(live) if output is None else output for output in outputs]
        grad_outputs = self.gradient_mapper(grad, outputs)
        if isinstance(grad_outputs, torch.Tensor):
            grad_outputs = (grad_outputs,)
        gradients = [
            _zeros(input) if index in idle
            else _input_gradient(module, grad, param["weight"], input.shape)
            for index, (input, grad, param) in enumerate(zip(inputs, grad_outputs, params))]
        return self.reducer(inputs, gradients)

    def _written_out(self, module, x, grad, after_relu):
        """The relevance of the common cases with the rule's arithmetic written out.

        Zennit's mappers and reducers run every branch through sign masks, bool-to-float
        conversions and sums with zero branches; for its own Epsilon, ZPlus and Gamma
        (recognised by their code) the same values are a handful of tensor operations:
        Epsilon ``x * W^T (R / s(z))``; ZPlus on a ReLU output ``x * W+^T (R / s(W+ x))``;
        Gamma on a ReLU output see :meth:`_gamma_after_relu`. ``s`` is the rule's own
        stabiliser (:func:`_fast_stabilizer` when it is Zennit's default one). Returns
        None for anything else (Zennit's mapper and reducer then run).
        """
        stabilize = _stabilizer(self)
        if stabilize is None:
            return None
        if self._branch_is_layer() and _compat.is_stock_rule(self, Epsilon):
            z = self.stored_tensors["output"]
            return x * _input_gradient(module, grad / stabilize(z), module.weight, x.shape)
        if after_relu and _compat.is_stock_rule(self, ZPlus):
            params = self.frozen.get(self.param_modifiers[0], module)
            z = _layer_forward(module, x, params)
            return x * _input_gradient(module, grad / stabilize(z), params["weight"], x.shape)
        if after_relu and _compat.is_stock_rule(self, Gamma) and self._gamma() is not None:
            return self._gamma_after_relu(module, x, grad, stabilize)
        return None

    def _gamma(self):
        """Gamma's gamma, if its branches have Zennit's layout with the bias kept where usual."""
        mods = [ParamMod.ensure(mod) for mod in self.param_modifiers]
        if len(mods) != 5 or mods[0].zero_params or mods[2].zero_params:
            return None
        return _compat.rule_gamma(self)

    def _gamma_after_relu(self, module, x, grad, stabilize):
        """Gamma on a ReLU output in one convolution and two transposed ones (not 2 and 2+2).

        With ``x >= 0``, ``z`` the layer output and ``q = W+ x + b+`` (``W+``, ``b+`` the
        positive parts), Zennit's two live branches are ``o0 = (W + gW+) x + b + gb+ =
        z + g q`` (used where ``z > 0``) and ``o2 = (W + gW-) x + b + gb- = (1 + g) z - g q``
        (used where ``z < 0``). With ``a = [z > 0] R / s(o0)`` and ``b = [z < 0] R / s(o2)``,
        the relevance is ``x * (W^T (a + (1 + g) b) + g W+^T (a - b))``.
        """
        gamma = self._gamma()
        z = self.stored_tensors["output"]
        positive = self.frozen.get(_POSITIVE_PARTS, module)
        q = _layer_forward(module, x, positive)
        a = torch.where(z > 0, grad / stabilize(z + gamma * q), 0.0)
        b = torch.where(z < 0, grad / stabilize((1 + gamma) * z - gamma * q), 0.0)
        gradient = (_input_gradient(module, a + (1 + gamma) * b, module.weight, x.shape)
                    + gamma * _input_gradient(module, a - b, positive["weight"], x.shape))
        return x * gradient


def _stabilizer(rule):
    """The stabiliser in the rule's gradient mapper, as a fast equivalent where one exists."""
    stabilizer = _compat.rule_stabilizer(rule)
    if type(stabilizer) is Stabilizer and not stabilizer.clip and not stabilizer.norm_scale:
        return functools.partial(_fast_stabilizer, epsilon=stabilizer.epsilon)
    return stabilizer


def _fast_stabilizer(z, epsilon):
    """Zennit's default stabiliser ``z + eps * sign(z)`` (``+eps`` at 0) in two operations.

    Same values (``z +/- eps`` exactly) and the same derivative (1) as
    ``z + ((z == 0).to(z) + z.sign()) * eps``, without its five full-size temporaries.
    """
    return z + torch.where(z >= 0, z.new_tensor(epsilon), z.new_tensor(-epsilon))


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
    for hook in _compat.composite_hooks(composite):
        if isinstance(hook, FastRule) and "plan" in hook.stored_tensors:
            layer = hook.stored_tensors["module"]
            if isinstance(layer, FrozenConv2d):
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
