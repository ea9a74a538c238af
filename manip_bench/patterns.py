"""Signal patterns for PatternAttribution (Kindermans et al., ICLR 2018), estimated from data.

For a layer with weights ``w`` and output ``y = w^T x`` (``x`` an input vector of a linear
layer, or an unfolded input patch of a convolution at one output position), the pattern
``a`` is the direction of the *signal* in ``x`` that ``y`` measures. The paper's
two-component estimator splits the samples by the regime of ``y``; for the positive
regime (the ReLU passes the output)::

    a+ = (E+[x y] - E+[x] E+[y]) / (w^T E+[x y] - w^T E+[x] E+[y])
       = cov+(x, y) / var+(y)

and likewise ``a-`` over the negative regime. The single-component (linear) estimator
``a = cov(x, y) / var(y)`` uses every sample.

Which estimate each layer gets (``regime="relu"``, the default):

* a convolution or linear layer whose output goes straight into an ``nn.ReLU`` module
  gets ``a+``: the ReLU discards the negative regime, so only ``a+`` describes the signal
  that reaches the next layer (the paper's choice for PatternAttribution);
* any other such layer (the logit layer) gets the linear estimate ``a``, as in the paper
  authors' and Dombrowski et al.'s reference code.

The regime is decided on the pre-activation *with* bias (where the ReLU is active); ``y``
in the statistics is ``w^T x`` without bias (covariances do not change under the shift).

Supported: ``nn.Conv2d`` (``groups=1``, zero padding, any stride/dilation) and
``nn.Linear`` layers of a ReLU network built from modules (``nn.ReLU``, not ``F.relu``);
every other module (max/avg pooling, flatten, input normalisation, dropout in eval mode)
has no pattern. Fold batch norm into the convolutions before estimating
(:func:`manip_bench.models.cifar_vgg.fold_batch_norm`).

Statistics are streamed: per layer and output unit, the count, the sums of ``x``, ``y``
and ``x * y`` over the unit's regime, accumulated in float64 batch by batch, so any
number of images fits in memory, on CPU or GPU.

Command line (any model of :mod:`manip_bench.models` and an image folder); the shipped
``models/cifar_vgg_patterns.pt`` was made from all 50,000 CIFAR-10 training images with::

    manip-bench patterns ../shared/data/cifar10/train --model cifar_vgg --weights default \\
        --threads 1 --out manip_bench/models/cifar_vgg_patterns.pt

(about 5.5 minutes on one CPU thread, JPEG decoding included; ``--limit N`` takes a
seeded random subset).
"""
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .attributors.base import prepare_model
from .defaults import PATTERN_REGIMES as REGIMES
from .errors import ManipBenchError


def pattern_layers(model):
    """The layers that get a pattern: ``{name: module}`` of every ``nn.Conv2d``/``nn.Linear``.

    Raises
    ------
    ManipBenchError
        for a convolution this module cannot handle (groups, non-zero padding mode,
        asymmetric ``padding="same"``).
    """
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, (nn.Conv2d, nn.Linear))}
    for name, module in layers.items():
        if isinstance(module, nn.Conv2d):
            conv_padding(module, name)
            if module.groups != 1 or module.padding_mode != "zeros":
                raise ManipBenchError(
                    f"layer {name!r}: patterns support convolutions with groups=1 and zero "
                    f"padding only (got groups={module.groups}, "
                    f"padding_mode={module.padding_mode!r})")
    return layers


