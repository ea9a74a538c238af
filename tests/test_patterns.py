"""PatternAttribution: the pattern estimator, the patterns file, and the attributor's contract."""
import pytest
import torch
from captum.attr import Saliency
from torch import nn
from torch.nn import functional as F

from conftest import SHARED_DATA, PlainCNN, requires_shared_data, tiny_net
from helpers import assert_map_moved, assert_unchanged, relative_error, snapshot
from manip_bench import ManipBenchError, attributors, defences, models
from manip_bench.heatmaps import heatmap
from manip_bench.models import CIFAR_VGG_PATTERNS
from manip_bench.models.cifar_vgg import CIFAR10_STD, CifarVGG
from manip_bench.patterns import (
    check_patterns,
    estimate_patterns,
    image_batches,
    layer_regimes,
    load_patterns,
    pattern_layers,
    save_patterns,
)

NAME = "pattern.attribution"
TARGET = torch.tensor([0, 3, 1])


def cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def random_patterns(model, seed=5):
    torch.manual_seed(seed)
    return {name: torch.rand_like(layer.weight) for name, layer in pattern_layers(model).items()}


def ones_patterns(model):
    return {name: torch.ones_like(layer.weight) for name, layer in pattern_layers(model).items()}


def odd_cnn():
    """Strides, dilation, padding="same", average pooling, dropout, a Flatten module."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding="same", dilation=2), nn.ReLU(), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Dropout(0.5), nn.Linear(54, 5),
    ).eval()


# --- the estimator -------------------------------------------------------------------------------

def signal_distractor_data(n=20000, dim=6, seed=0):
    """x = a_s y + a_d eps (y, eps independent) and the filter w with w^T x = y (PatternNet)."""
    generator = torch.Generator().manual_seed(seed)
    a_signal, a_distractor = torch.randn(2, dim, generator=generator, dtype=torch.float64)
    y = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    eps = 3 * torch.randn(n, 1, generator=generator, dtype=torch.float64)
    x = y * a_signal + eps * a_distractor
    # the least-norm filter with w^T a_s = 1 and w^T a_d = 0: it must cancel the distractor
    directions = torch.stack([a_signal, a_distractor])
    w = torch.linalg.pinv(directions) @ torch.tensor([1.0, 0.0], dtype=torch.float64)
    return x, y, w, a_signal


@pytest.mark.parametrize("regime", ["linear", "positive", "negative"])
def test_estimator_recovers_the_signal_direction_of_a_linear_model(regime):
    x, y, w, a_signal = signal_distractor_data()
    model = nn.Linear(len(w), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    assert torch.allclose(model(x), y)  # the filter extracts the signal exactly
    assert abs(cosine(w, a_signal)) < 0.9  # ... but it does not point along it
    patterns = estimate_patterns(model, x.split(1000), regime=regime, progress=False)
    assert cosine(patterns[""][0].double(), a_signal) > 0.99
    assert torch.allclose(patterns[""][0].double(), a_signal, atol=0.05 * a_signal.norm().item())


def explicit_conv_pattern(conv, x, regime, padding=None):
    """The two-component estimator written out on unfolded patches (float64, one pass)."""
    padding = conv.padding if padding is None else padding
    patches = F.unfold(x.double(), conv.kernel_size, conv.dilation, padding, conv.stride)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return explicit_pattern(patches, conv, regime)


def explicit_pattern(patches, layer, regime):
    """The estimator on rows of layer inputs ``patches`` (N, F), ``layer``'s weights (K, F);
    a unit with fewer than two samples in its regime gets zeros, as documented."""
    weight = layer.weight.detach().double().flatten(1)
    y = patches @ weight.T
    pre_activation = y + layer.bias.detach().double()
    pattern = torch.zeros_like(weight)
    for unit in range(weight.shape[0]):
        keep = pre_activation[:, unit] > 0 if regime == "positive" else slice(None)
        xs, ys = patches[keep], y[keep, unit]
        if len(ys) < 2:
            continue
        covariance = (xs * ys[:, None]).mean(0) - xs.mean(0) * ys.mean()
        pattern[unit] = covariance / (weight[unit] @ covariance)
    return pattern.view_as(layer.weight).float()


@pytest.mark.parametrize("regime", ["positive", "linear"])
def test_conv_statistics_stream_over_batches_and_match_unfolded_patches(regime):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2)
    x = torch.rand(12, 3, 11, 9)
    streamed = estimate_patterns(conv, x.split(5), regime=regime, progress=False)[""]
    assert relative_error(streamed, explicit_conv_pattern(conv, x, regime)) < 1e-4


def test_relu_regime_uses_a_plus_for_rectified_layers_and_linear_for_the_logits(plain_cnn, images):
    regimes = layer_regimes(plain_cnn, pattern_layers(plain_cnn), images[:1], "relu")
    assert regimes == {"features.0": "positive", "features.3": "positive",
                       "classifier.0": "positive", "classifier.2": "linear"}


def test_estimation_leaves_the_model_alone_and_returns_weight_shaped_float32(plain_cnn, images):
    plain_cnn.train()
    before = snapshot(plain_cnn)
    patterns = estimate_patterns(plain_cnn, [(images, torch.zeros(3))], progress=False)
    assert_unchanged(plain_cnn, before)  # still in training mode, no hooks left
    for name, layer in pattern_layers(plain_cnn).items():
        assert patterns[name].shape == layer.weight.shape and patterns[name].dtype == torch.float32


def test_estimation_needs_data_and_supported_layers(plain_cnn):
    with pytest.raises(ManipBenchError, match="no images"):
        estimate_patterns(plain_cnn, [], progress=False)
    with pytest.raises(ManipBenchError, match="groups=1"):
        estimate_patterns(nn.Conv2d(4, 4, 3, groups=2), [torch.rand(1, 4, 5, 5)], progress=False)
    with pytest.raises(ManipBenchError, match="unknown pattern regime"):
        estimate_patterns(plain_cnn, [torch.rand(1, 3, 16, 16)], regime="both", progress=False)


def test_estimation_handles_strides_same_padding_and_pooling():
    """Each layer's pattern equals the estimator written out on its own inputs: a strided
    convolution, a dilated one with padding="same" (2 px here), and the logit layer behind
    average pooling, adaptive pooling, flatten and dropout (eval mode: identity)."""
    model = odd_cnn()
    torch.manual_seed(2)
    x = torch.rand(8, 3, 15, 16)
    patterns = estimate_patterns(model, x.split(3), progress=False)
    check_patterns(patterns, model)
    assert patterns.keys() == {"0", "2", "8"}
    with torch.no_grad():
        hidden = model[:2](x)
        features = model[:8](x)
    assert relative_error(patterns["0"], explicit_conv_pattern(model[0], x, "positive")) < 1e-4
    assert relative_error(patterns["2"], explicit_conv_pattern(model[2], hidden, "positive",
                                                               padding=(2, 2))) < 1e-4
    assert relative_error(patterns["8"], explicit_pattern(features.double(), model[8],
                                                          "linear")) < 1e-4
    x_explained = torch.rand(2, 3, 15, 16)
    output, relevance = attributors.create(NAME, model, patterns=patterns)(x_explained, 0)
    assert relevance.shape == x_explained.shape and torch.isfinite(relevance).all()
    assert relevance.abs().sum() > 0 and torch.allclose(output, model(x_explained))


def test_input_normalisation_is_recognised_by_what_it_computes():
    """Any (x - mean) / std module passes relevance, not only the model zoo's Normalize."""
    from manip_bench.attributors.pattern import is_input_normalization

    class Standardise(nn.Module):  # a user's own normalisation
        def __init__(self, forward_is_normalisation=True):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
            self.normalises = forward_is_normalisation

        def forward(self, x):
            return (x - self.mean) / self.std if self.normalises else x * self.std + self.mean

    assert is_input_normalization(Standardise()) and is_input_normalization(CifarVGG().normalize)
    assert not is_input_normalization(Standardise(forward_is_normalisation=False))
    assert not is_input_normalization(nn.BatchNorm2d(3)) and not is_input_normalization(odd_cnn())
    torch.manual_seed(0)
    net = PlainCNN().eval()
    model = nn.Sequential(Standardise(), net).eval()
    x, target = torch.rand(2, 3, 16, 16), torch.tensor([1, 4])
    patterns = {f"1.{name}": p for name, p in ones_patterns(net).items()}
    output, relevance = attributors.create(NAME, model, patterns=patterns)(x, target)
    gradient = Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=False)
    logit = output.gather(1, target[:, None]).view(-1, 1, 1, 1).detach()
    assert relative_error(relevance.detach(), logit * model[0].std * gradient) <= 1e-5


