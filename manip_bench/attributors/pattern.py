"""PatternAttribution (Kindermans et al., ICLR 2018), differentiable in the input.

The map is the gradient backward pass of the target logit with every weight ``W``
replaced by ``W ⊙ A`` (``A`` the layer's pattern, :mod:`manip_bench.patterns`), seeded
with the target logit ``y`` (the paper's ``r_output = y``, as in Dombrowski et al.'s
reference code): for a linear model it is ``w ⊙ a y``, each input's contribution
relative to the root point ``x - a y``. ReLUs gate as in the gradient (``sigmoid(beta z)``
on the Softplus network), max-pooling routes to the maximum, and the input
normalisation passes relevance unchanged (as in the LRP adapters: with the pattern of
the first layer expressed in pixel space, ``w ⊙ a`` is the same in both coordinates).
An input normalisation is recognised by what it computes: a module without children whose
``mean`` and ``std`` tensors give its output as ``(x - mean) / std``.

This module knows no model zoo. A model that ships patterns says so itself: its
``shipped_patterns()`` method returns the patterns file and the weights file they were
estimated for (the embedded CifarVGG does), and they are used only for those weights.

Each convolution/linear layer (and ``Normalize``) of the private model copy computes its
normal forward pass in an autograd function whose backward uses ``W ⊙ A`` while
``rule_active`` is set (the explanation's own backward) and the true ``W`` otherwise
(any later backward, such as the attack's), both in differentiable operations, so the
map has correct second-order terms.
"""

import torch
from torch import nn

from ..errors import ManipBenchError
from .base import Attributor, conv2d_input_gradient, input_with_grad, one_hot, rule_active

# ``manip_bench.patterns`` is imported where it is used: importing it here (and so with
# ``import manip_bench``) makes ``python -m manip_bench.patterns`` warn that the module
# was imported before it ran.


class _SwappedBackward(torch.autograd.Function):
    """The module's own forward; backward from ``module.input_gradient`` (reads ``rule_active``)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.input_shape = module, x.shape
        return module.layer_forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.module.input_gradient(grad, ctx.input_shape), None


class _PatternLayer:
    """Mixin for the swapped classes: forward through :class:`_SwappedBackward`."""

    rule_active = False

    def forward(self, x):
        return _SwappedBackward.apply(x, self)

    def layer_forward(self, x):
        return super().forward(x)

    def backward_weight(self):
        """``W ⊙ A`` for the explanation, ``W`` for any other backward."""
        return self.weight * self.pattern if self.rule_active else self.weight


class PatternConv2d(_PatternLayer, nn.Conv2d):
    """A convolution whose explanation backward uses ``W ⊙ A``."""

    def input_gradient(self, grad, input_shape):
        return conv2d_input_gradient(self, grad, self.backward_weight(), input_shape,
                                     self.explain_padding)


class PatternLinear(_PatternLayer, nn.Linear):
    """A linear layer whose explanation backward uses ``W ⊙ A``."""

    def input_gradient(self, grad, input_shape):
        return grad @ self.backward_weight()


class PassNormalize(_PatternLayer):
    """Mixin for an input normalisation ``(x - mean) / std``: relevance passes it unchanged in
    the explanation backward (any other backward divides by ``std``, the true gradient)."""

    def input_gradient(self, grad, input_shape):
        return grad if self.rule_active else grad / self.std


_PASS_CLASSES = {}


def _pass_class(cls):
    """``cls`` with :class:`PassNormalize` in front (one class per normalisation class)."""
    if cls not in _PASS_CLASSES:
        _PASS_CLASSES[cls] = type(f"Pass{cls.__name__}", (PassNormalize, cls), {})
    return _PASS_CLASSES[cls]


def is_input_normalization(module):
    """Whether ``module`` (without children) computes ``(x - module.mean) / module.std``.

    Checked on a random probe shaped like ``mean`` and ``std`` together, so a module that
    merely has tensors of those names is not taken for a normalisation.
    """
    mean, std = getattr(module, "mean", None), getattr(module, "std", None)
    if not (isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)
            and mean.is_floating_point()) or next(module.children(), None) is not None:
        return False
    try:
        shape = torch.broadcast_shapes(mean.shape, std.shape)
        probe = torch.rand(shape, dtype=mean.dtype, device=mean.device)
        with torch.no_grad():
            output = module(probe)
        return isinstance(output, torch.Tensor) and output.shape == probe.shape and \
            torch.allclose(output, (probe - mean) / std)
    except (RuntimeError, TypeError, ValueError):
        return False


def install_patterns(model, patterns):
    """Swap the layers of a *private* model copy for their pattern versions (in place).

    The class of each module is swapped (as ``torch.nn.utils.parametrize`` does), so
    parameters, buffers and names stay as they are; the pattern is a non-persistent
    buffer (it follows ``.to()`` but is not in the ``state_dict``).

    Returns
    -------
    list of torch.nn.Module
        the swapped modules (their ``rule_active`` flags switch the backward).
    """
    from ..patterns import conv_padding

    swapped = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            pattern = patterns[name].to(device=module.weight.device, dtype=module.weight.dtype)
            if isinstance(module, nn.Conv2d):
                module.explain_padding = conv_padding(module, name)
                module.__class__ = PatternConv2d
            else:
                module.__class__ = PatternLinear
            module.register_buffer("pattern", pattern, persistent=False)
        elif is_input_normalization(module):
            module.__class__ = _pass_class(type(module))
        else:
            continue
        swapped.append(module)
    return swapped


def _same_weights(model, path):
    """Whether ``model``'s state_dict equals the one saved at ``path``."""
    saved = torch.load(path, weights_only=True, map_location="cpu")
    own = model.state_dict()
    return own.keys() == saved.keys() and all(
        own[key].shape == value.shape
        and torch.equal(own[key].detach().cpu().to(value.dtype), value)
        for key, value in saved.items())


