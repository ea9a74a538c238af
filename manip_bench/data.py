"""Images and pairs: loading and saving images, bundled example photos, target maps, pairs.

An image is a float tensor ``(3, size, size)`` in [0, 1]: the shorter side is resized to
``size`` (antialiased) and the centre cropped. A *pair* is ``(original, target)``: the
original is attacked so that its explanation looks like the target image's explanation.
"""
import csv
import random
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as F

from .errors import ManipBenchError

#: scikit-image's bundled photos, usable by name (grayscale ones are converted to RGB)
BUNDLED_IMAGES = ("astronaut", "camera", "chelsea", "coffee", "coins", "colorwheel",
                  "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text")
#: the default pair: ``chelsea`` is attacked, ``coffee`` supplies the target explanation
DEFAULT_IMAGE = "chelsea"
DEFAULT_TARGET_IMAGE = "coffee"


def _open(source):
    """PIL image from a file path or a bundled name (an existing file wins)."""
    path = Path(source)
    if str(source) in BUNDLED_IMAGES and not path.exists():
        import skimage.data
        try:
            return Image.fromarray(getattr(skimage.data, str(source))())
        except (OSError, ImportError, ValueError) as error:
            raise ManipBenchError(f"scikit-image's bundled image {source!r} is unavailable "
                                  f"({error}); reinstall scikit-image or give a file") from error
    if not path.is_file():
        raise ManipBenchError(f"image {str(source)!r} not found: give an image file or one of "
                              f"the bundled names {', '.join(BUNDLED_IMAGES)}")
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image)  # a loaded copy, upright
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise ManipBenchError(f"cannot read image {path}: {error}") from error


def _fit(image, size):
    """uint8 PIL image -> float tensor (C, size, size): shorter side to ``size``, centre crop."""
    if not isinstance(size, int) or size < 1:
        raise ManipBenchError(f"image size must be a positive integer, got {size!r}")
    pixels = F.resize(F.pil_to_tensor(image), [size], antialias=True)
    return F.to_dtype(F.center_crop(pixels, [size, size]), torch.float32, scale=True)


def load_image(source, size):
    """Load an RGB image as a float tensor ``(3, size, size)`` in [0, 1].

    Parameters
    ----------
    source : str or path
        An image file, or one of :data:`BUNDLED_IMAGES` (scikit-image's example photos).
    size : int
        Side length; the shorter side is resized to it and the centre cropped.
    """
    return _fit(_open(source).convert("RGB"), size)


def load_target_map(path, size):
    """Load a grayscale image (a word, a logo, ...) as a target heatmap ``(size, size)``.

    Brightness is relevance: the map is the image's luminance (transparency ignored),
    resized like :func:`load_image` and normalised to sum 1.
    """
    heatmap = _fit(_open(path).convert("L"), size)[0]
    total = heatmap.sum()
    if total <= 0:
        raise ManipBenchError(f"target map {path} is all black; bright pixels mark where the "
                              f"explanation should be")
    return heatmap / total


def save_image(tensor, path):
    """Save a ``(3, H, W)``, ``(1, H, W)`` or ``(H, W)`` tensor in [0, 1] as an 8-bit PNG."""
    image = torch.as_tensor(tensor).detach().cpu()
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ManipBenchError(f"save_image takes a (3, H, W) or (H, W) tensor, "
                              f"got shape {tuple(tensor.shape)}")
    pixels = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    F.to_pil_image(pixels).save(path, format="PNG")
    return Path(path)


def load_batch(paths, size):
    """Stack :func:`load_image` of each path into ``(N, 3, size, size)``."""
    paths = list(paths)
    if not paths:
        raise ManipBenchError("load_batch needs at least one image path")
    return torch.stack([load_image(path, size) for path in paths])


