"""Geometry of the explained output's level sets (Dombrowski et al. 2019, section 4).

The gradient explanation of an output ``g`` points along the unit normal
``h(x) = grad g / |grad g|`` of the level set ``S = {x : g(x) = c}`` through ``x``. How
fast ``h`` can turn while ``x`` stays on ``S`` is set by the principal curvatures of
``S``: the eigenvalues of the shape operator (Weingarten map)::

    L = -(1 / |grad g|) P H P,      P = I - n n^T,  n = h(x),  H = Hessian of g

on the tangent space of ``S``. Theorem 1 of the paper: along a path on ``S``,
``|h(x1) - h(x0)| <= |lambda_max| * d_g(x1, x0)`` with ``lambda_max`` the largest absolute
principal curvature on the path and ``d_g`` the path's length. A ReLU network has
flat level sets almost everywhere (zero Hessian), so curvature is measured on the
Softplus(beta) copy that the attributors prepare; its curvature grows with beta.

Sign convention: ``n`` points along ``grad g``, so the sphere ``g(x) = |x|`` of radius ``r``
has every principal curvature equal to ``-1/r`` (magnitude ``1/r``).

Only Hessian-vector products are computed (double backpropagation through the
gradient's graph, kept once per point), and the top eigenvalues come from Lanczos
(ARPACK's ``eigsh`` on a ``LinearOperator``): no dense Hessian, whatever the input size.
"""
import dataclasses
import json
import time

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

from . import attributors, defences
from .defaults import BETAS as DEFAULT_BETAS  # the curvature-vs-beta sweep's
from .defaults import CURVATURE_TOL as DEFAULT_TOL  # ARPACK's relative tolerance
from .errors import ManipBenchError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_dtype(dtype):
    """``None``, a torch floating dtype or ``"float32"`` / ``"float64"`` -> torch dtype or None."""
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ManipBenchError(f"dtype must be float32 or float64, got {dtype!r}")


def parse_betas(betas):
    """Betas as a non-empty list of positive finite floats, from numbers or "1,2,5"."""
    return defences.positive_numbers(betas, "betas")


def prepare(model, beta=None, dtype=None):
    """The explained network: a private copy of ``model`` with Softplus(beta) for its ReLUs.

    Parameters
    ----------
    model : torch.nn.Module or manip_bench.attributors.Attributor
        Never modified: the copy is the one the attributors prepare (read-only weight
        aliases, ``nn.ReLU`` modules and ``F.relu`` calls follow ``set_beta``). An
        attributor is used as it is (its beta is changed).
    beta : float, optional
        Softplus beta; ``None`` keeps ReLU (zero curvature almost everywhere).
    dtype : torch.dtype or str, optional
        ``torch.float64`` converts the copy (the caller's weights stay as they are).

    Returns
    -------
    manip_bench.attributors.Attributor
        A ``captum.saliency`` attributor; ``.model`` is the network whose level sets are
        measured, and calling it validates images and targets.
    """
    if isinstance(model, attributors.Attributor):
        explain = model
        if not explain.needs_softplus:
            raise ManipBenchError(f"{explain.name} does not swap ReLU for softplus; pass the "
                                  f"model itself")
    else:
        explain = attributors.create("captum.saliency", model)
    dtype = parse_dtype(dtype)
    if dtype is not None:
        explain.model.to(dtype)  # converts the copy's aliases; the caller's tensors are untouched
    explain.set_beta(None if beta is None else float(beta))
    return explain


def logit(network, target):
    """``g(x)``: the ``target`` logit of ``network`` per sample, shape (N,)."""
    def g(x):
        output = network(x)
        return output.gather(1, target.view(-1, 1).to(output.device)).squeeze(1)
    return g


