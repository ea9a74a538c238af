"""Every adapter's map equals the stock library's own output for the same model and input."""
import pytest
import torch
import torchvision
from torch import nn
from zennit import composites as zc
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.core import Composite
from zennit.rules import Epsilon, Gamma, Norm, Pass, ZBox, ZPlus
from zennit.types import Linear

from helpers import CAPTUM_REFERENCES, captum_reference, relative_error, seeded
from manip_bench import attributors
from manip_bench.models.cifar_vgg import CifarVGG

TARGET = torch.tensor([0, 3, 1])


def default_canonizers(model):
    """Stock Zennit's batch-norm merging, for the plain (non-residual) models here."""
    return [SequentialMergeBatchNorm()] if any(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()) else []




def zennit_reference(model, x, target, composite):
    with Gradient(model, composite) as gradient:
        _, relevance = gradient(x, lambda out: out * nn.functional.one_hot(target, out.shape[1]))
    return relevance


def gamma_block_composite(model, **bounds):
    """Written out independently: gamma per block counted by max-pools, head epsilon."""
    gammas, block, name_map = (0.5, 0.5, 0.25, 0.1, 0.0), 0, {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MaxPool2d):
            block += 1
        elif isinstance(module, nn.Conv2d):
            gamma = gammas[min(block, 4)]
            name_map[name] = Gamma(gamma) if gamma else Epsilon()
        elif isinstance(module, nn.Linear):
            name_map[name] = Epsilon()
        elif isinstance(module, (nn.ReLU, nn.BatchNorm2d)):  # merged norms pass, as in Zennit
            name_map[name] = Pass()
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            name_map[name] = Norm()
    return Composite(module_map=lambda ctx, name, module: name_map.get(name),
                     canonizers=default_canonizers(model))


ZENNIT_REFERENCES = {
    "zennit.epsilon": lambda m, **bounds: zc.LayerMapComposite(
        zc.layer_map_base() + [(Linear, Epsilon(0.25))], canonizers=default_canonizers(m)),
    "zennit.epsilon_plus_flat": lambda m, **bounds: zc.EpsilonPlusFlat(canonizers=default_canonizers(m)),
    "zennit.zplus": lambda m, **bounds: zc.EpsilonPlus(canonizers=default_canonizers(m)),
    "zennit.alpha2beta1": lambda m, **bounds: zc.EpsilonAlpha2Beta1(canonizers=default_canonizers(m)),
    "zennit.epsilon_gamma_box": lambda m, low=0.0, high=1.0: zc.EpsilonGammaBox(
        low=low, high=high, canonizers=default_canonizers(m)),
    "zennit.paper_lrp": lambda m, low=0.0, high=1.0: zc.SpecialFirstLayerMapComposite(
        zc.layer_map_base() + [(Linear, ZPlus(zero_params="bias"))],
        [(Linear, ZBox(low, high, zero_params="bias"))], canonizers=default_canonizers(m)),
    "zennit.gamma_vgg": gamma_block_composite,
}


def adapter_map(name, model, x, target):
    explain = attributors.create(name, model)
    return seeded(lambda: explain(x, target)[1]).detach()


def test_every_registry_name_has_a_reference():
    """pattern.* (no library ships them) have their reference in tests/test_patterns.py,
    transformer-only methods (lxt) in tests/attributors/test_transformer_lrp.py, the CAMs (a
    layer each, pytorch-grad-cam) in tests/attributors/test_cam.py."""
    names = {name for name in attributors.available() if not name.startswith("pattern.")
             and not attributors.get_class(name).architecture
             and name not in attributors.GROUPS["cam"] + ["gradcam.scorecam", "gradcam.eigencam"]}
    assert set(CAPTUM_REFERENCES) | set(ZENNIT_REFERENCES) == names


