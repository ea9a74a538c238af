"""CAM adapters: the stock libraries' maps, the layer by behaviour, second derivatives, ViTs."""
import warnings

import pytest
import torch
from torch import nn

from conftest import PlainCNN, tiny_net
from manip_bench import ManipBenchError, attributors, heatmaps
from manip_bench.attributors import cam

captum_attr = pytest.importorskip("captum.attr")
grad_cam = pytest.importorskip("pytorch_grad_cam", reason="pytorch-grad-cam not installed "
                               "(pip install manip-bench[cam])")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

#: registry name -> pytorch-grad-cam class name
GRAD_CAM = {"gradcam.gradcam": "GradCAM", "gradcam.gradcam_plus_plus": "GradCAMPlusPlus",
            "gradcam.xgradcam": "XGradCAM", "gradcam.hirescam": "HiResCAM",
            "gradcam.layercam": "LayerCAM", "gradcam.scorecam": "ScoreCAM",
            "gradcam.eigencam": "EigenCAM"}
ATTACKABLE = [name for name in attributors.available()
              if issubclass(attributors.get_class(name), cam.CamAttributor)
              and attributors.get_class(name).attackable]


def relative_error(a, b):
    return float((a.detach() - b).norm() / b.norm())


def stock_grad_cam(name, model, layers, x, target, **kwargs):
    """pytorch-grad-cam's own map (N, H, W) as a float64 tensor."""
    cls = getattr(grad_cam, GRAD_CAM[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cls(model=model, target_layers=layers, **kwargs) as method:
            if name == "gradcam.scorecam":
                method.batch_size = 64
            maps = method(x, targets=[ClassifierOutputTarget(int(t)) for t in target])
    return torch.from_numpy(maps).double()


def stock_captum(name, model, layer, x, target, mode):
    """Captum's map as the user sees it: the layer map upsampled with LayerAttribution."""
    if name == "captum.guided_gradcam":
        return captum_attr.GuidedGradCam(model, layer).attribute(x, target=target,
                                                                 interpolate_mode=mode)
    method = {"captum.layer_gradcam": captum_attr.LayerGradCam,
              "captum.layer_gradient_x_activation": captum_attr.LayerGradientXActivation,
              "captum.layer_integrated_gradients": captum_attr.LayerIntegratedGradients}[name]
    low = method(model, layer).attribute(x, target=target)
    return captum_attr.LayerAttribution.interpolate(low, x.shape[2:], mode), low


#: Captum layer methods compared with Captum in assert_matches_stock
CAPTUM_LAYER = ("captum.layer_gradcam", "captum.layer_gradient_x_activation",
                "captum.layer_integrated_gradients", "captum.guided_gradcam")


def test_every_cam_name_has_a_reference():
    cams = {name for name in attributors.available()
            if issubclass(attributors.get_class(name), cam.CamAttributor)}
    assert cams == set(GRAD_CAM) | set(CAPTUM_LAYER)


def assert_matches_stock(model, layer, x, target):
    for name in GRAD_CAM:
        ours = attributors.create(name, model, layer=layer)(x, target)[1]
        assert ours.shape == (x.shape[0], 1, *x.shape[2:])
        reference = stock_grad_cam(name, model, [layer], x, target)
        assert relative_error(ours[:, 0].detach(), reference) <= 1e-5, name
    for name in CAPTUM_LAYER:
        for mode in ("nearest", "bilinear"):
            explain = attributors.create(name, model, layer=layer, interpolate_mode=mode)
            ours = explain(x, target)[1].detach()
            reference = stock_captum(name, model, layer, x, target, mode)
            if name != "captum.guided_gradcam":
                reference, low = reference
                assert relative_error(explain.low_resolution, low) <= 1e-5, (name, mode)
            assert relative_error(ours, reference) <= 1e-5, (name, mode)


def test_maps_equal_the_stock_libraries_on_a_small_cnn():
    torch.manual_seed(0)
    model = PlainCNN().double().eval()
    x, target = torch.rand(3, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 2, 0])
    assert_matches_stock(model, model.features[3], x, target)


@pytest.mark.slow
def test_maps_equal_the_stock_libraries_on_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x, target = torch.rand(2, 3, 64, 64, dtype=torch.float64), torch.tensor([3, 7])
    assert_matches_stock(model, model.layer4, x, target)


def test_several_target_layers_as_pytorch_grad_cam_averages_them():
    torch.manual_seed(0)
    model = PlainCNN().double().eval()
    x, target = torch.rand(2, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 4])
    layers = [model.features[1], model.features[4]]
    explain = attributors.create("gradcam.gradcam", model, layer=layers)
    reference = stock_grad_cam("gradcam.gradcam", model, layers, x, target)
    assert relative_error(explain(x, target)[1][:, 0].detach(), reference) <= 1e-5
    assert explain.layer_name == "features.1,features.4"
    with pytest.raises(ManipBenchError, match="takes one layer"):
        attributors.create("captum.layer_gradcam", model, layer=layers)


def test_default_layer_is_the_last_spatial_map_and_is_named():
    torch.manual_seed(0)
    model = PlainCNN().eval()
    x = torch.rand(2, 3, 16, 16)
    explain = attributors.create("gradcam.gradcam", model)
    assert explain.layer_name is None  # found on the first call, from the input's shape
    by_default = explain(x, 1)[1]
    assert explain.layer_name == "features"  # output of the last max-pool: 4 x 4 pixels
    given = attributors.create("gradcam.gradcam", model, layer=model.features)(x, 1)[1]
    assert torch.equal(by_default, given)
    by_name = attributors.create("gradcam.gradcam", model, layer="features")(x, 1)[1]
    assert torch.equal(by_default, by_name)