def conv_padding(conv, name="?"):
    """The convolution's padding as a pair of ints (``"valid"``/symmetric ``"same"`` resolved)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(total % 2 for total in totals):
            raise ManipBenchError(f"layer {name!r}: padding='same' pads asymmetrically for this "
                                  f"kernel; give the padding as numbers")
        return tuple(total // 2 for total in totals)
    return tuple(conv.padding)


def weighted_input_sums(module, x, g):
    """``sums[k, f] = Σ_samples g[k] * x[f]`` over every output position, shape ``(K, F)``.

    ``g`` is shaped like the layer's output with ``K`` channels. For a convolution ``x`` is
    the unfolded input patch at each output position (``F.unfold`` order, matching
    ``weight.view(O, -1)``); the sums are computed as a convolution weight gradient, which
    never materialises the unfolded patches. For a linear layer ``x`` is the input vector.
    """
    if isinstance(module, nn.Conv2d):
        shape = (g.shape[1], module.in_channels, *module.kernel_size)
        sums = torch.nn.grad.conv2d_weight(x, shape, g, module.stride, conv_padding(module),
                                           module.dilation)
        return sums.reshape(shape[0], -1)
    return g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def _unit_dim(module):
    """The output dimension that indexes units: channels of a conv, the last of a linear."""
    return 1 if isinstance(module, nn.Conv2d) else -1


def _per_unit(module, tensor):
    """Sum over every dimension but the unit one, shape ``(O,)``."""
    dim = _unit_dim(module)
    return tensor.transpose(dim, -1).reshape(-1, tensor.shape[dim]).sum(0)


def _unit_view(module, vector):
    """``vector`` (O,) shaped to broadcast against the layer's output."""
    return vector.view(-1, 1, 1) if isinstance(module, nn.Conv2d) else vector


class PatternStatistics:
    """Streaming sums for one layer's pattern in one regime (``positive``/``negative``/``linear``).

    Per output unit: the count of samples in its regime and the sums of ``x``, ``y`` and
    ``x y`` over them (float64). ``y`` is shifted by the first batch's mean per unit, which
    leaves the covariance unchanged and avoids cancellation in ``E[xy] - E[x]E[y]``.
    """

    def __init__(self, module, regime):
        if regime not in ("positive", "negative", "linear"):
            raise ManipBenchError(f"unknown pattern regime {regime!r}")
        self.module, self.regime = module, regime
        self.shift = None
        self.count = self.sum_x = self.sum_y = self.sum_xy = 0

    def update(self, x, output):
        """Add one batch: the layer's input ``x`` and its output (pre-activation, with bias)."""
        module, dim = self.module, _unit_dim(self.module)
        y = output if module.bias is None else output - _unit_view(module, module.bias)
        if self.shift is None:
            self.shift = _per_unit(module, y) / (y.numel() // y.shape[dim])
        y = y - _unit_view(module, self.shift)
        if self.regime == "linear":
            weights = torch.ones_like(y)
            sums = weighted_input_sums(module, x, torch.cat([weights.narrow(dim, 0, 1), y], dim))
        else:
            weights = (output > 0 if self.regime == "positive" else output < 0).to(y.dtype)
            y = y * weights
            sums = weighted_input_sums(module, x, torch.cat([weights, y], dim))
        sum_x, sum_xy = sums[:-y.shape[dim]], sums[-y.shape[dim]:]
        self.count = self.count + _per_unit(module, weights).double()
        self.sum_x = self.sum_x + sum_x.double()
        self.sum_y = self.sum_y + _per_unit(module, y).double()
        self.sum_xy = self.sum_xy + sum_xy.double()

    def pattern(self):
        """The pattern, shaped like the weight: ``cov(x, y) / (w^T cov(x, y))`` per output unit.

        A unit with fewer than two samples in its regime, or with (numerically) zero
        variance there, gets a zero pattern.
        """
        if self.shift is None:
            raise ManipBenchError("no data was seen; patterns need at least one batch")
        n = self.count.clamp_min(1).unsqueeze(1)
        mean_x, mean_y = self.sum_x / n, self.sum_y.unsqueeze(1) / n
        covariance = self.sum_xy / n - mean_x * mean_y
        weight = self.module.weight.detach().reshape(covariance.shape[0], -1)
        denominator = (weight.double() * covariance).sum(1, keepdim=True)
        tolerance = 1e-12 * denominator.abs().max().clamp_min(1e-300)
        valid = (self.count.unsqueeze(1) >= 2) & (denominator > tolerance)
        pattern = torch.where(valid, covariance / torch.where(valid, denominator, 1), 0)
        return pattern.reshape(self.module.weight.shape).float()


def rectified_layers(model, layers, x):
    """Names of the ``layers`` whose output goes straight into an ``nn.ReLU`` (one forward)."""
    outputs, rectified, handles = {}, set(), []

    def remember(name):
        def hook(module, inputs, output):
            outputs[name] = output
        return hook

    def check(module, inputs):
        rectified.update(name for name, output in outputs.items() if inputs[0] is output)

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(remember(name)))
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                handles.append(module.register_forward_pre_hook(check))
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return rectified


