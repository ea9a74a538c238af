"""Zennit LRP composites made differentiable in the input.

Zennit's rule hooks already re-run each layer inside the backward pass, so the relevance
has a graph. Two things decide whether that graph is right, and :class:`ZennitAttributor`
does both: the seed is ``output * one_hot`` (it must depend on ``x``), and the second
backward runs after the composite's hooks are removed. At the first explanation the
private model copy is canonized once and for its lifetime (:mod:`.canonize`: residual
additions, batch norms, the input normalisation and its bounds, all found by behaviour),
so no weights are swapped while a graph that uses them is alive.
"""
import contextlib

import torch
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
from zennit.layer import Sum
from zennit.rules import Epsilon, Gamma, Norm, Pass, ZBox, ZPlus
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, Linear

from ..errors import ManipBenchError
from .base import Attributor, input_with_grad, one_hot
from .canonize import canonize, resolution_blocks
from .zennit_fast import FrozenParams, replaced_input_gradients, speed_up

#: the paper's LRP-gamma per VGG block (blocks split at max-pool layers); linear head: 0
VGG_BLOCK_GAMMAS = (0.5, 0.5, 0.25, 0.1, 0.0)

class ZennitAttributor(Attributor):
    """LRP through a Zennit composite, seeded with the target logit.

    ``canonizers="auto"`` (default) canonizes the private copy by behaviour at the first
    explanation (:func:`.canonize.canonize`; what it found is in ``canonical``); a list of
    Zennit canonizers is applied instead, and ``None`` uses the model as it is (stock
    Zennit without canonizers). Either way the relevance reaching the first linear
    layer's input is handed to the image unchanged when the model's input normalisation
    is elementwise affine.

    ``fast`` (default True) computes Zennit's rules with less work on the frozen private
    model copy (:mod:`manip_bench.attributors.zennit_fast`: modified weights cached, zero
    and repeated branches skipped); the relevance equals Zennit's own to rounding. Set it
    to False on an instance or the class to run Zennit's hooks unchanged.
    """

    library = "zennit"
    preset = "lrp"
    conserving = True
    fast = True

    def __init__(self, model, canonizers="auto"):
        super().__init__(model)
        if canonizers != "auto" and canonizers is not None and not isinstance(
                canonizers, (list, tuple)):
            raise ManipBenchError('canonizers must be "auto", None or a list of Zennit '
                                  f"canonizers, got {canonizers!r}")
        self.canonizers = canonizers
        self.canonical = None
        self._input_scale = None
        self._frozen_params = FrozenParams()

    def _canonize(self, x):
        """Canonize the private copy once, at the first explanation (it needs an input)."""
        if self.canonical is None:
            auto = self.canonizers == "auto"
            for canonizer in [] if auto else self.canonizers or []:
                canonizer.apply(self.model)  # on the private copy, kept for its lifetime
            self.model, canonical = canonize(self.model, x, merge_and_sum=auto)
            if canonical.slope is not None and not bool((canonical.slope == 1).all()):
                self._input_scale = canonical.slope
            self.canonical = canonical
            self.canonized(canonical)
        return self.canonical

    def canonized(self, canonical):
        """Called once with what canonization found (subclasses read bounds or blocks)."""

    def composite(self):
        """A fresh Zennit composite for one explanation."""
        raise NotImplementedError

    def attribute(self, x, target):
        self._canonize(x)
        x = input_with_grad(x)
        composite = self.composite()
        if self.fast:
            speed_up(composite, self._frozen_params)
        with torch.enable_grad(), composite.context(self.model) as model:
            output = model(x)
            seed = output * one_hot(target, output)
            with replaced_input_gradients(composite) if self.fast else contextlib.nullcontext():
                (relevance,) = torch.autograd.grad(output, x, seed, create_graph=True)
        if self._input_scale is not None:  # relevance passes the normalisation unchanged
            relevance = relevance / self._input_scale
        return output, relevance


class BoundedInputLRP(ZennitAttributor):
    """An LRP composite whose first-layer rule (zB) needs the first layer's input bounds.

    ``low``/``high`` (floats, or tensors broadcastable to the first layer's input) are the
    lowest and highest values that layer sees for [0, 1] images. By default they are
    found from the model's own input normalisation (per channel); ``normalization=(mean,
    std)`` gives them for a model that normalises with ``(x - mean) / std`` in a way that
    cannot be recognised.
    """

    def __init__(self, model, low=None, high=None, normalization=None, canonizers="auto"):
        super().__init__(model, canonizers)
        if normalization is not None:
            if low is not None or high is not None:
                raise ManipBenchError("give either low/high or normalization=(mean, std)")
            try:
                mean, std = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                             for v in normalization)
            except (TypeError, ValueError) as error:
                raise ManipBenchError(f"normalization must be (mean, std), got "
                                      f"{normalization!r}") from error
            low, high = -mean / std, (1 - mean) / std
        if (low is None) != (high is None):
            raise ManipBenchError(f"{self.name}: give both low and high, or neither")
        self.low, self.high = low, high

    def canonized(self, canonical):
        if self.low is not None:
            return
        bounds = canonical.bounds()
        if bounds is None:
            raise ManipBenchError(
                f"{self.name}: the zB rule needs the range of the first layer's input, and the "
                "model's input normalisation was not recognised (the first layer's input is "
                "not an elementwise affine function of the image); pass low= and high= (or "
                "normalization=(mean, std)) as attributor options")
        self.low, self.high = bounds


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
            layer_map_base() + [(Linear, Epsilon(epsilon=self.epsilon))])


