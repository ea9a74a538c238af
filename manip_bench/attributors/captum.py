"""Captum attribution methods made differentiable in the input.

Captum computes gradients without ``create_graph`` (``compute_gradients``), so a
loss on its maps either has no graph or a silently wrong one. Each adapter here runs
Captum's own method with the instance's ``gradient_func`` replaced by one that keeps
the graph. Where Captum breaks the graph elsewhere (NoiseTunnel's ``no_grad`` loop,
guided backprop's dropped hook handles), the adapter reproduces Captum's computation
with graph-keeping pieces and is tested against Captum's output.
"""
import contextlib

import torch
from captum.attr import (
    DeepLift as CaptumDeepLift,
    InputXGradient as CaptumInputXGradient,
    IntegratedGradients as CaptumIntegratedGradients,
    Saliency as CaptumSaliency,
)

from .. import _compat
from ..errors import ManipBenchError
from .base import Attributor, input_with_grad, one_hot, rule_active
from .chunked import ChunkedRelevance, GradientShapPlan, IntegratedGradientsPlan, SmoothGradPlan


def differentiable_gradients(forward_fn, inputs, target_ind=None, additional_forward_args=None):
    """Drop-in for Captum's ``compute_gradients`` that keeps the graph (``create_graph=True``)."""
    with torch.enable_grad():
        outputs = _compat.run_forward(forward_fn, inputs, target_ind, additional_forward_args)
        return torch.autograd.grad(outputs.sum(), inputs, create_graph=True)


@contextlib.contextmanager
def captured_output(model, x):
    """Record the model's output for input ``x`` while a Captum method runs (saves a forward)."""
    captured = {}

    def hook(module, inputs, output):
        if inputs and inputs[0] is x and "output" not in captured:
            captured["output"] = output

    handle = model.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class CaptumAttributor(Attributor):
    """Runs ``method_class(model).attribute(x, target=..., **kwargs)`` with a graph-keeping gradient."""

    library = "captum"
    needs_softplus = True
    method_class = None

    def __init__(self, model, **attribute_kwargs):
        super().__init__(model)
        self.method = self.method_class(self.model)
        _compat.set_gradient_func(self.method, differentiable_gradients)
        self.attribute_kwargs = attribute_kwargs

    def attribute(self, x, target):
        x = input_with_grad(x)
        with captured_output(self.model, x) as captured:
            relevance = self.method.attribute(x, target=target, **self.attribute_kwargs)
        output = captured["output"] if "output" in captured else self.model(x)
        return output, relevance


class Saliency(CaptumAttributor):
    """Gradient of the target logit (absolute value by default, as Captum)."""

    name, rule, method_class = "captum.saliency", "absolute gradient", CaptumSaliency

    def __init__(self, model, abs=True):  # noqa: A002 - Captum's name
        super().__init__(model, abs=abs)


class InputXGradient(CaptumAttributor):
    """Input times gradient."""

    name, rule, method_class = "captum.input_x_gradient", "input x gradient", CaptumInputXGradient


#: ``internal_batch_size="auto"``: no chunks while all sample rows hold at most this many
#: input values (about 3.5 images of 224x224x3, the graph of a few saliency steps) ...
AUTO_WHOLE_VALUES = 2 ** 19
#: ... else chunks of the batch, or of more rows while they hold at most this many values
AUTO_CHUNK_VALUES = 2 ** 17
AUTO = "auto"