def _check_regime(regime):
    if regime not in REGIMES:
        raise ManipBenchError(f"unknown pattern regime {regime!r}; choose from "
                              f"{', '.join(REGIMES)}")


def layer_regimes(model, layers, x, regime):
    """``{name: "positive" | "negative" | "linear"}`` for ``regime`` (see the module docstring)."""
    _check_regime(regime)
    if regime != "relu":
        return dict.fromkeys(layers, regime)
    rectified = rectified_layers(model, layers, x)
    return {name: "positive" if name in rectified else "linear" for name in layers}


def _as_images(batch):
    """The image tensor of a batch (a tensor, or the first element of ``(images, labels)``)."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        raise ManipBenchError("batches must yield floating-point image tensors (N, C, H, W) in "
                              "[0, 1], or (images, labels) tuples")
    return batch


def _progress(enabled, total):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    return Progress(TextColumn("estimating patterns"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("batches"), TimeElapsedColumn(), disable=not enabled,
                    transient=False)


@contextlib.contextmanager
def full_float32():
    """Switch off TF32 on CUDA while inside (its 10-bit mantissa visibly biases the covariances)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def estimate_patterns(model, batches, regime="relu", progress=True, total=None):
    """Estimate the PatternAttribution patterns of ``model`` from images.

    Parameters
    ----------
    model : torch.nn.Module
        A ReLU network of ``nn.Conv2d``/``nn.Linear`` layers (see the module docstring).
        It is not modified: the statistics are collected on a private copy, on the
        model's device (with TF32 switched off on CUDA).
    batches : iterable of torch.Tensor
        Image batches ``(N, C, H, W)`` as the model takes them (``[0, 1]`` for the
        project's models), or ``(images, labels)`` tuples; moved to the model's device.
    regime : {"relu", "positive", "negative", "linear"}
        ``"relu"`` (default): ``a+`` for layers followed by a ReLU, the linear estimate
        for the others; or the same estimator for every layer.
    progress : bool
        Show a rich progress bar.
    total : int, optional
        Number of batches, for the progress bar (default: ``len(batches)`` if defined).

    Returns
    -------
    dict of str to torch.Tensor
        ``{layer name: float32 pattern shaped like the layer's weight}``, on the CPU.
    """
    _check_regime(regime)
    model = prepare_model(model)
    layers = pattern_layers(model)
    if not layers:
        raise ManipBenchError("the model has no nn.Conv2d or nn.Linear layers to estimate "
                              "patterns for")
    parameter = next(model.parameters())
    statistics, handles = {}, []
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)

    def collect(name):
        def hook(module, inputs, output):
            statistics[name].update(inputs[0], output)
        return hook

    try:
        with _progress(progress, total) as bar, torch.no_grad(), full_float32():
            task = bar.add_task("patterns", total=total)
            for batch in batches:
                x = _as_images(batch).to(parameter.device, parameter.dtype)
                if not statistics:
                    regimes = layer_regimes(model, layers, x[:1], regime)
                    statistics.update({name: PatternStatistics(module, regimes[name])
                                       for name, module in layers.items()})
                    handles = [module.register_forward_hook(collect(name))
                               for name, module in layers.items()]
                model(x)
                bar.advance(task)
    finally:
        for handle in handles:
            handle.remove()
    if not statistics:
        raise ManipBenchError("batches yielded no images; patterns need data")
    return {name: stats.pattern().cpu() for name, stats in statistics.items()}


def save_patterns(patterns, path):
    """Save ``{layer name: pattern}`` as float32 CPU tensors (``torch.save``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: pattern.detach().cpu().float().contiguous()
                for name, pattern in patterns.items()}, path)
    return path


def load_patterns(path):
    """Load a patterns file written by :func:`save_patterns` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ManipBenchError(f"patterns file {str(path)!r} not found; estimate patterns with "
                              f"manip-bench patterns FOLDER --out FILE")
    try:
        patterns = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways, all mean the same
        raise ManipBenchError(f"{path}: cannot read it as a patterns file "
                              f"({type(error).__name__}: {error})") from error
    if not isinstance(patterns, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor)
            for key, value in patterns.items()):
        raise ManipBenchError(f"{path}: a patterns file holds a dict of layer name -> tensor")
    return patterns


