"""What the benchmarks time: baselines, raw-autograd references and one attack step.

Every builder returns a callable that runs one unit of work (and nothing else) so the
same functions serve the pytest-benchmark suite (``benchmarks/test_step.py``) and the
smoke test in ``tests/test_benchmark_smoke.py``:

* baselines: ``forward``, ``forward_backward`` (gradient of the target logits to the
  input, weights frozen) and ``raw_saliency`` (a double-backprop Saliency attack step
  written with plain autograd: the floor for gradient methods), all on PyTorch's own
  layers;
* :class:`AttackStep`: one iteration of :class:`manip_bench.ManipulationAttack`'s loop
  (explain -> loss -> backward -> Adam step -> clamp), for any registry attributor;
* :func:`raw_step`: the same attack step with the explanation written in plain autograd
  (the reference each Captum adapter must match within 1.1x);
* ``attack_step(..., fast=False)`` times the code before the optimisations (Zennit's
  own hooks, PyTorch's own convolution backward): the "before".
"""
import numpy as np
import torch
from torch import nn

from manip_bench import ManipulationAttack, attributors, models
from manip_bench.attributors.base import FrozenConv2d, prepare_model, smooth_activations

MODELS = ("cifar_vgg", "vgg16")
BATCHES = (1, 16)
#: the raw-autograd explanation each Captum adapter is compared with
RAW_REFERENCES = {
    "captum.saliency": "saliency", "captum.input_x_gradient": "input_x_gradient",
    "captum.integrated_gradients": "integrated_gradients", "captum.smoothgrad": "smoothgrad",
    "captum.gradient_shap": "gradient_shap",
}
#: attributors computed through Zennit's hooks (``fast`` switches the optimised path)
ZENNIT = tuple(attributors.GROUPS["lrp"])


def attackable():
    """Every registry attributor that can be attacked on any model (the benchmarks' CNNs);
    transformer-only ones are benchmarked in ``benchmarks/test_transformer_lrp.py``."""
    return [name for name in attributors.available() if attributors.get_class(name).attackable
            and not getattr(attributors.get_class(name), "architecture", None)]


def load_model(name, device):
    """The zoo model: embedded weights for cifar_vgg, random weights (seeded) otherwise."""
    torch.manual_seed(0)
    weights = "default" if name == "cifar_vgg" else "random"
    return models.load(name, weights=weights, device=device)


def make_batch(model_name, batch, device, seed=0):
    """Images in [0, 1], their target classes and a target map, shaped for ``model_name``."""
    size = models.input_size(model_name)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=generator)
    target_map = torch.rand(batch, size, size, generator=generator)
    target = torch.randint(0, 10, (batch,), generator=generator)
    return x.to(device), target.to(device), target_map.to(device)


def attributor_options(name, model):
    """Options that make ``name`` work on ``model`` (random patterns for a zoo VGG-16)."""
    if name.startswith("pattern.") and not isinstance(model, models.CifarVGG):
        from manip_bench.patterns import pattern_layers
        torch.manual_seed(1)
        return {"patterns": {key: torch.rand_like(module.weight).cpu() * 0.1
                             for key, module in pattern_layers(model).items()}}
    return {}


def forward(model, x, target):
    """Plain forward pass."""
    def run():
        with torch.no_grad():
            return model(x)
    return run


def plain_convolutions(model):
    """Give ``model``'s ``FrozenConv2d`` layers PyTorch's own convolution back (in place)."""
    for module in model.modules():
        if type(module) is FrozenConv2d:
            module.__class__ = nn.Conv2d
    return model


def plain_copy(model, swap_relu=True):
    """:func:`prepare_model`'s copy with PyTorch's own convolutions (no ``FrozenConv2d``)."""
    return plain_convolutions(prepare_model(model, swap_relu=swap_relu))


def forward_backward(model, x, target):
    """Forward and backward to the input (frozen weights): the unit every ratio divides by."""
    frozen = plain_copy(model, swap_relu=False)

    def run():
        x_in = x.detach().requires_grad_()
        output = frozen(x_in)
        (gradient,) = torch.autograd.grad(output.gather(1, target[:, None]).sum(), x_in)
        return gradient
    return run


