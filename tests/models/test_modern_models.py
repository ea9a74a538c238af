"""The embedded modern CIFAR-10 models (ConvNeXt, torchvision ViT) and how train_cifar makes them."""
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import SHARED_DATA, requires_shared_data
from manip_bench import ManipBenchError, models
from manip_bench.data import load_batch
from manip_bench.models import train_cifar
from manip_bench.models.cifar_convnext import CifarConvNeXt, ConvNeXtBlock
from manip_bench.models.cifar_vgg import CIFAR10_MEAN, CIFAR10_STD, Normalize
from manip_bench.models.cifar_vit import CifarViT

MODERN = [("cifar_convnext", CifarConvNeXt, "convnext"), ("cifar_vit", CifarViT, "vit")]
#: accuracy of the shipped weights on all 10,000 CIFAR-10 test images, as printed by
#: train_cifar at the end of their training run (docs/models.md)
TEST_ACCURACY = {"cifar_convnext": 0.3816, "cifar_vit": 0.4008}
#: accuracy of the shipped weights on the first 50 test images of each class (500 images)
SUBSET_ACCURACY = {"cifar_convnext": 0.344, "cifar_vit": 0.382}


@pytest.fixture(scope="module", params=MODERN, ids=[name for name, *_ in MODERN])
def shipped(request):
    name, cls, arch = request.param
    return name, cls, arch, models.load(name)


def without_normalize(model):
    """A copy of ``model`` whose ``normalize`` passes its input through."""
    import copy
    bare = copy.deepcopy(model)
    bare.normalize = nn.Identity()
    return bare


def test_listed_described_and_retrainable(shipped):
    name, _, arch, _ = shipped
    assert name in models.available()
    assert models.input_size(name) == 32
    assert models.class_names(name) == models.class_names("cifar_vgg")
    row = {row["name"]: row for row in models.describe()}[name]
    assert row == {"name": name, "input_size": 32, "classes": 10,
                   "source": f"embedded ({name}.pt, CIFAR-10)"}
    train_args = models.EMBEDDED_MODELS[name].train_args
    assert f"--arch {arch} " in train_args and "--time-budget" in train_args
    args = train_cifar.parse_args(["--data", "DIR", "--out", "x.pt", *train_args.split()])
    assert args.arch == arch and args.optimizer == "adamw" and args.schedule == "cosine"
    assert args.threads == 1 and args.time_budget <= 22 * 60


def test_cli_list_shows_them(capsys):
    from manip_bench import cli

    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name, *_ in MODERN:
        assert name in out


def test_weights_file_is_small_and_is_what_loads(shipped):
    name, cls, _, model = shipped
    path = models.embedded_weights_path(name)
    assert path.is_file() and path.stat().st_size < 5 * 1024 * 1024
    assert isinstance(model, cls) and not any(module.training for module in model.modules())
    state = torch.load(path, weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_takes_unit_images_and_normalises_inside(shipped):
    _, _, _, model = shipped
    name, first = next(iter(model.named_children()))
    assert name == "normalize" and isinstance(first, Normalize)
    assert torch.allclose(first.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    assert torch.allclose(first.std.flatten(), torch.tensor(CIFAR10_STD))
    x = torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        assert torch.allclose(out, without_normalize(model)((x - mean) / std), atol=1e-5)


def test_random_weights_are_seeded_differ_and_have_nonzero_gradients(shipped):
    name, cls, _, model = shipped
    torch.manual_seed(7)
    first = models.load(name, weights="random")
    torch.manual_seed(7)
    second = models.load(name, weights="random")
    assert isinstance(first, cls) and not first.training
    for (key, a), b, c in zip(first.state_dict().items(), second.state_dict().values(),
                              model.state_dict().values()):
        assert torch.equal(a, b), key
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), model.parameters()))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    grad, = torch.autograd.grad(first(x)[:, 3].sum(), x)
    assert grad.abs().amax(dim=(1, 2, 3)).min() > 0  # torchvision's zero head would give 0


@pytest.mark.parametrize("name, attribute, arch", [("cifar_convnext", "CIFAR_CONVNEXT_WEIGHTS",
                                                   "convnext"),
                                                  ("cifar_vit", "CIFAR_VIT_WEIGHTS", "vit")])
def test_missing_weights_file_says_how_to_retrain(monkeypatch, tmp_path, name, attribute, arch):
    monkeypatch.setattr(models, attribute, tmp_path / f"{name}.pt")
    with pytest.raises(ManipBenchError, match=f"weights missing.*train_cifar --arch {arch} "):
        models.load(name)


def test_convnext_is_built_from_convnext_parts():
    model = models.load("cifar_convnext")
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert len(blocks) == 6
    for block in blocks:
        conv = block.dwconv
        assert conv.kernel_size == (7, 7) and conv.groups == conv.in_channels == conv.out_channels
        assert block.pw1.out_features == 4 * block.pw1.in_features
    kinds = {type(m) for m in model.modules()}
    assert {nn.GELU, nn.LayerNorm} <= kinds
    assert not kinds & {nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d}
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len({id(m) for m in gelus}) == len(gelus) == 6  # one module per use
    # patchify stem and the downsampling layers: non-overlapping 2x2 stride-2 convolutions
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert [m.kernel_size for m in strided] == [(2, 2)] * 3


