"""Images and pairs: loading and saving images, bundled example photos, target maps, pairs.

An image is a float tensor ``(3, size, size)`` in [0, 1]: the shorter side is resized to
``size`` (antialiased) and the centre cropped. A *pair* is ``(original, target)``: the
original is attacked so that its explanation looks like the target image's explanation.

CIFAR-10's test set is read by ``torchvision.datasets.CIFAR10`` from torchvision's
``cifar-10-batches-py`` folder under a data root (:func:`default_data_root`); one of its
images is named ``<root>/cifar-10-batches-py/test_batch#<index>`` (``index`` as in
``CIFAR10(root, train=False)[index]``), a name :func:`load_image` reads like a file.
"""
import csv
import functools
import os
import random
import re
import tarfile
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
#: pairs source (``--pairs cifar10``): CIFAR-10's test set in torchvision's format
CIFAR10 = "cifar10"
#: the folder torchvision's ``CIFAR10`` reads under its root
CIFAR10_FOLDER = "cifar-10-batches-py"
#: environment variable: the data root, a folder that holds ``cifar-10-batches-py``
DATA_ROOT_ENV = "MANIP_BENCH_DATA"
_CIFAR10_IMAGE = re.compile(r"^(?P<root>.*)[\\/]" + re.escape(CIFAR10_FOLDER)
                            + r"[\\/]test_batch#(?P<index>\d+)$")