class _RawExplain:
    """Explanations written in plain autograd on a Softplus(beta) copy of the model.

    The copy keeps PyTorch's own ``nn.Conv2d`` (the adapters get ``FrozenConv2d``), so this
    is what a plain-PyTorch implementation costs.
    """

    def __init__(self, model, method, samples=10, steps=30, stdev=0.05):
        self.model = plain_copy(model)
        self.activations = smooth_activations(self.model)
        self.method, self.samples, self.steps, self.stdev = method, samples, steps, stdev
        alphas, weights = np.polynomial.legendre.leggauss(steps)
        self.alphas = [float(a) for a in 0.5 * (alphas + 1)]
        self.weights = [float(w) for w in 0.5 * weights]

    @property
    def swaps_activations(self):
        """Whether the beta changes the copy (its ReLU modules), as attributors report it."""
        return bool(self.activations)

    def set_beta(self, beta):
        for activation in self.activations:
            activation.beta = beta

    def _gradient(self, inputs, target):
        output = self.model(inputs)
        (gradient,) = torch.autograd.grad(output.gather(1, target[:, None]).sum(), inputs,
                                          create_graph=True)
        return gradient

    def __call__(self, x, target):
        n, shape = x.shape[0], x.shape[1:]
        if self.method in ("saliency", "input_x_gradient"):
            output = self.model(x)
            (gradient,) = torch.autograd.grad(output.gather(1, target[:, None]).sum(), x,
                                              create_graph=True)
            return output, gradient.abs() if self.method == "saliency" else x * gradient
        if self.method == "integrated_gradients":
            alphas = torch.tensor(self.alphas, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
            scaled = (alphas * x).reshape(-1, *shape)
            gradient = self._gradient(scaled, target.repeat(self.steps))
            weights = torch.tensor(self.weights, device=x.device, dtype=x.dtype)
            total = (gradient.view(self.steps, n, *shape) * weights.view(-1, 1, 1, 1, 1)).sum(0)
            return self.model(x), total * x
        samples = self.samples if self.method == "smoothgrad" else 5
        stdev = self.stdev if self.method == "smoothgrad" else 0.0
        noisy = x.repeat_interleave(samples, 0) + stdev * torch.randn(
            (n * samples, *shape), device=x.device, dtype=x.dtype)
        if self.method == "smoothgrad":
            gradient = self._gradient(noisy, target.repeat_interleave(samples)).abs()
            return self.model(x), gradient.view(n, samples, *shape).mean(1)
        alpha = torch.rand(n * samples, 1, 1, 1, device=x.device, dtype=x.dtype)
        gradient = self._gradient(alpha * noisy, target.repeat_interleave(samples))
        return self.model(x), (gradient * noisy).view(n, samples, *shape).mean(1)


class AttackStep:
    """One iteration of :class:`~manip_bench.ManipulationAttack`'s loop, callable repeatedly.

    The set-up (``attack.start``: original map, target, reference output) runs once in
    ``__init__``; each call is ``attack.step`` (beta -> explain(x_adv) -> loss -> backward
    -> Adam step -> projection), without the loop's bookkeeping (best-so-far, history,
    judging). ``explain`` may replace the attributor for the steps (a raw-autograd reference).
    """

    def __init__(self, model, name, x, target_map, explain=None, **attributor_options):
        self.attack = ManipulationAttack(model, name, attributor_options=attributor_options)
        self.state = self.attack.start(x, target_map)
        self.attributor = self.attack.explain  # the registry attributor (set-up, judging)
        if explain is not None:
            self.attack.explain = explain
        self.explain = self.attack.explain  # what each step explains with

    @property
    def x_adv(self):
        return self.state.x_adv

    def __call__(self):
        if self.state.step == self.attack.config.iterations:
            self.state.step = 0  # keep beta on the attack's schedule
        return self.attack.step(self.state).loss


def attack_step(model, name, x, target_map, fast=True):
    """One attack step of registry attributor ``name``.

    ``fast=False`` is the code before the optimisations: Zennit's own hooks
    (``ZennitAttributor.fast = False``) and PyTorch's own ``nn.Conv2d`` backward.
    """
    step = AttackStep(model, name, x, target_map, **attributor_options(name, model))
    if not fast:
        step.explain.fast = False
        plain_convolutions(step.explain.model)
    return step


def raw_step(model, name, x, target_map):
    """The attack step of Captum adapter ``name`` with its explanation in plain autograd."""
    return AttackStep(model, name, x, target_map, explain=_RawExplain(model, RAW_REFERENCES[name]))


def raw_saliency(model, x, target_map):
    """Baseline: a double-backprop Saliency attack step written in plain autograd."""
    return raw_step(model, "captum.saliency", x, target_map)


def synchronized(run, device):
    """``run`` followed by a device synchronisation (CUDA timings must include the work)."""
    if torch.device(device).type != "cuda":
        return run

    def run_synchronized():
        result = run()
        torch.cuda.synchronize(device)
        return result
    return run_synchronized
