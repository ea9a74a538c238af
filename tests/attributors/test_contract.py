"""The public contract: the caller's model is untouched, and bad input gives clear errors."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_unchanged, snapshot
from manip_bench import ManipBenchError, attributors, defences


# pattern.* need patterns estimated for the model: their contract is in tests/test_patterns.py;
# transformer-only methods (``architecture``): in tests/attributors/test_transformer_lrp.py
@pytest.mark.parametrize("name", [name for name in attributors.available()
                                  if not name.startswith("pattern.")
                                  and not getattr(attributors.get_class(name), "architecture",
                                                  None)])
def test_model_unchanged_after_create_and_explain(name, plain_cnn, images):
    plain_cnn.train()  # an unusual mode the attributor must not change
    plain_cnn.features[0].weight.requires_grad_(False)
    before = snapshot(plain_cnn)
    x = images.clone().requires_grad_()
    output, relevance = attributors.create(name, plain_cnn)(x, 1)
    if attributors.get_class(name).attackable:
        torch.autograd.grad(relevance.square().sum() + output.sum(), x)
    assert_unchanged(plain_cnn, before)


@pytest.mark.parametrize("name", ["zennit.epsilon", "captum.guided_backprop", "captum.saliency"])
def test_no_hooks_left_when_explain_raises(name, plain_cnn, images, monkeypatch):
    before = snapshot(plain_cnn)
    explain = attributors.create(name, plain_cnn)
    explain(images, 0)  # validate the input shape once, so the failure comes from inside

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(explain.model.classifier[2], "forward", broken)
    with pytest.raises(ManipBenchError, match="boom") as raised:
        explain(images, 0)
    assert isinstance(raised.value.__cause__, RuntimeError)  # the original stays attached
    assert_unchanged(plain_cnn, before)
    leftover = [m for m in explain.model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert leftover == []
    assert not any(a.rule_active for a in explain.activations)


def test_available_is_sorted_and_complete():
    names = attributors.available()
    assert names == sorted(names)
    for required in ["captum.saliency", "captum.input_x_gradient", "captum.integrated_gradients",
                     "captum.guided_backprop", "captum.deeplift", "captum.smoothgrad",
                     "captum.gradient_shap", "captum.lrp", "zennit.epsilon",
                     "zennit.epsilon_plus_flat", "zennit.epsilon_gamma_box", "zennit.alpha2beta1",
                     "zennit.zplus", "zennit.gamma_vgg", "zennit.paper_lrp"]:
        assert required in names


def test_unknown_name_suggests_a_close_match(plain_cnn):
    with pytest.raises(ManipBenchError, match="Did you mean 'zennit.epsilon'") as error:
        attributors.create("zennit.epsilom", plain_cnn)
    assert "captum.saliency" in str(error.value)


def test_unknown_option_lists_valid_options(plain_cnn):
    with pytest.raises(ManipBenchError, match="takes: steps, method, internal_batch_size"):
        attributors.create("captum.integrated_gradients", plain_cnn, n_step=3)


@pytest.mark.parametrize("x, message", [
    (torch.rand(3, 16, 16), r"shape \(N, C, H, W\)"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.long), "floating-point"),
    (torch.rand(1, 4, 16, 16), r"x has 4 channel\(s\) but the model.s first convolution takes 3"),
])
def test_bad_input_shape(x, message, plain_cnn):
    with pytest.raises(ManipBenchError, match=message):
        attributors.create("captum.saliency", plain_cnn)(x, 0)


@pytest.mark.parametrize("target", [5, -1, torch.tensor([0, 9, 1])])
def test_target_out_of_range(target, plain_cnn, images):
    with pytest.raises(ManipBenchError, match=r"class index in \[0, 5\)"):
        attributors.create("zennit.epsilon", plain_cnn)(images, target)


def test_target_batch_mismatch(plain_cnn, images):
    with pytest.raises(ManipBenchError, match="2 entries for a batch of 3"):
        attributors.create("captum.saliency", plain_cnn)(images, torch.tensor([0, 1]))


class FunctionalReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 3), nn.Linear(2 * 14 * 14, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_smoothing_reaches_functional_relu_calls():
    """F.relu calls are swapped for softplus like nn.ReLU modules (by the attack and the defence)."""
    torch.manual_seed(0)
    model, x = FunctionalReLUNet(), torch.rand(2, 3, 16, 16)
    smooth = attributors.create("captum.saliency", defences.beta_smooth(model, 10.0))
    plain = attributors.create("captum.saliency", model)
    assert not torch.allclose(smooth(x, 0)[1], plain(x, 0)[1])
    assert plain.functional.calls > 0 and smooth.smoothed
    surrogate = attributors.create("captum.saliency", model)
    surrogate.set_beta(10.0)
    torch.testing.assert_close(surrogate(x, 0)[1], smooth(x, 0)[1])


def test_non_module_model_is_an_error():
    with pytest.raises(ManipBenchError, match="torch.nn.Module"):
        attributors.create("captum.saliency", lambda x: x)


def test_private_copy_shares_the_callers_weights_read_only(plain_cnn):
    """No second copy of the weights in memory, and the caller's flags stay as they were."""
    explain = attributors.create("captum.saliency", plain_cnn)
    for mine, theirs in zip(explain.model.parameters(), plain_cnn.parameters()):
        assert mine is not theirs and mine.data_ptr() == theirs.data_ptr()
        assert not mine.requires_grad and theirs.requires_grad
    for mine, theirs in zip(explain.model.buffers(), plain_cnn.buffers()):
        assert mine.data_ptr() == theirs.data_ptr()


@pytest.mark.parametrize("name", ["zennit.epsilon", "zennit.paper_lrp", "captum.saliency"])
def test_in_place_weight_updates_reach_the_copy(name, plain_cnn, images):
    """Shared storage: an optimiser step on the caller's model is what the copy explains next
    (also through the fast LRP path's cache of rule-modified weights)."""
    explain = attributors.create(name, plain_cnn)
    before = explain(images, 1)[1]
    with torch.no_grad():
        for parameter in plain_cnn.parameters():
            parameter.mul_(-0.5)
    fresh = attributors.create(name, plain_cnn)(images, 1)[1]
    after = explain(images, 1)[1]
    assert not torch.allclose(after, before)
    assert torch.allclose(after, fresh, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["zennit.epsilon_plus_flat", "zennit.gamma_vgg",
                                  "captum.saliency"])
def test_batch_norm_merging_on_the_copy_leaves_the_shared_weights_alone(name, images):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    model.eval()
    before = snapshot(model)
    x = images.clone().requires_grad_()
    output, relevance = attributors.create(name, model)(x, 1)
    torch.autograd.grad(relevance.square().sum() + output.sum(), x)
    assert_unchanged(model, before)