def test_command_estimates_and_saves_patterns_for_an_image_folder(tmp_path, capsys):
    from manip_bench import cli, data

    torch.manual_seed(0)
    for i in range(5):
        data.save_image(torch.rand(3, 32, 32), tmp_path / "images" / f"cls{i % 2}" / f"{i}.png")
    assert len(image_batches(tmp_path / "images", 32, batch_size=2, limit=3)) == 2
    assert cli.main(["patterns", str(tmp_path / "images"), "--out", str(tmp_path / "p.pt"),
                     "--batch-size", "2", "--device", "cpu"]) == 0
    assert "5 images" in capsys.readouterr().out
    check_patterns(load_patterns(tmp_path / "p.pt"), CifarVGG())


# --- the patterns file -------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, plain_cnn):
    patterns = random_patterns(plain_cnn)
    path = save_patterns(patterns, tmp_path / "p.pt")
    loaded = load_patterns(path)
    assert loaded.keys() == patterns.keys()
    assert all(torch.equal(loaded[k], patterns[k]) for k in patterns)
    assert torch.load(path, weights_only=True).keys() == patterns.keys()


def test_patterns_of_another_model_are_a_clear_error(tmp_path, plain_cnn, images):
    path = save_patterns(random_patterns(PlainCNN(channels=(4, 6))), tmp_path / "other.pt")
    with pytest.raises(ManipBenchError, match=r"other.pt do not match.*wrong shapes.*features.3"):
        attributors.create(NAME, plain_cnn, patterns=path)
    patterns = random_patterns(plain_cnn)
    del patterns["classifier.2"]
    patterns["head.fc"] = torch.ones(3)
    with pytest.raises(ManipBenchError,
                       match=r"missing layers: classifier.2.*unexpected layers: head.fc"):
        attributors.create(NAME, plain_cnn, patterns=patterns)
    small_vgg = CifarVGG((4, "M"))
    with pytest.raises(ManipBenchError, match="do not match the model"):
        check_patterns(load_patterns(CIFAR_VGG_PATTERNS), small_vgg)