class SampleChunking:
    """The ``internal_batch_size`` option of the sample-based adapters (as Captum names it).

    Their map and its input-derivative are computed in passes of ``internal_batch_size``
    sample rows (one row: one image at one integration step, or one noisy copy), one
    pass's double-backprop graph alive at a time (:mod:`manip_bench.attributors.chunked`):
    same map, same gradient, memory bounded by the chunk instead of growing with the
    number of samples, for one extra first-order gradient per sample.

    ``"auto"`` (default): all rows in one pass while they hold at most
    :data:`AUTO_WHOLE_VALUES` input values (small images: nothing to save, and chunks
    would cost time), else as many rows per pass as images in the batch (one sample of
    each image: the graph of a saliency step), or more while they hold at most
    :data:`AUTO_CHUNK_VALUES` values. An ``int``: that many rows per pass (on a GPU a
    larger chunk is faster). ``None``: all samples in one pass and one graph, Captum's
    own computation (memory grows with the number of samples), which is also used
    whenever all rows fit in one chunk. A chunked map can be differentiated twice (a
    loss's gradient with ``create_graph=True``), but that second order keeps every
    chunk's graph, as all at once does; the attack differentiates once.
    """

    def _set_chunking(self, internal_batch_size):
        valid = internal_batch_size is None or internal_batch_size == AUTO or (
            isinstance(internal_batch_size, int) and not isinstance(internal_batch_size, bool)
            and internal_batch_size >= 1)
        if not valid:
            raise ManipBenchError(f"{self.name}: internal_batch_size must be 'auto', a whole "
                                  f"number >= 1 or None, got {internal_batch_size!r}")
        self.internal_batch_size = internal_batch_size

    def chunk_rows(self, x, rows):
        """Sample rows per pass for ``rows`` rows of images ``x`` (``None``: all at once)."""
        if self.internal_batch_size != AUTO:
            return self.internal_batch_size
        values = x[0].numel()
        if rows * values <= AUTO_WHOLE_VALUES:
            return None
        return max(x.shape[0], AUTO_CHUNK_VALUES // values)

    def chunked(self, x, rows):
        """Rows per pass if ``rows`` sample rows of ``x`` take several passes, else ``None``."""
        chunk = self.chunk_rows(x, rows)
        return chunk if chunk is not None and rows > chunk else None


def integration_points(owner, method, steps):
    """Captum's ``(step_sizes, alphas)`` for ``method`` with ``steps`` points (clear error)."""
    try:
        step_sizes, alphas = _compat.approximation_parameters(method)
        return step_sizes(steps), alphas(steps)
    except (ValueError, AssertionError) as error:
        reason = error or "Captum needs steps > 1"
        raise ManipBenchError(f"{owner}: cannot integrate with method={method!r} and "
                              f"steps={steps!r} ({reason})") from error


class IntegratedGradients(SampleChunking, CaptumAttributor):
    """Integrated gradients from a zero baseline (``steps`` points, the paper uses 30).

    ``internal_batch_size``: see :class:`SampleChunking`.
    """

    name, rule, method_class = ("captum.integrated_gradients", "integrated gradients",
                                CaptumIntegratedGradients)
    preset = "integrated_gradients"

    def __init__(self, model, steps=30, method="gausslegendre",
                 internal_batch_size=AUTO):
        super().__init__(model, n_steps=steps, method=method)
        self._set_chunking(internal_batch_size)
        self.step_sizes, self.alphas = integration_points(self.name, method, steps)

    def attribute(self, x, target):
        chunk = self.chunked(x, len(self.alphas) * x.shape[0])
        if chunk is None:
            return super().attribute(x, target)
        x = input_with_grad(x)
        alphas = torch.tensor(self.alphas, device=x.device, dtype=x.dtype)
        # Captum rounds the step sizes to float32 before weighting the gradients
        weights = torch.tensor(self.step_sizes).float().to(device=x.device, dtype=x.dtype)
        plan = IntegratedGradientsPlan(self.model, self.activations, target, alphas, weights,
                                       chunk)
        return self.model(x), ChunkedRelevance.apply(x, plan)


class NoisyAttributor(SampleChunking, CaptumAttributor):
    """Average of a Captum method over noisy copies of the input, graph kept.

    Draws random numbers in the same order as Captum's ``NoiseTunnel`` (and GradientShap's
    baseline draw), so with the same seeds it returns Captum's map exactly. The draws
    happen once per call; the chunked backward reuses them. ``internal_batch_size``:
    see :class:`SampleChunking`.
    """

    draw_baselines = False

    def __init__(self, model, samples=10, stdev=0.05,
                 internal_batch_size=AUTO):
        super().__init__(model)
        self.samples, self.stdev = int(samples), float(stdev)
        self._set_chunking(internal_batch_size)

    def attribute(self, x, target):
        x = input_with_grad(x)
        n = self.samples
        kwargs = {}
        if self.draw_baselines:  # Captum draws one baseline per row (the baseline is zero)
            baselines = torch.zeros_like(x[:1])
            kwargs["baselines"] = baselines[_compat.draw_baseline_rows(1, n * x.shape[0])]
        noise = _compat.draw_noise(x, n, self.stdev)
        chunk = self.chunked(x, noise.shape[0])
        if chunk is not None:
            plan = self.plan(target, noise, chunk)
            return self.model(x), ChunkedRelevance.apply(x, plan)
        noisy = x.repeat_interleave(n, dim=0) + noise
        relevance = self.method.attribute(noisy, target=target.repeat_interleave(n), **kwargs)
        relevance = relevance.view(x.shape[0], n, *x.shape[1:]).mean(1)
        return self.model(x), relevance

    def plan(self, target, noise, chunk_rows):
        """The :class:`~manip_bench.attributors.chunked.SamplePlan` of one call."""
        raise NotImplementedError


class SmoothGrad(NoisyAttributor):
    """SmoothGrad: mean |gradient| over Gaussian noise (Captum NoiseTunnel over Saliency)."""

    name, rule, method_class = "captum.smoothgrad", "SmoothGrad over absolute gradient", CaptumSaliency

    def plan(self, target, noise, chunk_rows):
        return SmoothGradPlan(self.model, self.activations, target, noise, self.samples,
                              chunk_rows)


class GradientShap(NoisyAttributor):
    """GradientSHAP with a zero baseline (Captum's ``GradientShap``)."""

    name, rule = "captum.gradient_shap", "GradientSHAP"
    method_class = staticmethod(lambda model: _compat.InputBaselineXGradient(model))
    draw_baselines = True

    def __init__(self, model, samples=5, stdev=0.0, internal_batch_size=AUTO):
        super().__init__(model, samples, stdev, internal_batch_size)

    def plan(self, target, noise, chunk_rows):
        # Captum's InputBaselineXGradient draws one path coefficient per row, after the noise
        alphas = _compat.draw_path_points(noise)
        return GradientShapPlan(self.model, self.activations, target, noise, alphas,
                                self.samples, chunk_rows)


class ModifiedBackprop(Attributor):
    """Gradient with the ReLU backward replaced by a rule (guided backprop, deconvolution).

    Captum hooks only ``nn.ReLU`` (on a softplus network its guided backprop is the plain
    gradient) and its tensor hooks fire again in a second backward; here the rule lives in
    the activation's own differentiable backward, for ReLU and Softplus(beta) alike.
    """

    library = "captum"
    needs_softplus = True
    backward_rule = None

    def __init__(self, model):
        super().__init__(model)
        for activation in self.activations:
            activation.backward_rule = self.backward_rule

    def attribute(self, x, target):
        x = input_with_grad(x)
        with torch.enable_grad():
            output = self.model(x)
            with rule_active(self.activations):
                (relevance,) = torch.autograd.grad(
                    output, x, one_hot(target, output), create_graph=True)
        return output, relevance


class GuidedBackprop(ModifiedBackprop):
    """Guided backpropagation (equals Captum's ``GuidedBackprop`` on the ReLU network)."""

    name, rule, backward_rule = "captum.guided_backprop", "guided backprop", "guided"


class Deconvolution(ModifiedBackprop):
    """Deconvolution: its map is locally constant in x, so it cannot be attacked."""

    name, rule, backward_rule = "captum.deconvolution", "deconvolution", "deconv"
    attackable = False
    not_attackable_reason = "its map is locally constant in x (zero derivative)"


class DeepLift(Attributor):
    """Captum's DeepLift (Rescale rule, zero baseline); explanation only.

    Captum's DeepLift detaches its multipliers, so this map has no derivative in x here.
    """

    name, library, rule = "captum.deeplift", "captum", "DeepLIFT rescale"
    swap_relu = False  # Captum's DeepLift recognises exact nn.ReLU modules only
    attackable = False
    not_attackable_reason = "Captum's DeepLift detaches its multipliers (no derivative in x)"

    def __init__(self, model):
        super().__init__(model)
        self.method = CaptumDeepLift(self.model)

    def attribute(self, x, target):
        relevance = self.method.attribute(x.detach().requires_grad_(), target=target)
        with torch.no_grad():
            return self.model(x), relevance.detach()
