"""PatternAttribution (Kindermans et al., ICLR 2018), differentiable in the input.

The map is the gradient backward pass of the target logit with every weight ``W``
replaced by ``W ⊙ A`` (``A`` the layer's pattern, :mod:`manip_bench.patterns`), seeded
with the target logit ``y`` (the paper's ``r_output = y``, as in Dombrowski et al.'s
reference code): for a linear model it is ``w ⊙ a y``, each input's contribution
relative to the root point ``x - a y``. ReLUs gate as in the gradient (``sigmoid(beta z)``
on the Softplus network), max-pooling routes to the maximum, and the input
normalisation passes relevance unchanged (as in the LRP adapters: with the pattern of
the first layer expressed in pixel space, ``w ⊙ a`` is the same in both coordinates).

Each convolution/linear layer (and ``Normalize``) of the private model copy computes its
normal forward pass in an autograd function whose backward uses ``W ⊙ A`` while
``rule_active`` is set (the explanation's own backward) and the true ``W`` otherwise
(any later backward, such as the attack's), both in differentiable operations, so the
map has correct second-order terms.
"""

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ManipBenchError
from ..models.cifar_vgg import CifarVGG, Normalize
from .base import Attributor, input_with_grad, one_hot, rule_active

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
        padding = self.explain_padding
        output_padding = [
            input_shape[2 + d] - ((grad.shape[2 + d] - 1) * self.stride[d] - 2 * padding[d]
                                  + self.dilation[d] * (self.kernel_size[d] - 1) + 1)
            for d in range(2)]
        return F.conv_transpose2d(grad, self.backward_weight(), None, self.stride, padding,
                                  output_padding, self.groups, self.dilation)


class PatternLinear(_PatternLayer, nn.Linear):
    """A linear layer whose explanation backward uses ``W ⊙ A``."""

    def input_gradient(self, grad, input_shape):
        return grad @ self.backward_weight()


class PassNormalize(_PatternLayer, Normalize):
    """Input normalisation that passes relevance unchanged in the explanation backward."""

    def input_gradient(self, grad, input_shape):
        return grad if self.rule_active else grad / self.std


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
        elif type(module) is Normalize:
            module.__class__ = PassNormalize
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
    """The shipped patterns when ``model`` is the embedded CifarVGG with its shipped weights."""
    from ..models import CIFAR_VGG_WEIGHTS
    from ..patterns import CIFAR_VGG_PATTERNS, load_patterns

    how = ("estimate patterns for it with manip_bench.patterns.estimate_patterns(model, batches) "
           "or python -m manip_bench.patterns --data DIR --out FILE, and pass patterns=FILE")
    if not isinstance(model, CifarVGG):
        raise ManipBenchError(f"pattern.attribution needs patterns for this model (they ship "
                              f"only for the embedded CifarVGG); {how}")
    if not _same_weights(model, CIFAR_VGG_WEIGHTS):
        raise ManipBenchError(f"the shipped patterns belong to the embedded CifarVGG with its "
                              f"shipped weights ({CIFAR_VGG_WEIGHTS.name}); this CifarVGG differs: "
                              f"{how}")
    return load_patterns(CIFAR_VGG_PATTERNS), str(CIFAR_VGG_PATTERNS)


class PatternAttribution(Attributor):
    """PatternAttribution: the target logit propagated back with weights ``W ⊙ A``.

    Parameters
    ----------
    model : torch.nn.Module
        A ReLU network (see :mod:`manip_bench.patterns` for what is supported).
    smooth_beta : float, optional
        Compute the map on the Softplus(beta) network (the beta-smoothing defence).
    patterns : dict or path, optional
        ``{layer name: pattern}`` or a file from :func:`manip_bench.patterns.save_patterns`.
        Default: the shipped patterns, for the embedded CifarVGG only.
    """

    name, library, rule = "pattern.attribution", "manip_bench", "PatternAttribution (W ⊙ A+)"
    needs_softplus = True

    def __init__(self, model, smooth_beta=None, patterns=None):
        from ..patterns import check_patterns, load_patterns

        super().__init__(model, smooth_beta)
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