def test_unreadable_or_missing_patterns_file(tmp_path, plain_cnn):
    (tmp_path / "junk.pt").write_text("not a tensor file")
    with pytest.raises(ManipBenchError, match="cannot read it as a patterns file"):
        attributors.create(NAME, plain_cnn, patterns=tmp_path / "junk.pt")
    with pytest.raises(ManipBenchError, match="not found"):
        attributors.create(NAME, plain_cnn, patterns=tmp_path / "missing.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ManipBenchError, match="dict of layer name"):
        attributors.create(NAME, plain_cnn, patterns=tmp_path / "list.pt")


def test_default_patterns_exist_only_for_the_embedded_model(plain_cnn):
    with pytest.raises(ManipBenchError, match="needs patterns for this model.*estimate_patterns"):
        attributors.create(NAME, plain_cnn)
    torch.manual_seed(0)
    with pytest.raises(ManipBenchError, match="shipped patterns belong to the CifarVGG"):
        attributors.create(NAME, CifarVGG())  # right architecture, other (random) weights


# --- the attributor ------------------------------------------------------------------------------

def reference_pattern_attribution(model, x, target, patterns):
    """Dombrowski et al.'s layer-by-layer PatternAttribution, written out for ``PlainCNN``."""
    conv1, _, pool1, conv2, _, pool2 = model.features
    fc1, _, fc2 = model.classifier
    z1 = conv1(x)
    p1, i1 = F.max_pool2d(z1.relu(), 2, return_indices=True)
    z2 = conv2(p1)
    p2, i2 = F.max_pool2d(z2.relu(), 2, return_indices=True)
    z3 = fc1(p2.flatten(1))
    out = fc2(z3.relu())
    r = out * F.one_hot(target, out.shape[1])
    r = r @ (fc2.weight * patterns["classifier.2"])
    r = (r * (z3 > 0)) @ (fc1.weight * patterns["classifier.0"])
    r = F.max_unpool2d(r.view_as(p2), i2, 2, output_size=z2.shape[2:]) * (z2 > 0)
    r = F.conv_transpose2d(r, conv2.weight * patterns["features.3"], padding=1)
    r = F.max_unpool2d(r, i1, 2, output_size=z1.shape[2:]) * (z1 > 0)
    return F.conv_transpose2d(r, conv1.weight * patterns["features.0"], padding=1)


def test_map_equals_an_independent_layer_by_layer_implementation(plain_cnn, images):
    patterns = random_patterns(plain_cnn)
    explain = attributors.create(NAME, plain_cnn, patterns=patterns)
    output, relevance = explain(images, TARGET)
    assert relevance.shape == images.shape
    assert torch.allclose(output, plain_cnn(images))
    with torch.no_grad():
        expected = reference_pattern_attribution(plain_cnn, images, TARGET, patterns)
    assert relative_error(relevance.detach(), expected) <= 1e-5


@pytest.mark.parametrize("model_name", ["plain_cnn", "odd_cnn"])
def test_all_ones_patterns_give_logit_times_gradient(model_name, plain_cnn, images):
    """With A = 1 the map is the seed (target logit) times Captum's plain gradient."""
    model, x = (plain_cnn, images) if model_name == "plain_cnn" else (odd_cnn(), images[:2, :, :15])
    target = TARGET[:len(x)]
    output, relevance = attributors.create(NAME, model, patterns=ones_patterns(model))(x, target)
    gradient = Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=False)
    logit = output.gather(1, target[:, None]).view(-1, 1, 1, 1).detach()
    assert relative_error(relevance.detach(), logit * gradient) <= 1e-5