def default_patterns(model):
    """The patterns ``model`` ships (its ``shipped_patterns()``), if it has the weights they fit."""
    from ..patterns import load_patterns

    how = ("estimate patterns for it with manip_bench.patterns.estimate_patterns(model, batches) "
           "or manip-bench patterns FOLDER --out FILE, and pass patterns=FILE")
    shipped = getattr(model, "shipped_patterns", None)
    if not callable(shipped):
        raise ManipBenchError(f"pattern.attribution needs patterns for this model (they ship "
                              f"only with models that have shipped_patterns(), such as the "
                              f"embedded CifarVGG); {how}")
    patterns_file, weights_file = shipped()
    if not _same_weights(model, weights_file):
        kind = type(model).__name__
        raise ManipBenchError(f"the shipped patterns belong to the {kind} with its shipped "
                              f"weights ({weights_file.name}); this {kind} differs: {how}")
    return load_patterns(patterns_file), str(patterns_file)


class PatternAttribution(Attributor):
    """PatternAttribution: the target logit propagated back with weights ``W ⊙ A``.

    Parameters
    ----------
    model : torch.nn.Module
        A ReLU network (see :mod:`manip_bench.patterns` for what is supported).
    patterns : dict or path, optional
        ``{layer name: pattern}`` or a file from :func:`manip_bench.patterns.save_patterns`.
        Default: the patterns the model ships (``model.shipped_patterns()``, as the
        embedded CifarVGG has), for the weights they were estimated for.
    """

    name, library, rule = "pattern.attribution", "manip_bench", "PatternAttribution (W ⊙ A+)"
    needs_softplus = True

    def __init__(self, model, patterns=None):
        from ..patterns import check_patterns, load_patterns

        super().__init__(model)
        if patterns is None:
            patterns, source = default_patterns(model)
        elif isinstance(patterns, dict):
            source = "patterns"
        else:
            patterns, source = load_patterns(patterns), str(patterns)
        check_patterns(patterns, self.model, source)
        self.layers = install_patterns(self.model, patterns)

    def attribute(self, x, target):
        x = input_with_grad(x)
        with torch.enable_grad():
            output = self.model(x)
            seed = output * one_hot(target, output)
            with rule_active(self.layers):  # W ⊙ A in this backward only
                (relevance,) = torch.autograd.grad(output, x, seed, create_graph=True)
        return output, relevance
