"""Fixtures for the benchmark tests (import them): a tmp folder of 32x32 PNGs, a tiny grid."""
import pytest

from manip_bench import bench, data

TINY = dict(attributors="captum.saliency,zennit.epsilon", models="cifar_vgg", n=3, iterations=3)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Four bundled photos as 32x32 PNG files (no shared data needed)."""
    folder = tmp_path_factory.mktemp("images")
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        data.save_image(data.load_image(name, 32), folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_grid(image_folder):
    """2 attributors x cifar_vgg x 3 pairs, 3 iterations."""
    return bench.make_grid(pairs=image_folder, **TINY)


def interrupt_after(count, seen):
    """An ``on_rows`` callback that keeps the rows in ``seen`` and raises KeyboardInterrupt
    once ``count`` rows are on disk (an interrupted run, to be resumed)."""
    def on_rows(rows):
        seen.extend(rows)
        if len(seen) >= count:
            raise KeyboardInterrupt
    return on_rows
