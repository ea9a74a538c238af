"""The fast Zennit path (``ZennitAttributor.fast``) computes what Zennit's own hooks compute."""
import pytest
import torch
from torch import nn

from helpers import relative_error
from manip_bench import attributors
from manip_bench.attributors import zennit_fast
from manip_bench.models.cifar_vgg import CifarVGG

LRP = attributors.GROUPS["lrp"]


def no_normalisation_net():
    """Takes raw [0, 1] pixels: the first layer sees exact zeros that no ReLU made."""
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10), nn.ReLU(), nn.Linear(10, 4),
    ).double().eval()


def map_and_attack_gradient(explain, x, target):
    x = x.clone().requires_grad_()
    output, relevance = explain(x, target)
    loss = relevance.abs().sum((1, 2, 3)).square().sum() + output.softmax(1).square().sum()
    (gradient,) = torch.autograd.grad(loss, x)
    return relevance.detach(), gradient


@pytest.mark.parametrize("name", LRP)
@pytest.mark.parametrize("model", ["plain", "cifar_vgg"])
def test_fast_path_equals_zennits_hooks(name, model):
    torch.manual_seed(0)
    if model == "plain":
        net = no_normalisation_net()
        x = torch.rand(3, 3, 12, 12, dtype=torch.float64)
        x[:, :, :4] = 0.0  # black pixels, as the attack's clamp to [0, 1] makes them
    else:
        net = CifarVGG((4, "M", 8, 8, "M", 8, "M")).double().eval()
        x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([0, 1, 3])
    explain = attributors.create(name, net)
    explain.fast = False
    expected_map, expected_gradient = map_and_attack_gradient(explain, x, target)
    explain.fast = True
    for _ in range(2):  # the second call uses the cached modified weights
        fast_map, fast_gradient = map_and_attack_gradient(explain, x, target)
        assert relative_error(fast_map, expected_map) <= 1e-10
        assert relative_error(fast_gradient, expected_gradient) <= 1e-8


def test_cached_weights_follow_parameter_changes():
    net = no_normalisation_net()
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    explain = attributors.create("zennit.paper_lrp", net)
    explain(x, 0)
    with torch.no_grad():
        for parameter in explain.model.parameters():
            parameter.mul_(-1.5)
    fast = explain(x, 0)[1]
    explain.fast = False
    assert relative_error(fast, explain(x, 0)[1]) <= 1e-10


def test_zero_branch_is_skipped_only_after_a_relu():
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    relu = nn.functional.relu(x * 2 - 1)
    pooled = nn.functional.max_pool2d(relu, 2).flatten(1).clone()
    assert zennit_fast._after_relu(relu) and zennit_fast._after_relu(pooled)
    assert not zennit_fast._after_relu(x.clone())
    assert not zennit_fast._after_relu(relu + 1)


def test_fast_rules_leave_no_weight_gradients_behind():
    """Zennit's per-call weight copies require grad; the cached ones must not."""
    explain = attributors.create("zennit.gamma_vgg", CifarVGG((4, "M", 8, "M")))
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    explain(x, 0)[1].square().sum().backward()
    for _, _, cached in explain._frozen_params._cache.values():
        assert all(value is None or not value.requires_grad for value in cached.values())


def test_layers_compute_their_own_input_gradient_again_after_explaining():
    """The discarded input gradient is only for the explanation's own backward."""
    from manip_bench.attributors.base import FrozenConv2d

    explain = attributors.create("zennit.epsilon_plus_flat", CifarVGG((4, "M", 8, "M")))
    layers = [m for m in explain.model.modules() if isinstance(m, FrozenConv2d)]
    assert layers
    explain(torch.rand(1, 3, 32, 32), 0)
    assert not any(layer.discard_input_gradient for layer in layers)


def test_fast_stabilizer_equals_zennits():
    from zennit.core import stabilize

    z = torch.tensor([-2.0, -1e-7, -0.0, 0.0, 1e-7, 3.0], dtype=torch.float64,
                     requires_grad=True)
    fast = zennit_fast._fast_stabilizer(z, epsilon=1e-6)
    stock = stabilize(z, epsilon=1e-6)
    assert torch.equal(fast, stock) and fast.dtype == z.dtype
    (fast_grad,) = torch.autograd.grad(fast.sum(), z)
    (stock_grad,) = torch.autograd.grad(stock.sum(), z)
    assert torch.equal(fast_grad, stock_grad)


@pytest.mark.parametrize("name, zennits", [
    ("zennit.epsilon", 0),            # every layer written out
    ("zennit.gamma_vgg", 1),          # all but the first layer (its input is the image)
    ("zennit.epsilon_plus_flat", 1),  # ♭ on the first layer has no written-out form
    ("zennit.epsilon_gamma_box", 1),  # zB on the first layer
])
def test_common_layers_use_the_written_out_arithmetic(name, zennits, monkeypatch):
    """Only the layers without a written-out form run Zennit's mapper and reducer."""
    calls = []
    original = zennit_fast.FastRule._branches
    monkeypatch.setattr(zennit_fast.FastRule, "_branches",
                        lambda self, *args: calls.append(1) or original(self, *args))
    explain = attributors.create(name, CifarVGG((4, "M", 8, 8, "M", 8, "M")))
    explain(torch.rand(2, 3, 32, 32), 0)
    assert len(calls) == zennits
