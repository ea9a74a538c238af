"""Every gradient method on the architectures people explain today (random weights, small
images): the attack runs and moves the map, and the drop-in Captum check runs. torchvision
definitions always; timm's with the optional extra (``pip install -e '.[timm]'``)."""
import pytest
import torch
import torchvision
from captum.attr import Saliency
from torch import nn

from manip_bench import ManipulationAttack, attributors, metrics, robustness
from manip_bench.models.cifar_vgg import Normalize

GRADIENT = [n for n in attributors.GROUPS["gradient"] if not n.startswith("pattern.")]
#: cheaper settings of the sample-based methods (the matrix checks that they run and move)
OPTIONS = {"captum.integrated_gradients": {"steps": 4}, "captum.smoothgrad": {"samples": 3},
           "captum.gradient_shap": {"samples": 3}}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tiny_vit():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision's is zero: no gradient
    return model


def timm_model(name, **kwargs):
    timm = pytest.importorskip("timm", reason="timm is an optional extra: pip install -e '.[timm]'")
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


#: name -> (builder, image side); each wrapped as Sequential(Normalize, net), as users do
ARCHITECTURES = {
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), 64),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 64),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 64),
    "swin_t": (lambda: torchvision.models.swin_t(num_classes=10), 64),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(num_classes=10), 64),
    "vit_tiny_torchvision": (tiny_vit, 32),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
    "timm_vit_tiny_patch16_224": (lambda: timm_model("vit_tiny_patch16_224", img_size=32,
                                                     patch_size=8), 32),
    "timm_deit_tiny_patch16_224": (lambda: timm_model("deit_tiny_patch16_224", img_size=32,
                                                      patch_size=8), 32),
    "timm_convnext_atto": (lambda: timm_model("convnext_atto"), 64),
    "timm_efficientnet_b0": (lambda: timm_model("efficientnet_b0"), 64),
}
_BUILT = {}
#: run in the quick suite too (small and fast); the rest of the matrix is marked slow
QUICK = {"vit_tiny_torchvision", "timm_convnext_atto", "mobilenet_v3_small"}
#: measured, not hidden: on random-weight RegNet-Y the surrogate's map (softplus, beta
#: 10 -> 100) does not carry over to the ReLU network's in a few steps (saliency, 20 steps:
#: loss on the surrogate 0.31 -> 0.16, target PCC of the ReLU map 0.065 -> 0.047)
NOT_TRANSFERRING = {"regnet_y_400mf"}


def cases(names=ARCHITECTURES):
    """``pytest.param`` per architecture, slow unless in QUICK, xfail where measured so."""
    params = []
    for name in names:
        marks = [] if name in QUICK else [pytest.mark.slow]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


#: measured: random-weight MobileNetV3-small has logits of order 1e-10, and guided
#: backprop's map kept both images' start after 6 steps (every step changed the class)
STUCK = {("mobilenet_v3_small", "captum.guided_backprop")}


def moving_cases():
    return [pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.xfail(
        reason="random-weight RegNet: the softplus surrogate does not transfer in a few "
               "steps (see NOT_TRANSFERRING)", strict=False)] if p.id in NOT_TRANSFERRING
        else p.marks) for p in cases()]


def architecture(name):
    if name not in _BUILT:
        build, side = ARCHITECTURES[name]
        torch.manual_seed(0)
        _BUILT[name] = nn.Sequential(Normalize(*IMAGENET), build()).eval(), side
    return _BUILT[name]


def images(side, n=2, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def corner_target(n, side):
    """A target map unlike any network's own: all mass in the top-left quarter."""
    target = torch.zeros(n, side, side)
    target[:, : side // 4, : side // 4] = 1
    return target


def attack_moves(model, side, method, iterations=6):
    x = images(side)
    attack = ManipulationAttack(model, method, iterations=iterations,
                                attributor_options=OPTIONS.get(method), progress=False)
    result = attack(x, corner_target(2, side))
    before = metrics.map_similarity(result.original_map, result.target_map)["pcc"]
    after = result.metrics["expl_target_pcc"]
    return before, after


def assert_moved(before, after, stochastic=False):
    """Closer to the target on average, and (deterministic maps) no image further from it:
    random-weight networks have tiny logit margins, so an image whose every step flips the
    class keeps its start. SmoothGrad's and GradientSHAP's maps are drawn anew at every
    evaluation, so one image may read lower by the noise alone."""
    assert sum(after) > sum(before) + 0.01, (before, after)
    if not stochastic:
        assert all(a >= b - 1e-6 for a, b in zip(after, before)), (before, after)


@pytest.mark.parametrize("arch", moving_cases())
def test_saliency_attack_moves_the_map(arch):
    model, side = architecture(arch)
    assert_moved(*attack_moves(model, side, "captum.saliency"))


@pytest.mark.parametrize("arch", cases())
def test_the_captum_check_runs(arch):
    model, side = architecture(arch)
    report = robustness.check_robustness(Saliency(model), images(side), iterations=2)
    assert len(report.per_sample["input"]) + len(report.skipped) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in GRADIENT if m != "captum.saliency"])
@pytest.mark.parametrize("arch", moving_cases())
def test_every_gradient_method_attack_moves_the_map(arch, method):
    if (arch, method) in STUCK:
        pytest.xfail("random-weight MobileNetV3 with guided backprop: stuck (see STUCK)")
    model, side = architecture(arch)
    stochastic = method in ("captum.smoothgrad", "captum.gradient_shap")
    assert_moved(*attack_moves(model, side, method), stochastic=stochastic)