def test_default_layer_of_torchvision_resnet_is_layer4():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    assert cam.last_feature_map(attributors.prepare_model(model), torch.rand(1, 3, 64, 64)) \
        == "layer4"


def test_wrong_layers_give_clear_errors(plain_cnn, images):
    other = PlainCNN()
    with pytest.raises(ManipBenchError, match="not a module of the model"):
        attributors.create("gradcam.gradcam", plain_cnn, layer=other.features[0])
    with pytest.raises(ManipBenchError, match="no layer named 'features.9'"):
        attributors.create("captum.layer_gradcam", plain_cnn, layer="features.9")
    with pytest.raises(ManipBenchError, match="a module or a dotted name"):
        attributors.create("gradcam.gradcam", plain_cnn, layer=3)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))
    with pytest.raises(ManipBenchError, match="no layer with a spatial output"):
        attributors.create("gradcam.gradcam", flat)(images, 0)
    with pytest.raises(ManipBenchError, match=r"2-D output; a CAM needs \(N, C, h, w\)"):
        attributors.create("gradcam.gradcam", plain_cnn, layer="classifier.0")(images, 0)


def test_the_users_layer_is_found_in_the_private_copy(plain_cnn, images):
    explain = attributors.create("gradcam.gradcam", plain_cnn, layer=plain_cnn.features[3])
    assert explain.layer_name == "features.3"
    assert explain.model is not plain_cnn
    explain(images, 0)
    assert explain.low_resolution.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("name", ATTACKABLE)
def test_input_derivative_matches_finite_differences_on_the_softplus_network(name):
    model = tiny_net()  # float64, input 3 x 6 x 6, conv map 3 x 3 at index 3
    explain = attributors.create(name, model, layer="3")
    explain.set_beta(3.0)
    torch.manual_seed(5)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 6, 6, dtype=torch.float64)

    def loss(inputs):
        output, relevance = explain(inputs, 1)
        return (heatmaps.heatmap(relevance) * weights).sum() + 1e-3 * output.sum()

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    # not a constant map: the CAM is positive at this layer for class 1 (3 x 3 -> 6 x 6)
    assert (explain.low_resolution > 0).any()
    (gradient,) = torch.autograd.grad(loss(x), x)
    assert gradient.abs().sum() > 0


def test_eigencam_explains_but_refuses_the_attack(plain_cnn, images):
    cls = attributors.get_class("gradcam.eigencam")
    assert not cls.attackable and "SVD" in cls.not_attackable_reason
    assert "gradcam.eigencam" not in attributors.GROUPS["all"]
    output, relevance = attributors.create("gradcam.eigencam", plain_cnn)(images, 0)
    assert not relevance.requires_grad and relevance.shape == (3, 1, 16, 16)


def test_groups():
    assert set(attributors.GROUPS["cam"]) == set(ATTACKABLE) - {"gradcam.scorecam"}
    assert "gradcam.scorecam" not in attributors.GROUPS["all"]  # C forward passes a step
    assert not set(attributors.GROUPS["cam"]) & set(attributors.GROUPS["gradient"])
    assert set(attributors.GROUPS["cam"]) <= set(attributors.GROUPS["all"])


def tiny_vit():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                 num_heads=2, hidden_dim=32, mlp_dim=64,
                                                 num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision initialises it to zero
    return model.double().eval()


def tokens_to_grid(tokens, side=4):
    """pytorch-grad-cam's ViT convention: drop the class token, (N, T, C) -> (N, C, h, w)."""
    grid = tokens[:, 1:, :].reshape(tokens.shape[0], side, side, tokens.shape[2])
    return grid.permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["gradcam.gradcam", "gradcam.gradcam_plus_plus",
                                  "gradcam.layercam"])
def test_vit_map_with_reshape_transform_equals_pytorch_grad_cam(name):
    model = tiny_vit()
    layer = model.encoder.layers[-1].ln_1
    x, target = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    explain = attributors.create(name, model, layer=layer, reshape_transform=tokens_to_grid)
    ours = explain(x, target)[1][:, 0].detach()
    reference = stock_grad_cam(name, model, [layer], x, target, reshape_transform=tokens_to_grid)
    assert relative_error(ours, reference) <= 1e-5
    assert explain.low_resolution.shape == (2, 1, 4, 4)


def test_token_layer_without_reshape_transform_is_refused():
    model = tiny_vit()
    layer = "encoder.layers.encoder_layer_1.ln_1"
    explain = attributors.create("gradcam.gradcam", model, layer=layer)
    with pytest.raises(ManipBenchError, match="reshape_transform"):
        explain(torch.rand(1, 3, 32, 32, dtype=torch.float64), 0)


def test_vit_map_derivative_matches_finite_differences_with_math_attention():
    """The map's input derivative through attention. PyTorch's fused CPU attention has no
    second derivative (a loss gradient on the map fails there); the math kernel has one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_vit()
    explain = attributors.create("gradcam.gradcam", model, layer=model.encoder.layers[-1].ln_1,
                                 reshape_transform=tokens_to_grid)
    torch.manual_seed(2)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    direction, weights = torch.randn_like(x), torch.rand(1, 32, 32, dtype=torch.float64)

    def loss(inputs):
        return (heatmaps.heatmap(explain(inputs, 1)[1]) * weights).sum()

    with sdpa_kernel(SDPBackend.MATH):
        (gradient,) = torch.autograd.grad(loss(x), x)
        step = 1e-6
        with torch.no_grad():
            numeric = (loss(x + step * direction) - loss(x - step * direction)) / (2 * step)
    assert float((gradient * direction).sum()) == pytest.approx(float(numeric), rel=1e-4)
