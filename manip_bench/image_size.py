"""Does an image size fit a model? Found by trying, so any ``nn.Module`` is covered.

A model with a fixed-size dense head fails deep inside its forward on images of another
size ("mat1 and mat2 shapes cannot be multiplied"). The attributors run the model once on
one image of each new shape before explaining it (``Attributor.num_classes``, so before any
attack); when that fails, :func:`does_not_fit` tries square images of common sizes (the
zoo's among them) to name the size the model takes.
"""
import torch

from .errors import ManipBenchError, one_line

#: square sizes tried when an image does not fit (CIFAR/MNIST, the zoo, ImageNet models)
COMMON_SIZES = (28, 32, 64, 96, 112, 128, 160, 192, 224, 227, 256, 299, 384)
#: what a forward on an image of the wrong size raises
FORWARD_ERRORS = (RuntimeError, ValueError, IndexError)


def _runs(model, x):
    try:
        with torch.no_grad():
            model(x)
    except FORWARD_ERRORS:
        return False
    return True


def sizes_that_run(model, channels, reference, sizes=COMMON_SIZES):
    """The sizes of ``sizes`` at which ``model`` runs on one ``channels``-channel square
    image (device and dtype of the tensor ``reference``)."""
    return [s for s in sizes
            if _runs(model, reference.new_zeros(1, channels, s, s))]


def does_not_fit(model, x, error):
    """The :class:`ManipBenchError` for ``model`` failing with ``error`` on images shaped like
    ``x`` (N, C, H, W): it names the image sizes the model takes (found by trying)."""
    channels, height, width = x.shape[1:]
    reason = one_line(error).split(". ")[0][:160]
    fits = sizes_that_run(model, channels, x)
    cannot = f"the model cannot take input of shape {tuple(x.shape)}"
    if fits:
        sizes = ", ".join(f"{s}×{s}" for s in fits)
        return ManipBenchError(
            f"{cannot}: it does not run on {height}×{width} images ({reason}); it runs on "
            f"{sizes}: resize the images, e.g. manip_bench.data.load_batch(paths, "
            f"{fits[0]}) or torch.nn.functional.interpolate(x, size={fits[0]})")
    return ManipBenchError(
        f"{cannot}: it does not run on images of shape {channels}×{height}×{width} ({reason}), "
        f"nor on square {channels}-channel images of the sizes "
        f"{', '.join(map(str, COMMON_SIZES))}: check the input shape the model expects")


__all__ = ["COMMON_SIZES", "FORWARD_ERRORS", "does_not_fit", "sizes_that_run"]
