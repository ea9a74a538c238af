"""Does an image size fit a model? Found by trying, so any ``nn.Module`` is covered.

A model with a fixed-size dense head fails deep inside its forward on images of another
size ("mat1 and mat2 shapes cannot be multiplied"). :func:`check_fits` runs the model once
on one image before any attack and, when that fails, tries square images of common sizes
(the zoo's among them) to name the size the model takes.
"""
import torch

from .errors import ManipBenchError, one_line

#: square sizes tried when an image does not fit (CIFAR/MNIST, the zoo, ImageNet models)
COMMON_SIZES = (28, 32, 64, 96, 112, 128, 160, 192, 224, 227, 256, 299, 384)


def _runs(model, x):
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, IndexError):
        return False
    return True


def sizes_that_run(model, channels, reference, sizes=COMMON_SIZES):
    """The sizes of ``sizes`` at which ``model`` runs on one ``channels``-channel square
    image (device and dtype of the tensor ``reference``)."""
    return [s for s in sizes
            if _runs(model, reference.new_zeros(1, channels, s, s))]


def check_fits(model, x):
    """Run ``model`` on the first image of ``x`` (N, C, H, W); if it fails, raise a
    :class:`ManipBenchError` that names the image sizes it takes (found by trying)."""
    try:
        with torch.no_grad():
            model(x[:1])
    except (RuntimeError, ValueError, IndexError) as error:
        channels, height, width = x.shape[1:]
        reason = one_line(error).split(". ")[0][:160]
        fits = sizes_that_run(model, channels, x)
        if fits:
            sizes = ", ".join(f"{s}×{s}" for s in fits)
            raise ManipBenchError(
                f"the model does not run on {height}×{width} images ({reason}); it runs on "
                f"{sizes}: resize the images, e.g. manip_bench.data.load_batch(paths, "
                f"{fits[0]}) or torch.nn.functional.interpolate(x, size={fits[0]})") from error
        raise ManipBenchError(
            f"the model does not run on images of shape {channels}×{height}×{width} ({reason}), "
            f"nor on square {channels}-channel images of the sizes "
            f"{', '.join(map(str, COMMON_SIZES))}: check the input shape the model expects"
        ) from error


__all__ = ["COMMON_SIZES", "check_fits", "sizes_that_run"]
