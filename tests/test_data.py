"""Images, target maps and (original, target) pairs."""
from pathlib import Path

import pytest
import torch

from manip_bench import ManipBenchError
from manip_bench.data import (BUNDLED_IMAGES, DEFAULT_IMAGE, DEFAULT_TARGET_IMAGE, image_pairs,
                              load_batch, load_image, load_target_map, save_image)


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