def check_patterns(patterns, model, source="patterns"):
    """Return ``patterns`` after checking they fit ``model`` (names and weight shapes).

    Raises
    ------
    ManipBenchError
        naming the missing layers, the unexpected names and the wrong shapes.
    """
    if not isinstance(patterns, dict):
        raise ManipBenchError(f"{source}: expected a dict of layer name -> tensor or a file path, "
                              f"got {type(patterns).__name__}")
    layers = pattern_layers(model)
    missing = [name for name in layers if name not in patterns]
    unexpected = [name for name in patterns if name not in layers]
    shapes = [f"{name} {tuple(getattr(patterns[name], 'shape', ()))} vs "
              f"{tuple(module.weight.shape)}"
              for name, module in layers.items() if name in patterns
              and (not isinstance(patterns[name], torch.Tensor)
                   or tuple(patterns[name].shape) != tuple(module.weight.shape))]
    if missing or unexpected or shapes:
        problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                    for label, items in (("missing layers", missing),
                                         ("unexpected layers", unexpected),
                                         ("wrong shapes (patterns vs weights)", shapes)) if items]
        raise ManipBenchError(
            f"{source} do not match the model ({'; '.join(problems)}); estimate patterns for "
            f"this model with manip_bench.patterns.estimate_patterns or manip-bench "
            f"patterns FOLDER --out FILE")
    bad = [name for name in layers if not torch.isfinite(patterns[name]).all()]
    if bad:
        raise ManipBenchError(f"{source}: non-finite values in {', '.join(bad[:3])}")
    return patterns


def image_batches(folder, size, batch_size=100, limit=None, seed=0):
    """``[0, 1]`` image batches ``(N, 3, size, size)`` from every image under ``folder``.

    Files are sorted and, with ``limit``, a seeded random subset of that many is taken
    (in sorted order); see :func:`manip_bench.data.load_image` for the resizing.

    Returns
    -------
    iterable of torch.Tensor
        decoded lazily, batch by batch; has ``len`` (batches) and ``files``.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from .data import load_batch

    folder = Path(folder)
    if not folder.is_dir():
        raise ManipBenchError(f"{folder}: no such image folder")
    files = sorted(path for path in folder.rglob("*")
                   if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise ManipBenchError(f"{folder}: no images ({', '.join(IMG_EXTENSIONS)}) found")
    if limit is not None and limit < len(files):
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:limit]
        files = [files[i] for i in keep.sort().values.tolist()]
    return _Batches(files, size, batch_size, load_batch)


class _Batches:
    """Lazily decoded image batches with a length (for the progress bar)."""

    def __init__(self, files, size, batch_size, load_batch):
        self.files, self.size, self.batch_size, self._load = files, size, batch_size, load_batch

    def __len__(self):
        return -(-len(self.files) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.files), self.batch_size):
            yield self._load(self.files[start:start + self.batch_size], self.size)


def estimate_folder(data, out, model="cifar_vgg", weights="default", limit=None, batch_size=100,
                    regime="relu", seed=0, device="cpu"):
    """Estimate the patterns of zoo ``model`` from the images under ``data`` and save them.

    Returns ``(path, number of images, seconds)``. ``manip-bench patterns`` calls this.
    """
    from . import models

    started = time.perf_counter()
    net = models.load(model, weights, device)
    batches = image_batches(data, models.input_size(model), batch_size, limit, seed)
    patterns = estimate_patterns(net, batches, regime=regime)
    path = save_patterns(patterns, out)
    return path, len(batches.files), time.perf_counter() - started


if __name__ == "__main__":
    # The command line is the layer above this module: it is not imported from here.
    print("python -m manip_bench.patterns is now 'manip-bench patterns FOLDER --out FILE' "
          "(or 'python -m manip_bench patterns ...'), with the same options", file=sys.stderr)
    sys.exit(2)
