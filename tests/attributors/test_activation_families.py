"""Activation families: smooth surrogates of piecewise-linear ones, beta versions of smooth ones,
and gradient-type explanations of networks built from each (modules or functional calls)."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from manip_bench import ManipulationAttack, attributors, defences, metrics
from manip_bench.attributors import activations

#: family name -> (module, the same as a function call with torch's arguments)
FORMS = {
    "relu": (nn.ReLU(), F.relu),
    "leaky_relu": (nn.LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2)),
    "prelu": (None, lambda x: F.prelu(x, torch.tensor([0.1, 0.3, -0.2], dtype=x.dtype))),
    "rrelu": (nn.RReLU(0.1, 0.3).eval(), lambda x: F.rrelu(x, 0.1, 0.3)),
    "hardtanh": (nn.Hardtanh(-0.5, 2.0), lambda x: F.hardtanh(x, -0.5, 2.0)),
    "relu6": (nn.ReLU6(), F.relu6),
    "hardsigmoid": (nn.Hardsigmoid(), F.hardsigmoid),
    "hardswish": (nn.Hardswish(), F.hardswish),
    "silu": (nn.SiLU(), F.silu),
    "gelu": (nn.GELU(), F.gelu),
}
#: the beta at which a smooth family's beta version is the activation itself
NATIVE_BETA = {"silu": 2.0, "gelu": 8 / math.sqrt(2 * math.pi)}
PIECEWISE = [f.name for f in activations.FAMILIES if f.piecewise_linear]


def points(dtype=torch.float64):
    """(1, 3, 401): values from -8 to 8 in each of three channels (PReLU has one slope each)."""
    return torch.linspace(-8, 8, 401, dtype=dtype).expand(1, 3, -1).clone()


def smooth(name, beta, x):
    with activations.FunctionalActivations(_holder(smoothing=beta)):
        return FORMS[name][1](x)


def _holder(smoothing=None, beta=None):
    relu = activations.SmoothReLU(smoothing)
    relu.beta = beta
    return relu


def test_the_table_covers_every_family_tested_here():
    assert {f.name for f in activations.FAMILIES} == set(FORMS)


@pytest.mark.parametrize("name", PIECEWISE)
def test_piecewise_linear_surrogates_recover_the_activation_as_beta_grows(name):
    x = points()
    exact = FORMS[name][1](x)
    errors = [(smooth(name, beta, x) - exact).abs().max().item() for beta in (10.0, 100.0, 1e4)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


@pytest.mark.parametrize("name", sorted(NATIVE_BETA))
def test_smooth_families_are_themselves_at_their_native_beta(name):
    x = points()
    assert torch.allclose(smooth(name, NATIVE_BETA[name], x), FORMS[name][1](x), atol=1e-12)
    assert not torch.allclose(smooth(name, 1.0, x), FORMS[name][1](x), atol=1e-3)


#: peak curvature of each family's beta version in units of beta / 4, per channel: one kink
#: of height h (the slope change) has h beta / 4; hardswish (x times a smooth step) has none
PEAK = {"relu": 1, "leaky_relu": 0.8, "prelu": [0.9, 0.7, 1.2], "rrelu": 0.8, "hardtanh": 1,
        "relu6": 1, "hardsigmoid": 1 / 6, "silu": 1, "gelu": 1}


@pytest.mark.parametrize("name", sorted(PEAK))
@pytest.mark.parametrize("beta", [5.0, 20.0])
def test_every_beta_version_has_peak_curvature_beta_over_four(name, beta):
    """The parametrisation: one beta means the same peak second derivative in every family
    (kinks far apart compared with 1 / beta, as at the betas the attack uses)."""
    x = torch.linspace(-8, 8, 16001, dtype=torch.float64).expand(1, 3, -1).clone()
    y = smooth(name, beta, x)[0]
    h = (x[0, 0, 1] - x[0, 0, 0]).item()
    peak = ((y[:, 2:] - 2 * y[:, 1:-1] + y[:, :-2]) / h ** 2).abs().amax(1)
    expected = torch.tensor(PEAK[name], dtype=torch.float64).expand(3) * beta / 4
    assert torch.allclose(peak, expected, rtol=2e-3), (peak, expected)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_beta_versions_are_correct_under_double_backprop(name):
    x = (torch.rand(1, 3, 7, dtype=torch.float64) * 8 - 4).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: smooth(name, 3.0, x), (x,))


class Tiny(nn.Module):
    """conv -> activation -> conv -> gate (a squeeze-excitation product) -> linear."""

    def __init__(self, activation, gate=False):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.fc, self.act, self.gate = nn.Linear(3 * 6 * 6, 4), activation, gate

    def forward(self, x):
        x = self.c2(self.act(self.c1(x)))
        if self.gate:
            x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
        return self.fc(self.act(x).flatten(1))


class Written(Tiny):
    """Tiny with a given function in place of the activation (the reference)."""

    def __init__(self, function, gate=False):
        super().__init__(nn.Identity(), gate)
        self.function = function

    def forward(self, x):
        x = self.c2(self.function(self.c1(x)))
        if self.gate:
            x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
        return self.fc(self.function(x).flatten(1))


def saliency(model, x, target):
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return grad.abs()


class Functional(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


@pytest.mark.parametrize("name", sorted(FORMS))
@pytest.mark.parametrize("form", ["module", "function"])
def test_the_attack_surrogate_swaps_exactly_the_piecewise_linear_families(name, form):
    module, function = FORMS[name]
    if form == "module" and module is None:
        pytest.skip("no module form")
    layer = module if form == "module" else Functional(function)
    model = Tiny(layer).double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    explain = attributors.create("captum.saliency", model)
    explain.set_beta(7.0)
    _, relevance = explain(x, 1)
    reference_function = (lambda z: smooth(name, 7.0, z)) if name in PIECEWISE else function
    reference = Written(reference_function).double().eval()
    reference.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(relevance, saliency(reference, x, 1), atol=1e-10)
    assert explain.swaps_activations == (name in PIECEWISE)


@pytest.mark.parametrize("name", ["hardswish", "silu", "gelu"])
def test_saliency_through_gates_has_correct_second_derivatives(name):
    """A SiLU/GELU network with a squeeze-excitation gate, no surrogate: gradcheck in float64."""
    model = Tiny(FORMS[name][0], gate=True).double().eval()
    explain = attributors.create("captum.saliency", model)
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: explain(x, 2)[1], (x,))


def test_a_network_mixing_relu_and_gelu_swaps_only_the_relus():
    class Mixed(Tiny):
        def forward(self, x):
            return self.fc(F.gelu(self.c2(torch.relu(self.c1(x)))).flatten(1))

    model = Mixed(nn.Identity()).double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    explain = attributors.create("captum.input_x_gradient", model)
    explain.set_beta(4.0)
    _, relevance = explain(x, 0)

    class Reference(Mixed):
        def forward(self, x):
            return self.fc(F.gelu(self.c2(F.softplus(self.c1(x), 4.0))).flatten(1))

    reference = Reference(nn.Identity()).double().eval()
    reference.load_state_dict(model.state_dict())
    z = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(reference(z)[:, 0].sum(), z)
    assert torch.allclose(relevance, grad * x, atol=1e-10)


@pytest.mark.parametrize("name", ["silu", "gelu", "hardswish"])
def test_beta_smoothing_a_smooth_network_changes_it_as_the_table_says(name):
    model = Tiny(FORMS[name][0]).double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    beta = NATIVE_BETA.get(name, 1e5)
    same = defences.beta_smooth(model, beta)
    assert torch.allclose(same(x), model(x), atol=1e-6)  # the original network's own beta
    smoother = defences.beta_smooth(model, 1.0)
    reference = Written(lambda z: smooth(name, 1.0, z)).double().eval()
    reference.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(smoother(x), reference(x), atol=1e-10)
    assert not torch.allclose(smoother(x), model(x), atol=1e-4)


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_the_attack_follows_a_smooth_network_as_it_is(name):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FORMS[name][0],
                          nn.Conv2d(8, 8, 3, padding=1), FORMS[name][0], nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 5)).eval()
    x, target_map = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)
    attack = ManipulationAttack(model, "captum.saliency", iterations=30, budget="linf:0.1")
    result = attack(x, target_map)
    assert not attack.grows_beta and result.history["beta"][-1] is None
    before = metrics.map_similarity(result.original_map, result.target_map)["pcc"]
    assert all(a > b + 0.05 for a, b in zip(result.metrics["expl_target_pcc"], before))
