"""Sample-based maps (integrated gradients, SmoothGrad, GradientSHAP) in chunks of samples.

Such a map is a sum over sample rows: row ``r`` evaluates the model at a point
``p_r(x)`` built from one image of ``x`` (a point on the integration path, a noisy
copy), takes the gradient ``g_r`` of the target logit there, and adds a term
``c_r(x, g_r)`` to that image's relevance. Differentiating a loss on the map through
one graph over all rows keeps every row's double-backprop graph alive at once: memory
grows with the number of samples (VGG-16 at 224², 30 integration steps: about 8 GB).

:class:`ChunkedRelevance` gives the same map and the same input gradient with one
chunk's graph alive at a time:

* forward: the map, chunk by chunk, with first-order gradients only (no graph kept);
* backward, given ``v = dL/d(relevance)``: per chunk, rebuild its graph (gradient with
  ``create_graph=True``) and add the vector-Jacobian product ``v^T d(sum_r c_r)/dx``.
  The map is a sum over rows, so these products add up to the full one exactly (up to
  the order of floating-point additions).

The rows' random numbers (noise, path coefficients) are drawn once per call by the
caller and kept in the :class:`SamplePlan`, so the backward recomputes the same rows.
The activations' softplus ``beta`` at the forward is also restored for the backward.

A second differentiation (``create_graph=True`` on a loss of the map, then differentiate
again) is supported: the backward then keeps every chunk's graph, linked to ``x``, so
its memory is that of the all-at-once computation. The attack engine differentiates
once and never pays that.
"""
import contextlib

import torch


class SamplePlan:
    """The sample rows of one call: which image each row belongs to, and how it enters the map.

    Subclasses implement :meth:`points` and :meth:`contribution`; both must be
    differentiable in ``x`` and use only random numbers drawn beforehand.

    Parameters
    ----------
    model : torch.nn.Module
        The attributor's prepared model.
    activations : list
        The attributor's ``SmoothReLU`` modules (their ``beta`` is recorded now).
    target : torch.Tensor
        (N,) class index per image.
    image : torch.Tensor
        (R,) image index of each row.
    chunk_rows : int
        Rows per pass (a chunk need not hold whole images).
    """

    def __init__(self, model, activations, target, image, chunk_rows):
        self.model, self.activations = model, list(activations)
        self.betas = [activation.beta for activation in self.activations]
        self.image = image
        self.row_target = target[image]
        self.chunk_rows = max(1, int(chunk_rows))

    @property
    def rows(self):
        return self.image.shape[0]

    def chunks(self):
        """Row slices of at most ``chunk_rows`` rows, in order."""
        return [slice(start, min(start + self.chunk_rows, self.rows))
                for start in range(0, self.rows, self.chunk_rows)]

    def points(self, x, rows):
        """(k, C, H, W) inputs at which the model's gradient is taken for ``rows``."""
        raise NotImplementedError

    def contribution(self, x, rows, gradient):
        """(k, C, H, W) terms these rows add to their images' relevance."""
        raise NotImplementedError

    def chunk(self, x, rows, create_graph):
        """The terms of ``rows``; with ``create_graph`` differentiable in ``x`` (second order)."""
        points = self.points(x, rows)
        if not points.requires_grad:
            points.requires_grad_()
        output = self.model(points)
        selected = output.gather(1, self.row_target[rows].view(-1, 1)).sum()
        (gradient,) = torch.autograd.grad(selected, points, create_graph=create_graph)
        return self.contribution(x, rows, gradient)

    @contextlib.contextmanager
    def recorded_betas(self):
        """Run with the activations' ``beta`` as it was when the plan was made."""
        current = [activation.beta for activation in self.activations]
        for activation, beta in zip(self.activations, self.betas):
            activation.beta = beta
        try:
            yield
        finally:
            for activation, beta in zip(self.activations, current):
                activation.beta = beta


class ChunkedRelevance(torch.autograd.Function):
    """``relevance = ChunkedRelevance.apply(x, plan)``: see the module docstring."""

    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan = plan
        ctx.save_for_backward(x)
        x = x.detach()
        relevance = torch.zeros_like(x)
        with plan.recorded_betas():
            for rows in plan.chunks():
                with torch.enable_grad():
                    terms = plan.chunk(x, rows, create_graph=False)
                relevance.index_add_(0, plan.image[rows], terms.detach())
        return relevance

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        (x,) = ctx.saved_tensors
        higher_order = torch.is_grad_enabled()  # backward called with create_graph=True
        grad_x = None
        with plan.recorded_betas(), torch.enable_grad():
            for rows in plan.chunks():
                # first order (the attack): a detached copy, so each chunk's graph dies here;
                # higher order: x itself, so the result stays differentiable in x
                x_in = x if higher_order else x.detach().requires_grad_()
                terms = plan.chunk(x_in, rows, create_graph=True)
                (part,) = torch.autograd.grad(terms, x_in, grad[plan.image[rows]],
                                              create_graph=higher_order)
                grad_x = part if grad_x is None else grad_x + part
        return grad_x, None


class IntegratedGradientsPlan(SamplePlan):
    """Zero-baseline integrated gradients: row ``s * N + i`` is step ``s`` of image ``i``.

    Rows are ordered as in Captum (all images at the first step, then the next).
    ``alphas``/``weights``: the quadrature's points and weights, one per step.
    """

    def __init__(self, model, activations, target, alphas, weights, chunk_rows):
        steps, images = alphas.shape[0], target.shape[0]
        image = torch.arange(images, device=target.device).repeat(steps)
        super().__init__(model, activations, target, image, chunk_rows)
        self.alphas = alphas.repeat_interleave(images)
        self.weights = weights.repeat_interleave(images)

    def points(self, x, rows):
        return self.alphas[rows].view(-1, 1, 1, 1) * x[self.image[rows]]

    def contribution(self, x, rows, gradient):
        return gradient * self.weights[rows].view(-1, 1, 1, 1) * x[self.image[rows]]


class NoisyPlan(SamplePlan):
    """Row ``i * n + k`` is noisy copy ``k`` of image ``i`` (``noise``: (N * n, C, H, W))."""

    def __init__(self, model, activations, target, noise, samples, chunk_rows):
        image = torch.arange(target.shape[0], device=target.device).repeat_interleave(samples)
        super().__init__(model, activations, target, image, chunk_rows)
        self.noise, self.samples = noise, samples

    def noisy(self, x, rows):
        return x[self.image[rows]] + self.noise[rows]


class SmoothGradPlan(NoisyPlan):
    """SmoothGrad: mean over the noisy copies of the absolute gradient."""

    def points(self, x, rows):
        return self.noisy(x, rows)

    def contribution(self, x, rows, gradient):
        return gradient.abs() / self.samples


class GradientShapPlan(NoisyPlan):
    """GradientSHAP from a zero baseline: mean of ``noisy * gradient(alpha * noisy)``."""

    def __init__(self, model, activations, target, noise, alphas, samples, chunk_rows):
        super().__init__(model, activations, target, noise, samples, chunk_rows)
        self.alphas = alphas

    def points(self, x, rows):
        return self.alphas[rows].view(-1, 1, 1, 1) * self.noisy(x, rows)

    def contribution(self, x, rows, gradient):
        return self.noisy(x, rows) * gradient / self.samples