def _open(source):
    """PIL image from a file path, a CIFAR-10 image name or a bundled name (an existing file
    wins)."""
    path = Path(source)
    cifar10_image = _CIFAR10_IMAGE.match(str(source))
    if cifar10_image and not path.exists():
        dataset = cifar10_test(cifar10_image["root"], download=False)
        index = int(cifar10_image["index"])
        if index >= len(dataset):
            raise ManipBenchError(f"image {str(source)!r} not found: the CIFAR-10 test set has "
                                  f"{len(dataset)} images (0 to {len(dataset) - 1})")
        return dataset[index][0]
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
        An image file, one of :data:`BUNDLED_IMAGES` (scikit-image's example photos), or a
        CIFAR-10 test image ``<root>/cifar-10-batches-py/test_batch#<index>``.
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


def _check_pair_count(n):
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ManipBenchError(f"number of pairs must be a positive integer, got {n!r}")


def image_pairs(source, n=None, seed=0):
    """``(original_path, target_path)`` pairs from a folder of images, a CSV file or CIFAR-10.

    Folder (searched recursively, e.g. an ImageFolder tree): the files are sorted, then
    ``n`` distinct originals (default: every image once, in random order) are drawn with
    ``random.Random(seed)``; each gets a random target from a *different folder* (so from
    a different class in an ImageFolder tree) when the images span several folders,
    otherwise any other image. The result is the same on every machine.

    ``"cifar10"`` (or a path to torchvision's ``cifar-10-batches-py`` folder): CIFAR-10's
    10,000 test images, found or downloaded by :func:`cifar10_test`, drawn exactly like a
    folder: the images are ordered as in an ImageFolder tree ``<class>/<k>`` with ``k``
    numbered in test-set order, so each original gets a target of another class and
    ``seed`` gives the same pairs as that tree would. See :func:`cifar10_pairs`.

    CSV file: a header with columns ``original,target``; paths relative to the CSV's
    folder are allowed; all rows in order, or the first ``n``.
    """
    _check_pair_count(n)
    if str(source) == CIFAR10:
        return cifar10_pairs(n, seed)
    source = Path(source)
    if _is_cifar10_folder(source):
        return cifar10_pairs(n, seed, root=source, download=False)
    if source.is_dir():
        return _folder_pairs(source, n, seed)
    if source.is_file():
        return _csv_pairs(source, n)
    raise ManipBenchError(f"{source}: no such folder or CSV file; pairs come from a folder of "
                          f"images, a CSV file with columns original,target, or {CIFAR10}")


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
    same on every machine). ``"cifar10"`` (or a ``cifar-10-batches-py`` folder) gives
    CIFAR-10 test images (see :func:`image_pairs`), ordered as in an ImageFolder tree.
    """
    if str(folder) == CIFAR10 or _is_cifar10_folder(Path(folder)):
        dataset = cifar10_test(None if str(folder) == CIFAR10 else folder,
                               download=str(folder) == CIFAR10)
        order, _ = _imagefolder_order(dataset)
        files = [_cifar10_name(dataset, index) for index in order]
        where = f"CIFAR-10 test set in {dataset.root}"
    else:
        folder = Path(folder)
        if not folder.is_dir():
            raise ManipBenchError(f"{folder}: no such folder of images")
        files = [folder / path for path in _relative_image_paths(folder)]
        if not files:
            raise ManipBenchError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)})")
        where = str(folder)
    if n is None:
        return files
    if not isinstance(n, int) or not 1 <= n <= len(files):
        raise ManipBenchError(f"{where}: asked for {n!r} images, it has {len(files)}")
    return random.Random(seed).sample(files, n)


def _draw_pairs(groups, n, seed):
    """Index pairs ``(i, j)`` over items sorted as given, ``groups[i]`` being i's group.

    ``n`` distinct originals ``i`` (default all) in ``random.Random(seed)`` order, each
    with a uniformly drawn ``j`` of another group (any other item when all share one).
    """
    if len(set(groups)) == 1:  # one group: any other item
        groups = list(range(len(groups)))
    order = sorted(range(len(groups)), key=groups.__getitem__)  # each group a contiguous block
    first, count = {}, Counter(groups)
    for position, i in enumerate(order):
        first.setdefault(groups[i], position)
    rng = random.Random(seed)
    pairs = []
    for i in rng.sample(range(len(groups)), len(groups) if n is None else n):
        group = groups[i]
        k = rng.randrange(len(groups) - count[group])  # a position outside i's block
        pairs.append((i, order[k + count[group] if k >= first[group] else k]))
    return pairs


def _folder_pairs(folder, n, seed):
    files = _relative_image_paths(folder)
    if len(files) < 2:
        raise ManipBenchError(f"{folder}: found {len(files)} image(s) "
                              f"({', '.join(IMG_EXTENSIONS)}); pairs need at least 2")
    if n is not None and n > len(files):
        raise ManipBenchError(f"{folder}: {n} pairs asked but only {len(files)} images; each "
                              f"image is an original at most once")
    groups = [path.parent.as_posix() for path in files]
    return [(str(folder / files[i]), str(folder / files[j]))
            for i, j in _draw_pairs(groups, n, seed)]


def default_data_root():
    """Where datasets are looked for and downloaded to.

    ``$MANIP_BENCH_DATA`` if set, else the user's cache: ``$XDG_CACHE_HOME/manip_bench``,
    ``~/.cache/manip_bench`` when ``XDG_CACHE_HOME`` is unset (or not an absolute path, as
    the XDG specification asks).
    """
    if os.environ.get(DATA_ROOT_ENV):
        return Path(os.environ[DATA_ROOT_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(cache) if os.path.isabs(cache) else Path.home() / ".cache") / "manip_bench"


def _is_cifar10_folder(path):
    return path.name == CIFAR10_FOLDER and path.is_dir()


@functools.lru_cache(maxsize=4)
def _read_cifar10(root):
    """torchvision's CIFAR-10 test set under ``root`` (checked against its md5 sums, once)."""
    from torchvision.datasets import CIFAR10 as Dataset
    return Dataset(root, train=False, download=False)


#: what a failed download can raise: no network (URLError is an OSError), a bad archive
_DOWNLOAD_ERRORS = (OSError, RuntimeError, EOFError, ValueError, tarfile.TarError)


