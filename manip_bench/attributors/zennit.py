"""Zennit LRP composites made differentiable in the input.

Zennit's rule hooks already re-run each layer inside the backward pass, so the relevance
has a graph. Two things decide whether that graph is right, and :class:`ZennitAttributor`
does both: the seed is ``output * one_hot`` (it must depend on ``x``), and the second
backward runs after the composite's hooks are removed. Canonizers (batch-norm merging)
are applied once to the attributor's private model copy and never reverted, so no
weights are swapped while a graph that uses them is alive.
"""
import contextlib

import torch
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite
from zennit.rules import Epsilon, Gamma, Norm, Pass, ZBox, ZPlus
from zennit.torchvision import ResNetCanonizer
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, Linear, MaxPool

from ..errors import ManipBenchError
from ..models.cifar_vgg import Normalize
from .base import Attributor, input_with_grad, one_hot
from .zennit_fast import FrozenParams, replaced_input_gradients, speed_up

#: the paper's LRP-gamma per VGG block (blocks split at max-pool layers); linear head: 0
VGG_BLOCK_GAMMAS = (0.5, 0.5, 0.25, 0.1, 0.0)

# our input normalisation is bookkeeping, not a layer: relevance passes it unchanged
PASS_NORMALIZE = [(Normalize, Pass())]


def default_canonizers(model):
    """Zennit canonizers that merge batch norm into the neighbouring layer, if any."""
    if not any(isinstance(module, BatchNorm) for module in model.modules()):
        return []
    if any(type(module).__name__ in ("BasicBlock", "Bottleneck") for module in model.modules()):
        return [ResNetCanonizer()]
    return [SequentialMergeBatchNorm()]


def input_bounds(model):
    """Lowest/highest value the first layer sees for [0, 1] images (after ``Normalize``)."""
    normalize = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    return normalize.bounds() if normalize is not None else (0.0, 1.0)


class ZennitAttributor(Attributor):
    """LRP through a Zennit composite, seeded with the target logit.

    ``fast`` (default True) computes Zennit's rules with less work on the frozen private
    model copy (:mod:`manip_bench.attributors.zennit_fast`: modified weights cached, zero
    and repeated branches skipped); the relevance equals Zennit's own to rounding. Set it
    to False on an instance or the class to run Zennit's hooks unchanged.
    """

    library = "zennit"
    preset = "lrp"
    fast = True

    def __init__(self, model, canonizers="auto"):
        super().__init__(model)
        if canonizers == "auto":
            canonizers = default_canonizers(self.model)
        for canonizer in canonizers or []:
            canonizer.apply(self.model)  # on the private copy, kept for its lifetime
        self._frozen_params = FrozenParams()

    def composite(self):
        """A fresh Zennit composite for one explanation."""
        raise NotImplementedError

    def attribute(self, x, target):
        x = input_with_grad(x)
        composite = self.composite()
        if self.fast:
            speed_up(composite, self._frozen_params)
        with torch.enable_grad(), composite.context(self.model) as model:
            output = model(x)
            seed = output * one_hot(target, output)
            with replaced_input_gradients(composite) if self.fast else contextlib.nullcontext():
                (relevance,) = torch.autograd.grad(output, x, seed, create_graph=True)
        return output, relevance


class EpsilonLRP(ZennitAttributor):
    """LRP-epsilon on every convolution and linear layer, activations passed.

    The default ε = 0.25 is the usual LRP-ε setting. With a tiny ε, LRP-ε on a ReLU network
    is gradient x input, whose map only moves as far as the image itself does (measured on
    the embedded model: target PCC 0.16 after a full attack, against 0.78 with ε = 0.25).
    """

    name, rule = "zennit.epsilon", "LRP-ε (ε=0.25) on all layers"

    def __init__(self, model, epsilon=0.25, canonizers="auto"):
        super().__init__(model, canonizers)
        self.epsilon = epsilon

    def composite(self):
        return LayerMapComposite(
            PASS_NORMALIZE + layer_map_base() + [(Linear, Epsilon(epsilon=self.epsilon))])


class EpsilonPlusFlatLRP(ZennitAttributor):
    """Zennit's EpsilonPlusFlat: flat on the first layer, z+ on convs, ε on dense layers."""

    name, rule = "zennit.epsilon_plus_flat", "♭ first, z+ conv, ε dense"

    def __init__(self, model, epsilon=1e-6, canonizers="auto"):
        super().__init__(model, canonizers)
        self.epsilon = epsilon

    def composite(self):
        return EpsilonPlusFlat(epsilon=self.epsilon, layer_map=PASS_NORMALIZE)