def test_vit_is_torchvisions_vision_transformer(tmp_path):
    from torchvision.models import VisionTransformer

    model = models.load("cifar_vit")
    assert type(model.net) is VisionTransformer
    assert model.net.patch_size == 4 and model.net.image_size == 32
    assert len(model.net.encoder.layers) == 4 and model.net.hidden_dim == 128
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attention) == 4 and attention[0].num_heads == 4
    # a bare torchvision state_dict (no wrapper, no normalisation) loads too
    torch.save(model.net.state_dict(), tmp_path / "vit.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(models.load("cifar_vit", weights=tmp_path / "vit.pt")(x), model(x))


@requires_shared_data("cifar10", "test")
def test_classifies_cifar_test_images(shipped):
    name, _, _, model = shipped
    root = SHARED_DATA / "cifar10" / "test"
    paths, labels = [], []
    for label, cls in enumerate(models.class_names(name)):  # the first 50 images of each class
        paths += sorted((root / cls).iterdir())[:50]
        labels += [label] * 50
    with torch.no_grad():
        predicted = model(load_batch(paths, 32)).argmax(1)
    accuracy = (predicted == torch.tensor(labels)).float().mean().item()
    assert abs(accuracy - SUBSET_ACCURACY[name]) <= 0.01, f"{accuracy:.4f} on 500 test images"


@pytest.mark.slow
@requires_shared_data("cifar10", "test")
def test_accuracy_on_the_cifar_test_set(shipped):
    name, _, _, model = shipped
    images, labels = train_cifar.load_image_folder(str(SHARED_DATA / "cifar10" / "test"),
                                                   None, 0, 4)
    assert len(labels) == 10000
    acc = train_cifar.accuracy(train_cifar.predict(model, images), labels)
    assert abs(acc - TEST_ACCURACY[name]) <= 0.001, f"test accuracy {acc:.4f}"


# --- train_cifar's options for these models ---------------------------------------------------


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factors = [train_cifar.cosine_factor(p / 100, 0.1) for p in range(101)]
    assert factors[0] == 0 and factors[10] == pytest.approx(1) and factors[100] == pytest.approx(0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))
    assert all(a > b for a, b in zip(factors[10:100], factors[11:101]))
    assert train_cifar.cosine_factor(0.55, 0.1) == pytest.approx(0.5)
    assert train_cifar.cosine_factor(1.5, 0.1) == 0 and train_cifar.cosine_factor(-1, 0.1) == 0


def test_budget_counts_steps_or_training_time_only(monkeypatch):
    clock = iter([0.0, 30.0, 40.0, 100.0, 130.0])
    monkeypatch.setattr(train_cifar.time, "perf_counter", lambda: next(clock))
    budget = train_cifar.Budget(total_steps=1000, seconds=60)
    with budget.running():  # 0 -> 40
        budget.steps += 10
        assert budget.progress() == pytest.approx(0.5)  # read at 30: time, not steps, leads
    assert budget.spent == 40 and not budget.done()  # the clock stops outside running()
    with budget.running():  # 100 -> 130: 70 s spent in all
        pass
    assert budget.done() and budget.progress() == pytest.approx(70 / 60)
    by_steps = train_cifar.Budget(total_steps=4)
    by_steps.steps = 3
    assert by_steps.progress() == 0.75 and not by_steps.done()


def test_time_budget_needs_the_cosine_schedule():
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--data", "D", "--out", "o.pt", "--time-budget", "10"])


@pytest.fixture(scope="module")
def tiny_image_folder(tmp_path_factory):
    """CIFAR-10 class folders with 3 random 32 x 32 JPEGs each, for train/ and test/."""
    root = tmp_path_factory.mktemp("cifar")
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for cls in models.class_names("cifar_vgg"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.jpg")
    return root


@pytest.mark.parametrize("name, cls, arch", MODERN, ids=[name for name, *_ in MODERN])
def test_train_cifar_writes_loadable_weights_to_out(tiny_image_folder, tmp_path, capsys,
                                                    name, cls, arch):
    shipped_before = models.embedded_weights_path(name).read_bytes()
    out = tmp_path / f"{name}.pt"
    train_args = models.EMBEDDED_MODELS[name].train_args.split()
    train_args[train_args.index("--time-budget") + 1] = "30"
    train_args[train_args.index("--epochs") + 1] = "2"
    threads = torch.get_num_threads()
    try:
        train_cifar.main(["--data", str(tiny_image_folder), "--out", str(out), *train_args,
                          "--batch-size", "16", "--seed", "1"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "epoch   2/2" in printed and "final test accuracy" in printed
    model = models.load(name, weights=out)
    assert isinstance(model, cls) and not model.training
    assert models.embedded_weights_path(name).read_bytes() == shipped_before
    # --evaluate reads the saved file back and finds the accuracy the training run printed
    final = float(printed.split("final test accuracy ")[1].split()[0])
    acc = train_cifar.main(["--data", str(tiny_image_folder), "--arch", arch, "--init", str(out),
                            "--evaluate", "--workers", "1"])
    assert f"{acc:.4f}" == f"{final:.4f}"
    assert f"test accuracy {final:.4f} on 30 images" in capsys.readouterr().out