def test_relevance_passes_the_input_normalisation_unchanged():
    """On a [0, 1]-input model the map is taken after Normalize (as LRP): logit x std x gradient."""
    torch.manual_seed(0)
    model = CifarVGG((4, "M", 8, "M")).eval()
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 4])
    output, relevance = attributors.create(NAME, model, patterns=ones_patterns(model))(x, target)
    gradient = Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=False)
    logit = output.gather(1, target[:, None]).view(-1, 1, 1, 1).detach()
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert relative_error(relevance.detach(), logit * std * gradient) <= 1e-5


def test_model_unchanged_after_create_and_explain(plain_cnn, images):
    plain_cnn.train()
    plain_cnn.features[0].weight.requires_grad_(False)
    before = snapshot(plain_cnn)
    x = images.clone().requires_grad_()
    explain = attributors.create(NAME, plain_cnn, patterns=random_patterns(plain_cnn))
    output, relevance = explain(x, 1)
    torch.autograd.grad(relevance.square().sum() + output.sum(), x)
    assert_unchanged(plain_cnn, before)


def test_rule_is_switched_off_when_explain_raises(plain_cnn, images, monkeypatch):
    explain = attributors.create(NAME, plain_cnn, patterns=random_patterns(plain_cnn))
    explain(images, 0)

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(explain.model.classifier[2], "layer_forward", broken)
    with pytest.raises(ManipBenchError, match="boom"):  # the RuntimeError, as its cause
        explain(images, 0)
    assert explain.layers and not any(layer.rule_active for layer in explain.layers)


def tiny_relevance_fn():
    net = tiny_net()
    explain = attributors.create(NAME, defences.beta_smooth(net, 5.0), patterns=random_patterns(net))
    return lambda x: explain(x, torch.tensor([0, 2]))[1]


def test_relevance_jacobian_matches_finite_differences():
    """Second-order terms: the attack's backward uses the true weights, not W ⊙ A."""
    torch.manual_seed(1)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tiny_relevance_fn(), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_loss_on_relevance_has_nonzero_gradient():
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(tiny_relevance_fn()(x).square().sum(), x)
    assert gradient.abs().sum() > 0


def test_registry_facts():
    cls = attributors.get_class(NAME)
    assert (cls.library, cls.rule, cls.needs_softplus, cls.attackable) == \
        ("manip_bench", "PatternAttribution (W ⊙ A+)", True, True)
    assert list(attributors.options(NAME)) == ["patterns"]
    assert NAME in attributors.GROUPS["gradient"]


# --- the shipped patterns for the embedded model -------------------------------------------------

def test_shipped_patterns_load_and_fit_the_embedded_model():
    patterns = torch.load(CIFAR_VGG_PATTERNS, weights_only=True)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in patterns.values())
    check_patterns(patterns, CifarVGG())
    assert CIFAR_VGG_PATTERNS.stat().st_size < 4e6


def test_shipped_patterns_give_a_finite_non_constant_map():
    model = models.load("cifar_vgg")
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    output, relevance = attributors.create(NAME, model)(x, torch.tensor([3, 5]))
    assert torch.isfinite(relevance).all() and relevance.std(dim=(1, 2, 3)).min() > 0


@requires_shared_data("cifar10", "test")
def test_shipped_patterns_on_cifar_test_images():
    model = models.load("cifar_vgg")
    x = next(iter(image_batches(SHARED_DATA / "cifar10" / "test", 32, 4, limit=4)))
    target = model(x).argmax(1)
    relevance = attributors.create(NAME, model)(x, target)[1]
    maps = heatmap(relevance)
    assert torch.isfinite(maps).all() and (maps.flatten(1).std(1) > 0).all()
    gradient_maps = heatmap(attributors.create("captum.saliency", model)(x, target)[1])
    assert relative_error(maps, gradient_maps) > 0.1  # the patterns matter


def test_short_attack_moves_the_map_toward_the_target(trained_pair):
    from manip_bench.attack import ManipulationAttack

    model, x, x_target = trained_pair
    attack = ManipulationAttack(model, NAME, iterations=40)
    result = attack(x, attack.target_maps(x_target))
    _, after = assert_map_moved(result, by=0.1)
    assert min(after) > 0.9, after
    assert all(result.metrics["class_kept"]) and max(result.metrics["input_linf"]) < 0.35
    relu_map = attack.evaluate(result.x_adv, result.original_class)[2]
    assert torch.allclose(relu_map, result.adversarial_map)
