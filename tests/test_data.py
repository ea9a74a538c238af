"""Images, target maps and (original, target) pairs."""
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from manip_bench import ManipBenchError, data
from manip_bench.data import (BUNDLED_IMAGES, DEFAULT_IMAGE, DEFAULT_TARGET_IMAGE, image_files,
                              image_pairs, load_batch, load_image, load_target_map, save_image)

#: CIFAR-10's class names, in torchvision's order (batches.meta)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]
#: labels of the tiny copy: those of the real test set's first 8 images (4 classes)
TINY_LABELS = [3, 8, 8, 0, 6, 6, 1, 6]


def _no_download(*args, **kwargs):
    raise urllib.error.URLError("no network in the tests")


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch):
    """A data root holding an 8-image CIFAR-10 test set in torchvision's format.

    ``cifar-10-batches-py`` with ``test_batch`` (a pickle of ``data``, N x 3072 uint8 in
    channel-major order, and ``labels``) and ``batches.meta`` (``label_names``): what
    ``torchvision.datasets.CIFAR10(root, train=False)`` reads. torchvision checks every
    file of the real release (the training batches too) against its md5 sums, which a
    made-up copy cannot match, so the checks are patched to "the file exists"; downloads
    are patched to fail, so no test ever reaches the network.
    """
    folder = tmp_path / "data" / data.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (len(TINY_LABELS), 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as file:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": pixels,
                     "labels": TINY_LABELS}, file)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": len(TINY_LABELS),
                     "num_vis": 3072}, file)
    cifar = torchvision.datasets.cifar
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: os.path.isfile(
        os.path.join(self.root, self.base_folder, "test_batch")))
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    monkeypatch.setattr(cifar, "download_and_extract_archive", _no_download)
    return folder.parent


def _relative(pairs, root):
    return [tuple(Path(p).relative_to(root).as_posix() for p in pair) for pair in pairs]


@pytest.fixture
def image_tree(tmp_path):
    """An ImageFolder tree: 3 class folders of 2 tiny PNGs each, plus a non-image file."""
    for number, name in enumerate(("cat", "dog", "ship")):
        for index in range(2):
            gray = torch.full((3, 8, 8), (number * 2 + index) / 10)
            save_image(gray, tmp_path / name / f"{index}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", [DEFAULT_IMAGE, DEFAULT_TARGET_IMAGE, "camera"])
def test_bundled_images_load_in_unit_range(name, size):
    image = load_image(name, size)
    assert name in BUNDLED_IMAGES
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05


def test_file_roundtrip_resize_and_center_crop(tmp_path):
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    save_image(image, tmp_path / "sub" / "x.png")
    assert torch.allclose(load_image(tmp_path / "sub" / "x.png", 16), image, atol=0.5 / 255 + 1e-6)
    tall = torch.zeros(3, 40, 20)
    tall[:, 10:30] = 1  # the centre 20x20 square is white, the rest black
    save_image(tall, tmp_path / "tall.png")
    assert torch.equal(load_image(tmp_path / "tall.png", 20), torch.ones(3, 20, 20))
    small = load_image(tmp_path / "tall.png", 10)  # shorter side resized first, then cropped
    assert small.shape == (3, 10, 10) and small[:, 1:-1].min() > 0.99 and small.min() > 0.8
    save_image(torch.full((5, 7), 0.5), tmp_path / "gray.png")  # grayscale file -> RGB
    assert load_image(tmp_path / "gray.png", 5).shape == (3, 5, 5)


def test_missing_or_unreadable_image_names_the_path(tmp_path):
    with pytest.raises(ManipBenchError, match=r"'nope\.png' not found.*chelsea"):
        load_image("nope.png", 32)
    (tmp_path / "broken.png").write_text("not a png")
    with pytest.raises(ManipBenchError, match=r"cannot read image .*broken\.png"):
        load_image(tmp_path / "broken.png", 32)
    with pytest.raises(ManipBenchError, match="positive integer"):
        load_image(DEFAULT_IMAGE, 0)


def test_target_map_sums_to_one_and_follows_brightness(tmp_path):
    word = torch.zeros(24, 48)
    word[8:16, 20:28] = 1  # a bright blob in the centre
    save_image(word, tmp_path / "word.png")
    heatmap = load_target_map(tmp_path / "word.png", 24)
    assert heatmap.shape == (24, 24) and heatmap.min() >= 0
    assert torch.isclose(heatmap.sum(), torch.tensor(1.0))
    assert heatmap[12, 12] > 0 and heatmap[0, 0] == 0
    assert torch.isclose(load_target_map("text", 32).sum(), torch.tensor(1.0))
    save_image(torch.zeros(8, 8), tmp_path / "black.png")
    with pytest.raises(ManipBenchError, match="all black"):
        load_target_map(tmp_path / "black.png", 8)