class EpsilonPlusFlatLRP(ZennitAttributor):
    """Zennit's EpsilonPlusFlat: flat on the first layer, z+ on convs, ε on dense layers."""

    name, rule = "zennit.epsilon_plus_flat", "♭ first, z+ conv, ε dense"

    def __init__(self, model, epsilon=1e-6, canonizers="auto"):
        super().__init__(model, canonizers)
        self.epsilon = epsilon

    def composite(self):
        return EpsilonPlusFlat(epsilon=self.epsilon, )


class EpsilonPlusLRP(EpsilonPlusFlatLRP):
    """Zennit's EpsilonPlus: z+ on convs, ε on dense layers."""

    name, rule = "zennit.zplus", "z+ conv, ε dense"

    def composite(self):
        return EpsilonPlus(epsilon=self.epsilon, )


class Alpha2Beta1LRP(EpsilonPlusFlatLRP):
    """Zennit's EpsilonAlpha2Beta1: α2β1 on convs, ε on dense layers."""

    name, rule = "zennit.alpha2beta1", "α2β1 conv, ε dense"

    def composite(self):
        return EpsilonAlpha2Beta1(epsilon=self.epsilon, )


class EpsilonGammaBoxLRP(BoundedInputLRP):
    """Zennit's EpsilonGammaBox: zB first layer (valid image bounds), γ on convs, ε dense."""

    name, rule = "zennit.epsilon_gamma_box", "zB first, γ conv, ε dense"

    def __init__(self, model, epsilon=1e-6, gamma=0.25, low=None, high=None,
                 normalization=None, canonizers="auto"):
        super().__init__(model, low, high, normalization, canonizers)
        self.epsilon, self.gamma = epsilon, gamma

    def composite(self):
        return EpsilonGammaBox(low=self.low, high=self.high, epsilon=self.epsilon,
                               gamma=self.gamma)


class PaperLRP(BoundedInputLRP):
    """The paper's reference LRP: zB on the first conv, z+ elsewhere, biases ignored."""

    name, rule = "zennit.paper_lrp", "zB first, z+ elsewhere, no bias"

    def composite(self):
        return SpecialFirstLayerMapComposite(
            layer_map=layer_map_base() + [(Linear, ZPlus(zero_params="bias"))],
            first_map=[(Linear, ZBox(self.low, self.high, zero_params="bias"))],
        )


class GammaPerBlockLRP(ZennitAttributor):
    """LRP-γ with one γ per block; dense layers use ``head_gamma``.

    A block is a run of convolutions with the same output resolution, in forward order:
    VGG's blocks (split by max-pool) and a ResNet's stages alike. Deeper blocks than
    ``gammas`` has entries use its last one; a network whose convolutions all keep one
    resolution has no blocks and is refused. ``blocks`` lists what was found (after the
    first explanation). γ = 0 is LRP-0, computed with the (much cheaper) ε rule and a tiny ε.
    """

    name, rule = "zennit.gamma_vgg", "γ per block of equal resolution (0.5, 0.5, 0.25, 0.1, 0)"

    def __init__(self, model, gammas=VGG_BLOCK_GAMMAS, head_gamma=0.0, epsilon=1e-6,
                 canonizers="auto"):
        super().__init__(model, canonizers)
        if not any(isinstance(m, Convolution) for m in self.model.modules()):
            raise ManipBenchError(f"{self.name} needs a model with convolutions (its blocks)")
        self.gammas, self.head_gamma, self.epsilon = tuple(gammas), head_gamma, epsilon
        self.blocks, self._block_of = None, {}
        #: the model's layers by the names users know (before canonization wraps it)
        self._named_modules = dict(self.model.named_modules())

    def canonized(self, canonical):
        convs = {name: m for name, m in self._named_modules.items()
                 if isinstance(m, Convolution)}
        blocks = resolution_blocks({name: shape for name, shape in canonical.resolutions.items()
                                    if name in convs})
        if len(blocks) < 2:
            raise ManipBenchError(
                f"{self.name}: every convolution of this model keeps one resolution, so it has "
                "no blocks to give different gammas; use zennit.epsilon_gamma_box (one gamma)")
        self.blocks = [{"resolution": list(shape), "layers": names,
                        "gamma": self.gammas[min(i, len(self.gammas) - 1)]}
                       for i, (shape, names) in enumerate(blocks)]
        self._block_of = {convs[name]: block["gamma"] for block in self.blocks
                          for name in block["layers"]}

    def _rule(self, gamma):
        return Epsilon(epsilon=self.epsilon) if gamma == 0 else Gamma(gamma=gamma)

    def _module_map(self, ctx, name, module):
        if isinstance(module, (Activation, BatchNorm)):
            return Pass()
        if isinstance(module, (AvgPool, Sum)):
            return Norm()
        if isinstance(module, Convolution):
            return self._rule(self._block_of.get(module, self.gammas[-1]))
        if isinstance(module, Linear):
            return self._rule(self.head_gamma)
        return None

    def composite(self):
        return Composite(module_map=self._module_map)


class CaptumLRP(ZennitAttributor):
    """Captum's ``LRP`` default (ε = 1e-9 everywhere, seeded with the logit), via Zennit.

    Captum's own LRP cannot be differentiated (it restores weights in place and its rules
    use ``.data``); this composite gives the same map with a correct graph. Residual
    additions found by canonization get the ``Norm`` rule (Captum has no rule for them).
    """

    name, library, rule = "captum.lrp", "captum", "Captum LRP (ε=1e-9), computed by Zennit"

    def __init__(self, model, epsilon=1e-9, canonizers="auto"):
        super().__init__(model, canonizers)
        self.epsilon = epsilon

    def composite(self):
        return LayerMapComposite([
            (Activation, Pass()),
            (Sum, Norm()),
            (AvgPool, Epsilon(epsilon=self.epsilon)),
            (Linear, Epsilon(epsilon=self.epsilon)),
        ])