def image_pairs(source, n=None, seed=0):
    """``(original_path, target_path)`` pairs from a folder of images or a CSV file.

    Folder (searched recursively, e.g. an ImageFolder tree): the files are sorted, then
    ``n`` distinct originals (default: every image once, in random order) are drawn with
    ``random.Random(seed)``; each gets a random target from a *different folder* (so from
    a different class in an ImageFolder tree) when the images span several folders,
    otherwise any other image. The result is the same on every machine.

    CSV file: a header with columns ``original,target``; paths relative to the CSV's
    folder are allowed; all rows in order, or the first ``n``.
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ManipBenchError(f"number of pairs must be a positive integer, got {n!r}")
    source = Path(source)
    if source.is_dir():
        return _folder_pairs(source, n, seed)
    if source.is_file():
        return _csv_pairs(source, n)
    raise ManipBenchError(f"{source}: no such folder or CSV file; pairs come from a folder of "
                          f"images or a CSV file with columns original,target")


def _relative_image_paths(folder):
    """Image files under ``folder`` (recursive, hidden ones skipped), relative, sorted."""
    return sorted(
        (path.relative_to(folder) for path in folder.rglob("*")
         if path.suffix.lower() in IMG_EXTENSIONS and path.is_file()
         and not any(part.startswith(".") for part in path.relative_to(folder).parts)),
        key=lambda path: path.as_posix())


def image_files(folder, n=None, seed=0):
    """Image files in ``folder`` (searched recursively, e.g. an ImageFolder tree).

    All of them sorted, or ``n`` distinct ones drawn with ``random.Random(seed)`` (the
    same on every machine).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManipBenchError(f"{folder}: no such folder of images")
    files = [folder / path for path in _relative_image_paths(folder)]
    if not files:
        raise ManipBenchError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)})")
    if n is None:
        return files
    if not isinstance(n, int) or not 1 <= n <= len(files):
        raise ManipBenchError(f"{folder}: asked for {n!r} images, it has {len(files)}")
    return random.Random(seed).sample(files, n)


def _folder_pairs(folder, n, seed):
    files = _relative_image_paths(folder)
    if len(files) < 2:
        raise ManipBenchError(f"{folder}: found {len(files)} image(s) "
                              f"({', '.join(IMG_EXTENSIONS)}); pairs need at least 2")
    if n is not None and n > len(files):
        raise ManipBenchError(f"{folder}: {n} pairs asked but only {len(files)} images; each "
                              f"image is an original at most once")
    groups = [path.parent.as_posix() for path in files]
    if len(set(groups)) == 1:  # one folder: any other image
        groups = list(range(len(files)))
    order = sorted(range(len(files)), key=groups.__getitem__)  # each group a contiguous block
    first, count = {}, Counter(groups)
    for position, i in enumerate(order):
        first.setdefault(groups[i], position)
    rng = random.Random(seed)
    pairs = []
    for i in rng.sample(range(len(files)), len(files) if n is None else n):
        group = groups[i]
        k = rng.randrange(len(files) - count[group])  # a position outside i's block
        j = order[k + count[group] if k >= first[group] else k]
        pairs.append((str(folder / files[i]), str(folder / files[j])))
    return pairs


def _csv_pairs(path, n):
    pairs = []
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
        missing = [column for column in ("original", "target") if column not in reader.fieldnames]
        if missing:
            raise ManipBenchError(f"{path}: CSV lacks column(s) {', '.join(missing)}; the first "
                                  f"line must be a header such as: original,target")
        for row_number, row in enumerate(reader, start=1):
            if n is not None and len(pairs) == n:
                break
            pair = []
            for column in ("original", "target"):
                value = (row[column] or "").strip()
                file_path = path.parent / value
                if not value or not file_path.is_file():
                    raise ManipBenchError(
                        f"{path}: row {row_number} (line {reader.line_num}): {column} file "
                        f"{value!r} not found (looked for {file_path})")
                pair.append(str(file_path))
            pairs.append(tuple(pair))
    if not pairs:
        raise ManipBenchError(f"{path}: no rows after the header original,target")
    return pairs


__all__ = ["BUNDLED_IMAGES", "DEFAULT_IMAGE", "DEFAULT_TARGET_IMAGE", "image_files", "image_pairs",
           "load_batch", "load_image", "load_target_map", "save_image"]