class LevelSet:
    """The level sets of ``g`` through a batch of points, with their second-order geometry.

    ``g`` maps a batch ``x`` (N, ...) to values (N,), each depending only on its own
    sample (a classifier's logit does). The gradient is computed once with its graph;
    every Hessian-vector product is then one backward pass through that graph, batched
    over the N samples.

    Attributes
    ----------
    value, gradient, grad_norm, normal : torch.Tensor
        ``g(x)`` (N,), ``grad g`` (N, ...), ``|grad g|`` (N,) and ``n = grad g / |grad g|``.
    products : int
        Hessian-vector products computed so far (each counts once, whatever N).
    """

    def __init__(self, g, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise ManipBenchError("x must be a floating-point tensor of shape (N, ...)")
        self.x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = g(self.x)
            if value.shape != (x.shape[0],):
                raise ManipBenchError(f"g must return one value per sample, shape "
                                      f"({x.shape[0]},); got {tuple(value.shape)}")
            (self._gradient,) = torch.autograd.grad(value.sum(), self.x, create_graph=True)
        self.value = value.detach()
        self.gradient = self._gradient.detach()
        self.grad_norm = self.gradient.flatten(1).norm(dim=1)
        flat = (self.grad_norm == 0).nonzero().flatten().tolist()
        if flat:
            raise ManipBenchError(f"the gradient is zero at sample(s) {flat}: no level set "
                                  f"surface passes there (a critical point), so it has no "
                                  f"curvature")
        self.normal = self.gradient / self._per_sample(self.grad_norm)
        self.products = 0

    def _per_sample(self, values):
        return values.view(-1, *([1] * (self.x.dim() - 1)))

    def _dot(self, a, b):
        return (a * b).flatten(1).sum(1)

    def hvp(self, v):
        """``H_i v_i`` for every sample i (``v`` shaped like ``x``)."""
        self.products += 1
        if not self._gradient.requires_grad:  # the gradient does not depend on x: H = 0
            return torch.zeros_like(v)
        (hv,) = torch.autograd.grad(self._gradient, self.x, grad_outputs=v.to(self.x.dtype),
                                    retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()

    def project(self, v):
        """``P v``: the component of ``v`` tangent to each level set."""
        return v - self.normal * self._per_sample(self._dot(self.normal, v))

    def shape_operator(self, v):
        """``L v = -(1/|grad g|) P H P v`` for every sample (the Weingarten map)."""
        return -self.project(self.hvp(self.project(v))) / self._per_sample(self.grad_norm)

    def normal_turning(self):
        """``|P H n| / |grad g|`` per sample: how fast ``h`` turns per unit step along ``n``.

        The derivative of ``h`` along any direction ``v`` is ``(1/|grad g|) P H v``; its
        tangential part is ``-L v_t`` (bounded by the principal curvatures), and a step
        across the level sets adds ``(1/|grad g|) P H n (n . v)``, which no curvature of
        ``S`` bounds.
        """
        turned = self.project(self.hvp(self.normal)) / self._per_sample(self.grad_norm)
        return turned.flatten(1).norm(dim=1)

    def operator(self):
        """The shape operator of a one-point level set as a float64 SciPy ``LinearOperator``."""
        if self.x.shape[0] != 1:
            raise ManipBenchError("operator() needs a LevelSet of one point (x of shape (1, ...))")
        shape = self.x.shape
        dim = int(np.prod(shape))

        def matvec(v):
            t = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(shape)).to(self.x)
            out = self.shape_operator(t)
            return out.detach().to("cpu", torch.float64).numpy().reshape(-1)

        return LinearOperator((dim, dim), matvec=matvec, rmatvec=matvec, dtype=np.float64)


@dataclasses.dataclass
class Curvatures:
    """Top-k principal curvatures of the level sets through a batch of points.

    ``values`` (N, k): sorted by decreasing magnitude, signed (see the module's sign
    convention); ``lambda_max`` (N,): ``|values[:, 0]|``; ``value`` and ``grad_norm``
    (N,): ``g(x)`` and ``|grad g|``; ``products`` (N,): Hessian-vector products used;
    ``seconds`` (N,): time per point.
    """

    values: np.ndarray
    value: np.ndarray
    grad_norm: np.ndarray
    products: np.ndarray
    seconds: np.ndarray
    target: list = None
    beta: float = None

    @property
    def lambda_max(self):
        return np.abs(self.values[:, 0])

    def to_json(self):
        return {"beta": self.beta, "target": self.target, "curvatures": self.values.tolist(),
                "lambda_max": self.lambda_max.tolist(), "output": self.value.tolist(),
                "grad_norm": self.grad_norm.tolist(), "hvp": self.products.tolist(),
                "seconds": self.seconds.tolist()}


def check_k(k, dim):
    """Raise ManipBenchError unless 1 <= k <= dim - 1 (a level set in R^dim has dim - 1)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= dim - 1:
        raise ManipBenchError(f"k must be a whole number from 1 to {dim - 1}: a level set of an "
                              f"input with {dim} values has {dim - 1} principal curvatures; "
                              f"got {k!r}")
    return int(k)


def top_curvatures(level_set, k=5, seed=0, tol=DEFAULT_TOL, maxiter=None):
    """The ``k`` principal curvatures of largest magnitude of a one-point level set (Lanczos).

    ARPACK's implicitly restarted Lanczos (``eigsh``, ``which="LM"``) on the shape
    operator, started from a seeded random tangent vector, so results are reproducible.

    Returns
    -------
    numpy.ndarray
        (k,) curvatures, signed, sorted by decreasing magnitude.
    """
    operator = level_set.operator()
    k = check_k(k, operator.shape[0])
    rng = np.random.default_rng(seed)
    start = torch.as_tensor(rng.standard_normal(operator.shape[0])).to(level_set.x)
    start = level_set.project(start.view_as(level_set.x))
    if not level_set.shape_operator(start).any():
        return np.zeros(k)  # L v = 0 for a random v: a flat level set (ReLU, a hyperplane)
    try:
        values = eigsh(operator, k=k, which="LM",
                       v0=start.detach().to("cpu", torch.float64).numpy().reshape(-1),
                       tol=tol, maxiter=maxiter, return_eigenvectors=False)
    except ArpackNoConvergence as error:
        raise ManipBenchError(f"Lanczos did not converge to {k} curvatures (tol {tol}, maxiter "
                              f"{maxiter}); raise maxiter or tol") from error
    except ArpackError as error:
        raise ManipBenchError(f"Lanczos failed ({error}); try another seed or a smaller k") \
            from error
    return values[np.argsort(-np.abs(values), kind="stable")]


def curvatures(g, x, k=5, seed=0, tol=DEFAULT_TOL, maxiter=None, progress=None):
    """Top-k principal curvatures of the level sets of ``g`` through each sample of ``x``.

    Parameters
    ----------
    g : callable or list of callables
        Maps a batch ``x`` (N, ...) to values (N,), sample by sample (an analytic
        function, or :func:`logit` of a network); a list gives one function per sample
        (each then called on that sample alone, e.g. a logit with its own class).
    x : torch.Tensor
        (N, ...) points; each is treated on its own (one Lanczos run per point).
    k : int
        Number of curvatures, 1 to (values per sample) - 1.
    seed : int
        Seeds the Lanczos start vector.
    tol, maxiter
        ARPACK's relative tolerance and iteration limit.
    progress : callable, optional
        Called with the sample index after each point.

    Returns
    -------
    Curvatures
    """
    functions = list(g) if isinstance(g, (list, tuple)) else [g] * x.shape[0]
    if len(functions) != x.shape[0]:
        raise ManipBenchError(f"{len(functions)} functions for {x.shape[0]} points")
    check_k(k, int(np.prod(x.shape[1:])))
    rows = []
    for i in range(x.shape[0]):
        start = time.perf_counter()
        level_set = LevelSet(functions[i], x[i:i + 1])
        values = top_curvatures(level_set, k, seed, tol, maxiter)
        rows.append((values, level_set.value.item(), level_set.grad_norm.item(),
                     level_set.products, time.perf_counter() - start))
        if progress is not None:
            progress(i)
    values, value, norm, products, seconds = zip(*rows)
    return Curvatures(np.stack(values), np.array(value), np.array(norm), np.array(products),
                      np.array(seconds))


def _validate(explain, x, target):
    """Check ``x`` and ``target`` with the attributor (clear errors); default target: top-1."""
    if not isinstance(x, torch.Tensor):
        raise ManipBenchError("x must be a floating-point torch.Tensor of shape (N, C, H, W)")
    dtype = next((p.dtype for p in explain.model.parameters()), x.dtype)
    if x.is_floating_point():
        x = x.detach().to(device=explain.device, dtype=dtype)
    explain.check_images(x)
    explain.num_classes(x)  # a clear error for an input shape the model cannot take
    if target is None:
        with torch.no_grad():
            target = explain.model(x).argmax(1)
    explain(x, target)  # validates the target, the input shape, and that beta reached a ReLU
    if isinstance(target, int):
        target = torch.full((x.shape[0],), target, dtype=torch.long)
    return x, target.to(device=x.device, dtype=torch.long).reshape(-1)


def principal_curvatures(model, x, target=None, k=5, beta=None, dtype=None, seed=0,
                         tol=DEFAULT_TOL, maxiter=None, progress=None):
    """Top-k principal curvatures of the explained output's level sets at images ``x``.

    Parameters
    ----------
    model : torch.nn.Module or Attributor
        The classifier (never modified); see :func:`prepare`.
    x : torch.Tensor
        (N, C, H, W) images.
    target : int or torch.Tensor, optional
        Class whose logit is explained, per image; default: the network's top-1 class.
    k : int
        Curvatures per image, largest magnitude first.
    beta : float, optional
        Softplus beta for the network's ReLUs. Required for a ReLU network, whose level
        sets are flat almost everywhere.
    dtype : torch.dtype or str, optional
        ``torch.float64`` for a float64 copy of the network.
    seed, tol, maxiter, progress
        See :func:`curvatures`.

    Returns
    -------
    Curvatures
    """
    explain = prepare(model, beta, dtype)
    x, target = _validate(explain, x, target)
    check_k(k, int(np.prod(x.shape[1:])))
    functions = [logit(explain.model, target[i:i + 1]) for i in range(x.shape[0])]
    result = curvatures(functions, x, k, seed, tol, maxiter, progress)
    if beta is None and not np.any(result.values):
        raise ManipBenchError("the explained output has zero curvature here: the network is "
                              "piecewise linear (ReLU), so its level sets are flat almost "
                              "everywhere; pass beta to measure its Softplus(beta) copy")
    if not np.any(result.values):
        raise ManipBenchError("the explained output has zero curvature even at Softplus(beta): "
                              "the network has no activation to smooth (a linear model?)")
    result.target, result.beta = target.tolist(), beta
    return result


def curvature_vs_beta(model, x, target=None, betas=DEFAULT_BETAS, k=5, dtype=None, seed=0,
                      tol=DEFAULT_TOL, progress=None):
    """:func:`principal_curvatures` of the same images and logits at every beta.

    The target defaults to the ReLU network's top-1 class, so every beta measures the
    same logit. ``progress(beta, i)`` is called after each image. Returns a list of
    :class:`Curvatures`, one per beta.
    """
    betas = parse_betas(betas)
    explain = prepare(model, None, dtype)
    x, target = _validate(explain, x, target)
    results = []
    for beta in betas:
        explain.set_beta(beta)
        results.append(principal_curvatures(
            explain, x, target, k, beta, None, seed, tol,
            progress=None if progress is None else (lambda i, b=beta: progress(b, i))))
    return results


# --- the bound along paths -------------------------------------------------------------------

def gradients(network, x, target, chunk=256):
    """The ``target`` logits (N,) of ``network`` at ``x`` and their input gradients (N, ...).

    First order only (no graph kept), computed in chunks of ``chunk`` samples.
    """
    values, grads = [], []
    for part, classes in zip(torch.split(x, chunk), torch.split(target, chunk)):
        part = part.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = logit(network, classes)(part)
            (grad,) = torch.autograd.grad(value.sum(), part)
        values.append(value.detach())
        grads.append(grad)
    return torch.cat(values), torch.cat(grads)


def path_length(points):
    """Length of each polyline ``points`` (T+1, N, ...) -> (N,): the sum of its segments."""
    return (points[1:] - points[:-1]).flatten(2).norm(dim=2).sum(0)


def _flat_paths(points, target):
    """(T+1, N, ...) points and (N,) classes -> ((T+1)*N, ...) points and their classes."""
    steps, n = points.shape[:2]
    return points.reshape(steps * n, *points.shape[2:]), target.repeat(steps)


def project_to_level_set(network, points, target, level, iterations=8):
    """Move every point of N paths onto its path's level set ``g = level`` (Newton steps).

    ``points`` (T+1, N, ...), ``target`` and ``level`` (N,): path i lies on
    ``{x : logit_target[i](x) = level[i]}`` afterwards. Each point moves along the
    gradient, ``x <- x - (g(x) - c) grad g / |grad g|^2``. Returns the projected points
    and the largest remaining ``|g - c|`` per path.
    """
    flat, classes = _flat_paths(points, target)
    goal = level.repeat(points.shape[0])
    for _ in range(iterations):
        value, grad = gradients(network, flat, classes)
        step = (value - goal) / grad.flatten(1).pow(2).sum(1).clamp_min(1e-30)
        flat = flat - grad * step.view(-1, *([1] * (flat.dim() - 1)))
    value, _ = gradients(network, flat, classes)
    residual = (value - goal).abs().view(points.shape[:2]).amax(0)
    return flat.view_as(points), residual


def _paths_on(explain, points, target):
    if not isinstance(points, torch.Tensor) or points.dim() < 3 or points.shape[0] < 2:
        raise ManipBenchError("points must be a tensor (T+1, N, ...) with at least two points "
                              "per path")
    dtype = next((p.dtype for p in explain.model.parameters()), points.dtype)
    points = points.detach().to(device=explain.device, dtype=dtype)
    target = torch.as_tensor(target, device=points.device).long().reshape(-1)
    if target.shape[0] != points.shape[1]:
        raise ManipBenchError(f"{target.shape[0]} targets for {points.shape[1]} paths")
    return points, target


def trajectory_bound(model, points, target, beta, sample_every=10, dtype=None, seed=0, tol=1e-4,
                     progress=None):
    """Theorem 1 along recorded paths: normal change against ``lambda_max`` x length.

    Parameters
    ----------
    model : torch.nn.Module or Attributor
        The classifier; ``g`` is the ``target`` logit of its Softplus(``beta``) copy.
    points : torch.Tensor
        (T+1, N, C, H, W): N paths of T steps (e.g. :func:`record_trajectory`).
    target : torch.Tensor
        (N,) explained class per path.
    beta : float
        Softplus beta (the network the paths are measured on).
    sample_every : int
        ``lambda_max`` is the largest ``|lambda_1|`` over points 0, s, 2s, ... and T.
    progress : callable, optional
        Called with (done, total) after each sampled point.

    Returns
    -------
    dict
        Per path (lists of N floats): ``length``; ``normal_change`` ``|h(x_T) - h(x_0)|``;
        ``lambda_max``; ``ratio`` = normal_change / (lambda_max * length) (Theorem 1
        holds on a level set when <= 1); ``lambda_start`` (``|lambda_1|`` at ``x_0``);
        ``output_start`` and ``output_change`` ``g(x_T) - g(x_0)``; ``normal_length`` and
        ``tangent_length`` (the path's length across and along the level sets, sums of
        ``|n . dx|`` and ``|P dx|`` over its segments); ``normal_turning_max`` (largest
        sampled ``|P H n| / |grad g|``); ``general_bound`` = lambda_max * tangent_length +
        normal_turning_max * normal_length, the bound that also holds off the level set
        (where ``g`` is twice differentiable), and ``general_ratio`` = normal_change /
        general_bound; ``turning`` (sum of the per-step normal changes, >= normal_change);
        ``step_ratio`` (per path, T values: ``|h(x_t+1) - h(x_t)| / (lambda_max |dx_t|)``,
        the same test step by step) and ``steps_over_1``; ``pool_switch_steps`` (steps on
        which a max-pool window changes its winner: there the gradient jumps, see
        :func:`pool_switches`).
    """
    explain = prepare(model, beta, dtype)
    points, target = _paths_on(explain, points, target)
    steps, n = points.shape[:2]
    value, grad = gradients(explain.model, *_flat_paths(points, target))
    value = value.view(steps, n)
    grad = grad.view(steps, n, -1)
    normal = grad / grad.norm(dim=2, keepdim=True).clamp_min(1e-30)
    segment = (points[1:] - points[:-1]).flatten(2)
    across = (normal[:-1] * segment).sum(2)
    along = (segment - normal[:-1] * across.unsqueeze(2)).norm(dim=2)
    sampled = sorted(set(range(0, steps, max(1, int(sample_every)))) | {steps - 1})
    lam = torch.zeros(len(sampled), n, dtype=torch.float64)
    turning = torch.zeros(len(sampled), n, dtype=torch.float64)
    for j, t in enumerate(sampled):
        for i in range(n):
            level_set = LevelSet(logit(explain.model, target[i:i + 1]), points[t, i:i + 1])
            turning[j, i] = level_set.normal_turning().item()
            lam[j, i] = float(np.abs(top_curvatures(level_set, 1, seed, tol)[0]))
        if progress is not None:
            progress(j + 1, len(sampled))
    lambda_max, turning_max = lam.amax(0), turning.amax(0)
    step_turn = (normal[1:] - normal[:-1]).norm(dim=2).double().cpu()
    step_length = segment.norm(dim=2).double().cpu()
    step_ratio = step_turn / (lambda_max * step_length)
    normal_change = (normal[-1] - normal[0]).norm(dim=1).double().cpu()
    length = step_length.sum(0)
    normal_length = across.abs().double().cpu().sum(0)
    tangent_length = along.double().cpu().sum(0)
    general = lambda_max * tangent_length + turning_max * normal_length
    return {
        "length": length.tolist(), "normal_change": normal_change.tolist(),
        "lambda_max": lambda_max.tolist(), "lambda_start": lam[0].tolist(),
        "ratio": (normal_change / (lambda_max * length)).tolist(),
        "output_start": value[0].double().cpu().tolist(),
        "output_change": (value[-1] - value[0]).double().cpu().tolist(),
        "normal_length": normal_length.tolist(), "tangent_length": tangent_length.tolist(),
        "normal_turning_max": turning_max.tolist(),
        "general_bound": general.tolist(), "general_ratio": (normal_change / general).tolist(),
        "turning": step_turn.sum(0).tolist(), "step_ratio": step_ratio.T.tolist(),
        "steps_over_1": (step_ratio > 1).sum(0).tolist(),
        "pool_switch_steps": (pool_switches(explain.model, points) > 0).sum(0).tolist(),
        "sampled_steps": sampled, "beta": float(beta),
    }


def pool_switches(network, points, chunk=256):
    """Max-pool windows whose winner changes on each step of N paths, shape (T, N).

    A max-pool is piecewise linear: softplus does not smooth it, and where a window's
    largest input changes, the network's gradient jumps (the level set has a kink,
    a curvature no Hessian sees). Counted over the ``nn.MaxPool2d`` modules of
    ``network`` (functional max-pool calls are not seen).
    """
    pools = [m for m in network.modules() if isinstance(m, torch.nn.MaxPool2d)]
    steps, n = points.shape[:2]
    if not pools:
        return torch.zeros(steps - 1, n, dtype=torch.long)
    captured = []

    def hook(module, inputs, output):
        _, index = torch.nn.functional.max_pool2d(
            inputs[0], module.kernel_size, module.stride, module.padding, module.dilation,
            ceil_mode=module.ceil_mode, return_indices=True)
        captured.append(index.flatten(1))

    handles = [pool.register_forward_hook(hook) for pool in pools]
    counts, previous = [], None
    try:
        with torch.no_grad():
            for t in range(steps):
                captured.clear()
                for part in torch.split(points[t], chunk):
                    network(part)
                # captured: pool 1, pool 2, ... for chunk 1, then for chunk 2, ...
                current = torch.cat([torch.cat(captured[j::len(pools)])
                                     for j in range(len(pools))], 1)
                if previous is not None:
                    counts.append((current != previous).sum(1))
                previous = current
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(counts)


def step_diagnostics(model, points, target, beta, steps, substeps=16, dtype=None, seed=0,
                     tol=1e-4):
    """Why single steps of paths turn the normal faster than ``lambda_max`` allows.

    For each ``(t, i)`` in ``steps`` (step t of path i, from ``points[t, i]`` to
    ``points[t + 1, i]``), with ``L`` its length and ``dh`` the change of the unit normal:

    ``local_ratio``
        ``|dh| / (lambda_ends * L)`` with ``lambda_ends`` the larger ``|lambda_1|`` at the
        step's two ends: <= 1 when the curvature where the step is explains it (and a
        sparse sampling of ``lambda_max`` along the path missed it).
    ``normal_share``
        ``|n . dx| / L``: how much of the step crosses level sets.
    ``substep_turning``, ``hessian_turning``, ``hessian_share``
        The step cut into ``substeps`` equal pieces: the sum of the normal's changes over
        the pieces, the sum of what the Hessian predicts for each piece,
        ``|P H dx_k| / |grad g|`` (first order), and their ratio. Near 1 where ``g`` is
        twice differentiable along the step; far below 1 when the gradient jumps
        (kinks, such as max-pool switches, which no Hessian sees).
    ``largest_substep``
        The largest piece's share of ``substep_turning`` (``1/substeps`` for an even
        turn, near 1 for one jump).
    ``pool_switches``
        Max-pool windows that change their winner between the step's ends.
    """
    explain = prepare(model, beta, dtype)
    points, target = _paths_on(explain, points, target)
    network = explain.model
    fractions = torch.linspace(0, 1, substeps + 1, dtype=points.dtype, device=points.device)

    def lam(x, i):
        level_set = LevelSet(logit(network, target[i:i + 1]), x[None])
        return float(np.abs(top_curvatures(level_set, 1, seed, tol)[0]))

    rows = []
    for t, i in steps:
        a, b = points[t, i], points[t + 1, i]
        line = a[None] + fractions.view(-1, *([1] * a.dim())) * (b - a)[None]
        level_set = LevelSet(logit(network, target[i].repeat(len(line))), line)
        normal = level_set.normal.flatten(1)
        pieces = (normal[1:] - normal[:-1]).norm(dim=1)
        piece = ((b - a) / substeps)[None].expand_as(line)
        predicted = (level_set.project(level_set.hvp(piece)).flatten(1).norm(dim=1)
                     / level_set.grad_norm)[:-1]
        length = float((b - a).norm())
        turn = float((normal[-1] - normal[0]).norm())
        lambda_ends = max(lam(a, i), lam(b, i))
        rows.append({
            "t": int(t), "path": int(i), "length": length, "turn": turn,
            "lambda_ends": lambda_ends, "local_ratio": turn / (lambda_ends * length),
            "normal_share": float((normal[0] * (b - a).flatten()).sum().abs()) / length,
            "substep_turning": float(pieces.sum()), "hessian_turning": float(predicted.sum()),
            "hessian_share": float(predicted.sum() / pieces.sum()),
            "largest_substep": float(pieces.max() / pieces.sum()),
            "pool_switches": int(pool_switches(network, torch.stack([a, b])[:, None])[0, 0]),
        })
    return rows


def level_set_path(model, points, target, beta, dtype=None, iterations=8):
    """The paths ``points`` (T+1, N, ...) moved onto the level set through their start.

    Each point is projected onto ``{g = g(x_0)}`` of its path (Newton steps along the
    gradient, :func:`project_to_level_set`): a path on one level set, whose Theorem 1
    ratio can be set beside the original path's. Returns the projected points and the
    largest ``|g - g(x_0)|`` left per path.
    """
    explain = prepare(model, beta, dtype)
    points, target = _paths_on(explain, points, target)
    with torch.no_grad():
        level = logit(explain.model, target)(points[0])
    return project_to_level_set(explain.model, points, target, level, iterations)


@dataclasses.dataclass
class Trajectory:
    """The path an attack took: ``points`` (T+1, N, C, H, W) are ``x_0`` ... ``x_T``.

    ``target`` (N,) is the class the attack keeps (the logit explained); ``beta`` the
    softplus beta of the attacked network (``None``: beta grown by the attack);
    ``target_pcc`` (N,) the PCC of the best manipulated map with the target map,
    judged as the attack judges; ``class_kept`` (N,) whether that image kept its class.
    """

    points: torch.Tensor
    target: torch.Tensor
    beta: float
    target_pcc: list
    class_kept: list


def record_trajectory(attack, x, target_map=None, progress=None):
    """Run ``attack`` (a :class:`~manip_bench.attack.ManipulationAttack`) and keep its path.

    Uses the attack's own ``start`` / ``step`` loop, so the path is exactly what
    ``attack(x, target_map)`` walks (a restart of the schedule is a jump in the path).
    ``progress(step)`` is called after each step.
    """
    from . import metrics
    state = attack.start(x, target_map)
    points = [state.x_adv.detach().clone()]
    try:
        while state.step < attack.config.iterations:
            attack.step(state)
            points.append(state.x_adv.detach().clone())
            if progress is not None:
                progress(state.step)
    finally:
        attack.explain.set_beta(None)
    output, _, best_map = attack.evaluate(state.best_x, state.original_class)
    pcc = metrics.map_similarity(best_map, state.reference.target_map)["pcc"] \
        if state.reference.target_map is not None else [float("nan")] * len(state.x)
    kept = (output.argmax(1) == state.original_class).tolist()
    return Trajectory(torch.stack(points), state.original_class.clone(), _smoothing(attack), pcc,
                      kept)


def _smoothing(attack):
    """Softplus beta of the network an attack explains (None: ReLU, attacked via its surrogate)."""
    explain = attack.explain
    return explain.activations[0].smoothing if explain.smoothed else None


def summarize(values):
    """Median, 10th/90th percentile, min and max of the finite numbers in ``values``.

    ``n``: how many there were (NaN, e.g. the ratio of a step of length zero, left out).
    """
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        return {"median": None, "p10": None, "p90": None, "min": None, "max": None, "n": 0}
    return {"median": float(np.median(values)), "p10": float(np.percentile(values, 10)),
            "p90": float(np.percentile(values, 90)), "min": float(values.min()),
            "max": float(values.max()), "n": int(values.size)}


# --- one image over beta, written to a folder (``manip-bench geometry``) ---------------------

def image_sweep(model="cifar_vgg", weights="default", image=None, betas=DEFAULT_BETAS, k=5,
                target=None, dtype=None, seed=0, tol=DEFAULT_TOL, device="cpu", progress=None):
    """Top-k curvatures of one zoo model's logit at one image, for every beta (a record).

    ``image``: a file or bundled photo name (default: the bundled ``chelsea``);
    ``target``: the class explained (default: the ReLU network's top-1). Returns a
    JSON-ready dict; ``progress(beta, i)`` is called after each beta.
    """
    from . import data, models
    betas = parse_betas(betas)
    network = models.load(model, weights, device)
    x = data.load_image(image or data.DEFAULT_IMAGE, models.input_size(model))[None].to(device)
    sweep = curvature_vs_beta(network, x, target, betas, k, dtype, seed, tol, progress)
    names = models.class_names(model)
    target = sweep[0].target[0]
    rows = []
    for result in sweep:
        row = result.to_json()
        rows.append({"beta": row["beta"], "lambda_max": row["lambda_max"][0],
                     "curvatures": row["curvatures"][0], "output": row["output"][0],
                     "grad_norm": row["grad_norm"][0], "hvp": row["hvp"][0],
                     "seconds": row["seconds"][0]})
    from . import runtime
    return {"model": model, "weights": str(weights), "image": str(image or data.DEFAULT_IMAGE),
            "target": target, "target_class": names[target] if target < len(names) else str(target),
            "betas": betas, "k": k, "dtype": str(parse_dtype(dtype) or "model's own"),
            "seed": seed, "tol": tol, "device": str(device), "results": rows,
            "versions": runtime.versions()}


def save_image_sweep(record, out, toy=True):
    """Write ``geometry.json``, ``curvature_vs_beta.png`` and (``toy``) ``toy_level_sets.png``.

    The files are written to a temporary folder beside ``out`` and moved into place at the
    end, so an error leaves nothing half-written. ``out`` must not exist or be empty.
    """
    import shutil

    from . import geometry_figures as figures
    from .runtime import fresh_out_dir, move_into_place, staging_folder
    out = fresh_out_dir(out)
    staging = staging_folder(out)
    try:
        (staging / "geometry.json").write_text(json.dumps(record, indent=2))
        values = np.array([[row["curvatures"] for row in record["results"]]])
        figures.curvature_vs_beta_figure(
            record["betas"], values, staging / "curvature_vs_beta.png",
            title=f"{record['model']}, {record['image']}, logit of {record['target_class']}")
        if toy:
            figures.toy_figure(figures.toy_fields(), staging / "toy_level_sets.png",
                               title="a two-layer network on R^2: level sets and unit normals")
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# --- the toy picture ---------------------------------------------------------------------------

def toy_network(hidden=8, seed=0):
    """A two-layer network R^2 -> R (Linear, ReLU, Linear), seeded, for the intuition figure."""
    generator = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 1))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return net.eval()


def normal_field(model, beta=None, extent=2.0, resolution=41):
    """``g`` and its unit normal ``h = grad g / |grad g|`` on a square grid of a 2-input model.

    Returns ``(xs, ys, g, h)``: grid axes (R,), values (R, R) and normals (R, R, 2), as
    NumPy arrays; ``model`` maps (N, 2) to (N, 1) or (N,). The model is prepared as
    everywhere here (a private copy, ReLU -> Softplus(beta)).
    """
    explain = prepare(model, beta)
    axis = torch.linspace(-extent, extent, resolution)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    network = explain.model
    value, grad = gradients(lambda x: network(x).reshape(len(x), -1), grid,
                            torch.zeros(len(grid), dtype=torch.long))
    normal = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
    shape = (resolution, resolution)
    return (axis.numpy(), axis.numpy(), value.reshape(shape).numpy(),
            normal.reshape(*shape, 2).numpy())


__all__ = ["Curvatures", "DEFAULT_BETAS", "LevelSet", "Trajectory", "curvature_vs_beta",
           "curvatures", "gradients", "image_sweep", "level_set_path", "logit", "normal_field",
           "parse_betas", "parse_dtype", "path_length", "pool_switches", "prepare",
           "principal_curvatures", "project_to_level_set", "record_trajectory",
           "save_image_sweep", "step_diagnostics", "summarize", "top_curvatures", "toy_network",
           "trajectory_bound"]
