"""The relevance's derivative in x is correct: autograd vs central finite differences (float64)."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_net
from helpers import assert_unchanged, snapshot
from manip_bench import attributors, defences

# pattern.* need patterns for the model: their gradcheck is in tests/test_patterns.py;
# transformer-only methods (``architecture``): in tests/attributors/test_transformer_lrp.py
ATTACKABLE = [name for name in attributors.available()
              if attributors.get_class(name).attackable and not name.startswith("pattern.")
              and not getattr(attributors.get_class(name), "architecture", None)]


#: CAMs: on tiny_net's last spatial map Grad-CAM is negative everywhere for these targets
#: (a zero map after its ReLU), so they take the first convolution's map
OPTIONS = {"captum.integrated_gradients": {"steps": 5},
           **{name: {"layer": "0"} for name in attributors.GROUPS["cam"]}}


def relevance_fn(name):
    options = OPTIONS.get(name, {})
    model = tiny_net()
    if attributors.get_class(name).needs_softplus:  # ReLU: zero second derivative
        model = defences.beta_smooth(model, 5.0)
    explain = attributors.create(name, model, **options)
    target = torch.tensor([0, 2])

    def relevance(x):
        torch.manual_seed(0)  # noisy methods draw the same noise on every call
        np.random.seed(0)
        return explain(x, target)[1]

    return relevance


@pytest.mark.parametrize("name", ATTACKABLE)
def test_relevance_jacobian_matches_finite_differences(name):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relevance_fn(name), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ATTACKABLE)
def test_loss_on_relevance_has_nonzero_gradient(name):
    """Guards against a silently disconnected graph (gradcheck passes for constant maps)."""
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    relevance = relevance_fn(name)(x)
    (gradient,) = torch.autograd.grad(relevance.square().sum(), x)
    assert gradient.abs().sum() > 0


def test_relu_saliency_has_zero_second_derivative():
    """The reason for the softplus swap: on a ReLU net the gradient map is locally constant."""
    explain = attributors.create("captum.saliency", tiny_net())
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(explain(x, 0)[1].sum(), x, allow_unused=True)
    assert gradient is None or gradient.abs().max() == 0


def test_deconvolution_is_flagged_locally_constant():
    explain = attributors.create("captum.deconvolution", tiny_net())
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(explain(x, 1)[1].square().sum(), x, allow_unused=True)
    assert not explain.attackable
    assert gradient is None or gradient.abs().max() == 0


@pytest.mark.parametrize("name", ["zennit.epsilon_plus_flat", "zennit.gamma_vgg", "zennit.paper_lrp"])
def test_batch_norm_models_keep_correct_second_derivatives(name):
    """Batch norm is merged once into the private copy, never swapped under a live graph."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    ).double().eval()
    batch_norm = model[1]
    batch_norm.running_mean.uniform_(-0.5, 0.5)
    batch_norm.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(batch_norm.weight, 0.5, 1.5)
    before = snapshot(model)
    explain = attributors.create(name, model)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: explain(x, 1)[1], (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert_unchanged(model, before)