class EpsilonPlusLRP(EpsilonPlusFlatLRP):
    """Zennit's EpsilonPlus: z+ on convs, ε on dense layers."""

    name, rule = "zennit.zplus", "z+ conv, ε dense"

    def composite(self):
        return EpsilonPlus(epsilon=self.epsilon, layer_map=PASS_NORMALIZE)


class Alpha2Beta1LRP(EpsilonPlusFlatLRP):
    """Zennit's EpsilonAlpha2Beta1: α2β1 on convs, ε on dense layers."""

    name, rule = "zennit.alpha2beta1", "α2β1 conv, ε dense"

    def composite(self):
        return EpsilonAlpha2Beta1(epsilon=self.epsilon, layer_map=PASS_NORMALIZE)


class EpsilonGammaBoxLRP(ZennitAttributor):
    """Zennit's EpsilonGammaBox: zB first layer (valid image bounds), γ on convs, ε dense."""

    name, rule = "zennit.epsilon_gamma_box", "zB first, γ conv, ε dense"

    def __init__(self, model, epsilon=1e-6, gamma=0.25, low=None, high=None, canonizers="auto"):
        super().__init__(model, canonizers)
        self.epsilon, self.gamma = epsilon, gamma
        default_low, default_high = input_bounds(self.model)
        self.low = default_low if low is None else low
        self.high = default_high if high is None else high

    def composite(self):
        return EpsilonGammaBox(low=self.low, high=self.high, epsilon=self.epsilon,
                               gamma=self.gamma, layer_map=PASS_NORMALIZE)


class PaperLRP(ZennitAttributor):
    """The paper's reference LRP: zB on the first conv, z+ elsewhere, biases ignored."""

    name, rule = "zennit.paper_lrp", "zB first, z+ elsewhere, no bias"

    def __init__(self, model, low=None, high=None, canonizers="auto"):
        super().__init__(model, canonizers)
        default_low, default_high = input_bounds(self.model)
        self.low = default_low if low is None else low
        self.high = default_high if high is None else high

    def composite(self):
        return SpecialFirstLayerMapComposite(
            layer_map=PASS_NORMALIZE + layer_map_base() + [(Linear, ZPlus(zero_params="bias"))],
            first_map=[(Linear, ZBox(self.low, self.high, zero_params="bias"))],
        )


class GammaPerBlockLRP(ZennitAttributor):
    """LRP-γ with one γ per VGG block (blocks end at max-pool layers); dense layers use ``head_gamma``.

    γ = 0 is LRP-0, computed with the (much cheaper) ε rule and a tiny ε.
    """

    name, rule = "zennit.gamma_vgg", "γ per VGG block (0.5, 0.5, 0.25, 0.1, 0)"

    def __init__(self, model, gammas=VGG_BLOCK_GAMMAS, head_gamma=0.0, epsilon=1e-6,
                 canonizers="auto"):
        super().__init__(model, canonizers)
        if not any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            raise ManipBenchError("zennit.gamma_vgg needs a VGG-style model with nn.Conv2d layers")
        self.gammas, self.head_gamma, self.epsilon = tuple(gammas), head_gamma, epsilon

    def _rule(self, gamma):
        return Epsilon(epsilon=self.epsilon) if gamma == 0 else Gamma(gamma=gamma)

    def _module_map(self, ctx, name, module):
        if isinstance(module, MaxPool):
            ctx["block"] = ctx.get("block", 0) + 1
            return None
        if isinstance(module, (Normalize, Activation)):
            return Pass()
        if isinstance(module, AvgPool):
            return Norm()
        if isinstance(module, Convolution):
            block = min(ctx.get("block", 0), len(self.gammas) - 1)
            return self._rule(self.gammas[block])
        if isinstance(module, Linear):
            return self._rule(self.head_gamma)
        return None

    def composite(self):
        return Composite(module_map=self._module_map)


class CaptumLRP(ZennitAttributor):
    """Captum's ``LRP`` default (ε = 1e-9 everywhere, seeded with the logit), via Zennit.

    Captum's own LRP cannot be differentiated (it restores weights in place and its rules
    use ``.data``); this composite gives the same map with a correct graph.
    """

    name, library, rule = "captum.lrp", "captum", "Captum LRP (ε=1e-9), computed by Zennit"

    def __init__(self, model, epsilon=1e-9, canonizers="auto"):
        super().__init__(model, canonizers)
        self.epsilon = epsilon

    def composite(self):
        return LayerMapComposite(PASS_NORMALIZE + [
            (Activation, Pass()),
            (AvgPool, Epsilon(epsilon=self.epsilon)),
            (Linear, Epsilon(epsilon=self.epsilon)),
        ])