def test_save_image_rejects_bad_shapes(tmp_path):
    with pytest.raises(ManipBenchError, match=r"got shape \(2, 3, 4, 4\)"):
        save_image(torch.zeros(2, 3, 4, 4), tmp_path / "x.png")


def test_load_batch(tmp_path, image_tree):
    paths = [image_tree / "cat" / "0.png", image_tree / "dog" / "1.png"]
    batch = load_batch(paths, 8)
    assert batch.shape == (2, 3, 8, 8)
    assert torch.allclose(batch[1], torch.full((3, 8, 8), 0.3), atol=0.003)
    with pytest.raises(ManipBenchError, match="at least one"):
        load_batch([], 8)


def test_folder_pairs_are_deterministic_distinct_and_cross_class(image_tree):
    pairs = image_pairs(image_tree, seed=0)
    assert pairs == image_pairs(image_tree, seed=0)
    assert _relative(pairs, image_tree) == [  # pinned: the same on every machine
        ("dog/1.png", "ship/0.png"), ("ship/1.png", "dog/1.png"), ("cat/0.png", "ship/0.png"),
        ("cat/1.png", "dog/1.png"), ("dog/0.png", "cat/1.png"), ("ship/0.png", "dog/0.png")]
    originals = [original for original, _ in pairs]
    assert len(set(originals)) == 6  # every image once, the notes file skipped
    assert all(Path(a).parent != Path(b).parent for a, b in pairs)
    assert image_pairs(image_tree, n=2, seed=1) != image_pairs(image_tree, n=2, seed=2)
    assert len(image_pairs(image_tree, n=3)) == 3
    with pytest.raises(ManipBenchError, match="7 pairs asked but only 6 images"):
        image_pairs(image_tree, n=7)


def test_flat_folder_pairs_distinct_images(image_tree):
    pairs = image_pairs(image_tree / "cat", seed=5)
    assert sorted(_relative(pairs, image_tree / "cat")) == [("0.png", "1.png"), ("1.png", "0.png")]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ManipBenchError, match=r"found 0 image\(s\).*at least 2"):
        image_pairs(tmp_path)
    with pytest.raises(ManipBenchError, match="no such folder or CSV file"):
        image_pairs(tmp_path / "absent")


def test_csv_pairs_resolve_relative_paths(image_tree):
    csv_path = image_tree / "pairs.csv"
    absolute = image_tree / "ship" / "0.png"
    csv_path.write_text(f"original, target\ncat/0.png,dog/0.png\n{absolute},cat/1.png\n")
    assert image_pairs(csv_path) == [
        (str(image_tree / "cat/0.png"), str(image_tree / "dog/0.png")),
        (str(absolute), str(image_tree / "cat/1.png"))]
    assert len(image_pairs(csv_path, n=1)) == 1


def test_csv_errors_name_the_row_and_columns(image_tree):
    csv_path = image_tree / "pairs.csv"
    csv_path.write_text("original,target\ncat/0.png,dog/0.png\ncat/1.png,dog/missing.png\n")
    with pytest.raises(ManipBenchError, match=r"row 2 \(line 3\): target file 'dog/missing.png'"):
        image_pairs(csv_path)
    csv_path.write_text("image,label\ncat/0.png,cat\n")
    with pytest.raises(ManipBenchError, match="lacks column.*original, target"):
        image_pairs(csv_path)
    csv_path.write_text("original,target\n")
    with pytest.raises(ManipBenchError, match="no rows"):
        image_pairs(csv_path)


def _index(name):
    """The test-set index in a CIFAR-10 image name ``.../test_batch#<index>``."""
    return int(name.rsplit("#", 1)[1])


