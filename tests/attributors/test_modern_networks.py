"""The networks people explain today: GELU/SiLU/attention models, models as users wrap them
(nn.Sequential roots, DataParallel, torch.compile, channels-last), LRP refusals by behaviour."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from manip_bench import ManipBenchError, ManipulationAttack, attributors, metrics
from manip_bench.attributors.canonize import CanonicalModel

from resnets import ModuleShortcutBlock, PaddingBlock, ShiftScale, SmallResNet, randomise_batch_norms

LRP = attributors.GROUPS["lrp"]
GRADIENT = [n for n in attributors.GROUPS["gradient"] if not n.startswith("pattern.")]


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Inside(nn.Module):
    """A residual network that normalises inside its own forward."""

    def __init__(self, normalize, net):
        super().__init__()
        self.normalize, self.net = normalize, net

    def forward(self, x):
        return self.net(self.normalize(x))


def residual(kind):
    torch.manual_seed(0)
    if kind == "torchvision_resnet18":
        return randomise_batch_norms(torchvision.models.resnet18(num_classes=5))
    block = {"padding_block": PaddingBlock, "shortcut_module": ModuleShortcutBlock}[kind]
    return randomise_batch_norms(SmallResNet(block, normalize=False))


@pytest.mark.parametrize("kind", ["torchvision_resnet18", "padding_block", "shortcut_module"])
@pytest.mark.parametrize("name", LRP)
def test_lrp_on_a_sequential_root_equals_normalisation_inside_forward(kind, name):
    net, normalize = residual(kind).double(), ShiftScale().double()
    sequential = nn.Sequential(normalize, net).eval()
    children = [n for n, _ in sequential.named_children()]
    inside = Inside(normalize, net).eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    maps = [attributors.create(name, model)(x, torch.tensor([1, 3]))[1]
            for model in (sequential, inside)]
    assert relative_error(*maps) <= 1e-5
    assert [n for n, _ in sequential.named_children()] == children  # the user's tree as given


def test_residual_sums_live_in_a_wrapper_not_in_the_users_module_tree():
    sequential = nn.Sequential(ShiftScale(), residual("padding_block")).eval()
    explain = attributors.create("zennit.epsilon", sequential)
    explain(torch.rand(1, 3, 32, 32), 0)
    assert isinstance(explain.model, CanonicalModel) and len(explain.model.sums) == 3
    assert [n for n, _ in explain.model.net.named_children()] == ["0", "1"]


def test_nan_images_are_refused_before_any_explanation():
    sequential = nn.Sequential(ShiftScale(), residual("padding_block")).eval()
    x = torch.rand(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    for name in ("zennit.epsilon_plus_flat", "captum.saliency"):
        with pytest.raises(ManipBenchError, match="NaN"):
            attributors.create(name, sequential)(x, 0)


class Gated(nn.Module):
    """conv -> ReLU -> squeeze-excitation gate -> linear (written with tensor products)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)
        self.se = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.fc((x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))).flatten(1))


class LayerNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.LayerNorm(4), \
            nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(F.gelu(x).flatten(1))


class FunctionalGELU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(F.gelu(self.conv(x)).flatten(1))


def tiny_vit(image=8, patch=4, layers=1, hidden=8, dtype=torch.float32):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=image, patch_size=patch, num_layers=layers, num_heads=2, hidden_dim=hidden,
        mlp_dim=2 * hidden, num_classes=3)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision initialises it to zero
    return model.to(dtype).eval()


@pytest.mark.parametrize("model, module, what", [
    (Gated(), "the model's own forward", "sigmoid outside an activation module"),
    (LayerNormed(), "module 'norm'", "layer normalisation"),
    (FunctionalGELU(), "the model's own forward", "GELU outside an activation module"),
    (tiny_vit(), "module 'encoder.layers.encoder_layer_0.ln_1'", "layer normalisation"),
])
def test_lrp_refuses_operations_without_a_rule_naming_the_module(model, module, what):
    for name in ("zennit.epsilon", "zennit.epsilon_plus_flat"):
        with pytest.raises(ManipBenchError, match=f"{module} computes {what}"):
            attributors.create(name, model.eval())(torch.rand(1, 3, 8, 8), 0)


def test_gelu_modules_get_zennits_pass_rule_and_are_explained():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3)).eval()
    _, relevance = attributors.create("zennit.epsilon", model)(torch.rand(1, 3, 8, 8), 0)
    assert relevance.abs().sum() > 0


def test_saliency_through_attention_has_correct_second_derivatives():
    """torchvision's ViT (attention, LayerNorm, GELU): gradcheck in float64, on CPU, where the
    fused attention kernel has no double backward (the attributors use the math kernel)."""
    model = tiny_vit(dtype=torch.float64)
    explain = attributors.create("captum.saliency", model)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: explain(x, 1)[1], (x,))
    assert not explain.swaps_activations


@pytest.mark.parametrize("wrap", ["data_parallel", "compiled"])
@pytest.mark.parametrize("name", ["captum.saliency", "zennit.epsilon_plus_flat"])
def test_wrapped_models_are_explained_as_the_module_inside(wrap, name):
    model = nn.Sequential(ShiftScale(), residual("shortcut_module")).eval()
    wrapped = nn.DataParallel(model) if wrap == "data_parallel" else torch.compile(model)
    x = torch.rand(2, 3, 32, 32)
    expected = attributors.create(name, model)(x, 1)[1]
    assert torch.allclose(attributors.create(name, wrapped)(x, 1)[1], expected, atol=1e-6)


@pytest.mark.parametrize("name", ["captum.saliency", "zennit.epsilon_plus_flat"])
def test_channels_last_images_give_the_same_map(name):
    model = nn.Sequential(ShiftScale(), residual("shortcut_module")).eval()
    x = torch.rand(2, 3, 32, 32)
    explain = attributors.create(name, model)
    expected = explain(x, 1)[1]
    assert torch.allclose(explain(x.to(memory_format=torch.channels_last), 1)[1], expected,
                          atol=1e-6)


def test_the_users_model_is_left_as_given():
    model = nn.Sequential(ShiftScale(), residual("padding_block")).eval()
    before = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    for name in ("zennit.gamma_vgg", "captum.saliency"):
        attack = ManipulationAttack(model, name, iterations=2)
        attack(torch.rand(1, 3, 32, 32), torch.rand(1, 32, 32))
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_gate_made_with_an_activation_module_is_refused_for_its_product():
    class ModuleGate(Gated):
        def __init__(self):
            super().__init__()
            self.gate = nn.Sigmoid()

        def forward(self, x):
            x = F.relu(self.conv(x))
            return self.fc((x * self.gate(self.se(x.mean((2, 3), keepdim=True)))).flatten(1))

    with pytest.raises(ManipBenchError, match="product of two input-dependent tensors"):
        attributors.create("zennit.epsilon", ModuleGate().eval())(torch.rand(1, 3, 8, 8), 0)


def test_the_zennit_check_runs_on_a_sequential_rooted_resnet():
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    from manip_bench import robustness

    torch.manual_seed(0)
    model = nn.Sequential(ShiftScale(), randomise_batch_norms(
        torchvision.models.resnet18(num_classes=5))).eval()
    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    report = robustness.check_robustness(composite, torch.rand(2, 3, 32, 32), model=model,
                                         iterations=2)
    assert len(report.per_sample["input"]) + len(report.skipped) == 2