def cifar10_test(root=None, download=True):
    """CIFAR-10's 10,000 test images as ``torchvision.datasets.CIFAR10(root, train=False)``.

    ``root`` (default :func:`default_data_root`) is the folder that holds torchvision's
    ``cifar-10-batches-py`` (the folder itself is accepted too). When it is absent or fails
    torchvision's md5 check, it is downloaded there (170 MB, once) if ``download``;
    otherwise, or offline, a one-line :class:`ManipBenchError` says how to get it.
    """
    root = Path(root).expanduser() if root is not None else default_data_root()
    if root.name == CIFAR10_FOLDER:
        root = root.parent
    root = root.absolute()
    try:
        return _read_cifar10(str(root))
    except (RuntimeError, OSError) as error:  # torchvision: "Dataset not found or corrupted"
        found = (root / CIFAR10_FOLDER).is_dir()
        problem = (f"CIFAR-10 in {root / CIFAR10_FOLDER} is incomplete or fails torchvision's "
                   f"md5 check" if found else f"CIFAR-10 not found in {root}")
        if not download:
            raise ManipBenchError(f"{problem}; {_how_to_get_cifar10(root)}") from error
    from torchvision.datasets import CIFAR10 as Dataset
    try:
        Dataset(str(root), train=False, download=True)  # prints its progress
    except _DOWNLOAD_ERRORS as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ManipBenchError(f"{problem} and downloading it failed ({reason}); "
                              f"{_how_to_get_cifar10(root)}") from error
    return _read_cifar10(str(root))


def _how_to_get_cifar10(root):
    from torchvision.datasets import CIFAR10 as Dataset
    return (f"put torchvision's {CIFAR10_FOLDER} folder (unpacked from {Dataset.url}, or that "
            f"archive itself) in {root}, or give the folder that holds it with --data-root or "
            f"{DATA_ROOT_ENV}, or run the same command once with internet access")


def _imagefolder_order(dataset):
    """Test-set indices sorted as an ImageFolder tree would list them (class name, then
    index), and their class names."""
    names = [dataset.classes[label] for label in dataset.targets]
    order = sorted(range(len(names)), key=lambda index: (names[index], index))
    return order, [names[index] for index in order]


def _cifar10_name(dataset, index):
    return f"{Path(dataset.root) / CIFAR10_FOLDER / 'test_batch'}#{index}"


def cifar10_pairs(n=None, seed=0, root=None, download=True):
    """``(original, target)`` pairs of CIFAR-10 test images (``--pairs cifar10``).

    The test set comes from :func:`cifar10_test` (``root``, ``download``). Its images are
    put in the order of an ImageFolder tree ``<class>/<k>`` (class names sorted, then
    test-set order) and drawn as :func:`image_pairs` draws from a folder: ``n`` distinct
    originals (default all 10,000) in ``random.Random(seed)`` order, each with a uniformly
    drawn target of another class. Each image is named
    ``<root>/cifar-10-batches-py/test_batch#<index>``, which :func:`load_image` reads.
    """
    _check_pair_count(n)
    dataset = cifar10_test(root, download)
    order, groups = _imagefolder_order(dataset)
    if len(order) < 2 or (n is not None and n > len(order)):
        raise ManipBenchError(f"CIFAR-10 test set in {dataset.root}: {n} pairs asked but it has "
                              f"{len(order)} images; each image is an original at most once")
    return [(_cifar10_name(dataset, order[i]), _cifar10_name(dataset, order[j]))
            for i, j in _draw_pairs(groups, n, seed)]


def pairs_source(pairs, data_root=None):
    """What ``--pairs`` names: ``cifar10`` becomes the ``cifar-10-batches-py`` folder under
    ``data_root`` (default :func:`default_data_root`), found or downloaded now; anything
    else is returned unchanged. Either result can be given to :func:`image_pairs`."""
    if str(pairs) != CIFAR10:
        return pairs
    return str(Path(cifar10_test(data_root).root) / CIFAR10_FOLDER)


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


__all__ = ["BUNDLED_IMAGES", "CIFAR10", "CIFAR10_FOLDER", "DATA_ROOT_ENV", "DEFAULT_IMAGE",
           "DEFAULT_TARGET_IMAGE", "cifar10_pairs", "cifar10_test", "default_data_root",
           "image_files", "image_pairs", "load_batch", "load_image", "load_target_map",
           "pairs_source", "save_image"]