@pytest.mark.parametrize("name", sorted(CAPTUM_REFERENCES))
def test_captum_adapter_matches_captum(name, plain_cnn, images):
    expected = captum_reference(name, plain_cnn, images, TARGET)
    assert relative_error(adapter_map(name, plain_cnn, images, TARGET), expected) <= 1e-5


@pytest.mark.parametrize("name", sorted(ZENNIT_REFERENCES))
def test_zennit_adapter_matches_zennit(name, plain_cnn, images):
    expected = zennit_reference(plain_cnn, images.clone(), TARGET, ZENNIT_REFERENCES[name](plain_cnn))
    assert relative_error(adapter_map(name, plain_cnn, images, TARGET), expected) <= 1e-5


@pytest.fixture(scope="module")
def torchvision_vgg():
    torch.manual_seed(0)
    return torchvision.models.vgg11_bn(num_classes=10).eval()


@pytest.mark.parametrize("name", ["captum.saliency", "captum.integrated_gradients",
                                  "captum.guided_backprop", "captum.lrp"])
def test_captum_adapter_on_torchvision_vgg(name, torchvision_vgg):
    x = torch.rand(2, 3, 32, 32)
    target = torch.tensor([2, 7])
    # Captum's LRP has no rule for BatchNorm's merged form; compare it on the canonized copy
    model = torchvision_vgg if name != "captum.lrp" else torchvision.models.vgg11(num_classes=10).eval()
    expected = captum_reference(name, model, x, target)
    assert relative_error(adapter_map(name, model, x, target), expected) <= 1e-5


@pytest.mark.parametrize("name", sorted(ZENNIT_REFERENCES))
def test_zennit_adapter_on_torchvision_vgg_bn(name, torchvision_vgg):
    x = torch.rand(2, 3, 32, 32)
    target = torch.tensor([2, 7])
    expected = zennit_reference(torchvision_vgg, x.clone(), target,
                                ZENNIT_REFERENCES[name](torchvision_vgg))
    assert relative_error(adapter_map(name, torchvision_vgg, x, target), expected) <= 1e-5


class NormalisationFree(nn.Module):
    """The layers after ``CifarVGG``'s normalisation, as one module taking normalised input."""

    def __init__(self, model):
        super().__init__()
        self.features, self.classifier = model.features, model.classifier

    def forward(self, z):
        return self.classifier(torch.flatten(self.features(z), 1))


@pytest.mark.parametrize("name", sorted(ZENNIT_REFERENCES) + ["captum.lrp"])
def test_lrp_relevance_passes_the_input_normalisation(name):
    """The map equals the library's own on the network after the normalisation, fed the
    normalised image, with the true (per-channel) bounds of that input."""
    torch.manual_seed(0)
    model = CifarVGG((4, "M", 8, "M", 8, "M")).eval()
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 4])
    with torch.no_grad():
        z = model.normalize(x)
    rest = NormalisationFree(model).eval()
    low, high = model.normalize(torch.zeros(1, 3, 1, 1)), model.normalize(torch.ones(1, 3, 1, 1))
    if name == "captum.lrp":
        expected = captum_reference(name, rest, z, target)
    else:
        composite = ZENNIT_REFERENCES[name](rest, low=low, high=high)
        expected = zennit_reference(rest, z.clone(), target, composite)
    assert relative_error(attributors.create(name, model)(x, target)[1].detach(), expected) <= 1e-5


def test_lrp_total_relevance_and_conservation_gap(plain_cnn, images):
    """captum.lrp with zero biases conserves relevance: the gap is ~0."""
    for module in plain_cnn.modules():
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    output, relevance = attributors.create("captum.lrp", plain_cnn)(images, TARGET)
    gap = attributors.conservation_gap(output, relevance, TARGET)
    logit = output.gather(1, TARGET.view(-1, 1)).squeeze(1)
    assert torch.allclose(gap, torch.zeros_like(gap), atol=1e-4 * logit.abs().max().item())
    assert torch.allclose(attributors.total_relevance(relevance), logit, rtol=1e-4)