def test_cifar10_pairs_from_torchvision_format(tiny_cifar10, monkeypatch):
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tiny_cifar10))
    pairs = image_pairs(data.CIFAR10, seed=0)
    assert pairs == image_pairs(data.CIFAR10, seed=0)
    assert [(_index(a), _index(b)) for a, b in pairs] == [  # pinned: the same on every machine
        (1, 0), (2, 4), (4, 0), (3, 7), (0, 6), (7, 2), (6, 0), (5, 0)]
    assert sorted(_index(a) for a, _ in pairs) == list(range(8))  # every image once
    assert all(TINY_LABELS[_index(a)] != TINY_LABELS[_index(b)] for a, b in pairs)
    assert all(a.startswith(str(tiny_cifar10 / data.CIFAR10_FOLDER / "test_batch#"))
               for pair in pairs for a in pair)
    assert image_pairs(tiny_cifar10 / data.CIFAR10_FOLDER, seed=0) == pairs  # the folder itself
    assert data.cifar10_pairs(n=3, seed=0, root=tiny_cifar10) == image_pairs("cifar10", 3)
    assert image_pairs("cifar10", n=3, seed=1) != image_pairs("cifar10", n=3, seed=2)
    with pytest.raises(ManipBenchError, match="9 pairs asked but it has 8 images"):
        image_pairs("cifar10", n=9)
    images = image_files("cifar10")  # ImageFolder order: class name, then test-set order
    assert [_index(name) for name in images] == [3, 6, 0, 4, 5, 7, 1, 2]
    assert image_files("cifar10", n=3, seed=4) == image_files("cifar10", n=3, seed=4)


def test_cifar10_images_load_losslessly(tiny_cifar10):
    name = data.cifar10_pairs(n=1, root=tiny_cifar10)[0][0]
    with open(tiny_cifar10 / data.CIFAR10_FOLDER / "test_batch", "rb") as file:
        row = pickle.load(file)["data"][_index(name)]
    pixels = (load_image(name, 32) * 255).round().to(torch.uint8)  # the stored bytes exactly
    assert torch.equal(pixels, torch.from_numpy(row.reshape(3, 32, 32)))
    assert load_batch([name, name], 16).shape == (2, 3, 16, 16)
    with pytest.raises(ManipBenchError, match="has 8 images"):
        load_image(name.rsplit("#", 1)[0] + "#8", 32)


def test_cifar10_pairs_match_an_imagefolder_export(tiny_cifar10, tmp_path):
    """The documented promise: the same draw as from ``<class>/<k>.png`` numbered in order."""
    tree, seen = tmp_path / "tree", {}
    for index, label in enumerate(TINY_LABELS):
        name = CIFAR10_CLASSES[label]
        k = seen[name] = seen.get(name, -1) + 1
        save_image(load_image(f"{tiny_cifar10}/{data.CIFAR10_FOLDER}/test_batch#{index}", 32),
                   tree / name / f"{k:04d}.png")
    export = {index: f"{CIFAR10_CLASSES[label]}/"
                     f"{TINY_LABELS[:index].count(label):04d}.png"
              for index, label in enumerate(TINY_LABELS)}
    for n, seed in ((None, 0), (3, 1), (5, 7)):
        drawn = data.cifar10_pairs(n, seed, root=tiny_cifar10)
        assert [(export[_index(a)], export[_index(b)]) for a, b in drawn] == \
            _relative(image_pairs(tree, n, seed), tree)


def test_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.default_data_root() == tmp_path / "cache" / "manip_bench"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored (XDG spec)
    assert data.default_data_root() == Path.home() / ".cache" / "manip_bench"
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path / "datasets"))
    assert data.default_data_root() == tmp_path / "datasets"


def test_cifar10_absent_and_offline_is_one_line_that_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", _no_download)
    root = tmp_path / "empty"
    with pytest.raises(ManipBenchError) as caught:
        data.cifar10_test(root)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"CIFAR-10 not found in {root} and downloading it failed "
                              f"(<urlopen error no network in the tests>)")
    for words in ("cifar-10-batches-py", torchvision.datasets.CIFAR10.url, "--data-root",
                  data.DATA_ROOT_ENV):
        assert words in message
    with pytest.raises(ManipBenchError, match=r"not found in .*empty; put torchvision's"):
        data.cifar10_test(root, download=False)  # no download tried: no "failed" clause
    with pytest.raises(ManipBenchError, match="not found in"):
        load_image(f"{root}/{data.CIFAR10_FOLDER}/test_batch#0", 32)
    (root / data.CIFAR10_FOLDER).mkdir(parents=True)  # there, but not the real files
    with pytest.raises(ManipBenchError, match="incomplete or fails torchvision's md5 check"):
        image_pairs(root / data.CIFAR10_FOLDER)
