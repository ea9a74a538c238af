"""Shared fixtures: small models with known structure, seeded inputs, one CPU thread."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("MANIP_BENCH_DATA", Path(__file__).parents[2] / "shared" / "data"))


class PlainCNN(nn.Module):
    """A VGG-like CNN that Captum's LRP accepts (no Flatten module, no normalisation)."""

    def __init__(self, channels=(4, 8), side=16, classes=5):
        super().__init__()
        layers, c_in = [], 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        flat = c_in * (side // 2 ** len(channels)) ** 2
        self.classifier = nn.Sequential(nn.Linear(flat, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def tiny_net():
    """A tiny float64 ReLU CNN for finite-difference checks (input 3 x 6 x 6, 3 classes)."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 3),
    ).double().eval()


@pytest.fixture
def plain_cnn():
    torch.manual_seed(0)
    return PlainCNN().eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 16, 16)


@pytest.fixture(scope="session")
def trained_pair():
    """The embedded, trained ``cifar_vgg``, two bundled photos and the two whose maps are their
    targets (helpers.PAIR_IMAGES, helpers.PAIR_TARGETS), all 32 x 32."""
    from helpers import PAIR_IMAGES, PAIR_TARGETS
    from manip_bench import data, models

    def load(names):
        return torch.stack([data.load_image(name, 32) for name in names])

    return models.load("cifar_vgg"), load(PAIR_IMAGES), load(PAIR_TARGETS)


def requires_shared_data(*parts):
    """Skip marker for tests that need the offline data folder."""
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"offline data not found at {path}")
