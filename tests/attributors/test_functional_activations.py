"""Functional ReLU calls (F.relu, torch.relu, x.relu_()) follow the softplus swap like modules."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_map_moved, assert_unchanged, snapshot
from manip_bench import ManipBenchError, ManipulationAttack, attributors, defences

GRADIENT = [n for n in attributors.GROUPS["gradient"] if not n.startswith("pattern.")]


class Written(nn.Module):
    """A small CNN whose activations are written four ways; ``act`` picks them."""

    def __init__(self, act="functional"):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 6 * 6, 3)
        self.act, self.stem = act, nn.ReLU()
        self.beta = None  # reference only: the same network with softplus written in

    def relu(self, x, inplace_ok=True):
        if self.beta is not None:
            return F.softplus(x, self.beta)
        if self.act == "inplace" and inplace_ok:
            x.relu_()
            return x
        return torch.relu(x) if self.act == "torch" else F.relu(x)

    def forward(self, x):
        x = self.c1(x)
        x = self.stem(x) if self.act == "mixed" and self.beta is None else self.relu(x, False)
        return self.fc(self.relu(self.c2(x)).flatten(1))


def reference_saliency(model, x, target, beta):
    model.beta = beta
    try:
        x = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    finally:
        model.beta = None
    return grad.abs()


@pytest.mark.parametrize("act", ["functional", "torch", "inplace", "mixed"])
@pytest.mark.parametrize("beta", [None, 4.0])
def test_saliency_of_functional_relus_equals_the_written_out_network(act, beta):
    model, x = Written(act).eval(), torch.rand(2, 3, 6, 6)
    before = snapshot(model)
    explained = model if beta is None else defences.beta_smooth(model, beta)
    explain = attributors.create("captum.saliency", explained)
    _, relevance = explain(x, 1)
    assert torch.allclose(relevance, reference_saliency(model, x, 1, beta), atol=1e-6)
    assert_unchanged(model, before)


def test_second_derivative_through_functional_softplus_matches_finite_differences():
    model = Written("inplace").double().eval()
    explain = attributors.create("captum.input_x_gradient", defences.beta_smooth(model, 3.0))
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: explain(x, 0)[1], (x,))


def test_a_network_without_any_activation_cannot_be_smoothed():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    explain = attributors.create("captum.saliency", defences.beta_smooth(linear, 2.0))
    with pytest.raises(ManipBenchError, match="no activation that beta-smoothing changes"):
        explain(torch.rand(1, 3, 2, 2), 0)
    explain = attributors.create("captum.saliency", linear)
    explain.set_beta(2.0)  # the attack's surrogate changes nothing here ...
    explain(torch.rand(1, 3, 2, 2), 0)
    assert not explain.swaps_activations  # ... and says so (the attack then refuses it)


def test_lrp_attributors_do_not_intercept():
    assert attributors.create("zennit.epsilon", Written()).functional is None


class FunctionalVGG(nn.Module):
    """The embedded VGG's weights, its ReLUs written as F.relu calls in forward."""

    def __init__(self, vgg):
        super().__init__()
        self.vgg = vgg

    def forward(self, x):
        x = self.vgg.normalize(x)
        for layer in self.vgg.features:
            x = F.relu(x) if isinstance(layer, nn.ReLU) else layer(x)
        c = self.vgg.classifier
        return c.fc2(F.relu(c.fc1(torch.flatten(x, 1))))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["captum.saliency", "captum.input_x_gradient",
                                  "captum.guided_backprop"])
def test_gradient_methods_attack_a_model_written_with_f_relu(name, trained_pair):
    vgg, x, x_target = trained_pair
    model = FunctionalVGG(vgg).eval()
    assert torch.equal(model(x), vgg(x))
    attack = ManipulationAttack(model, name, iterations=60)
    result = attack(x, attack.target_maps(x_target))
    assert_map_moved(result, by=0.3)
    assert attack.explain.functional.calls > 0
