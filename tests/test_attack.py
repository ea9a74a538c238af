"""The attack engine on the embedded, really trained CIFAR-10 model."""
import pytest
import torch

from manip_bench import ManipBenchError, attributors, data, metrics, models
from manip_bench.attack import PRESETS, ManipulationAttack, make_config


@pytest.fixture(scope="module")
def model():
    return models.load("cifar_vgg")


@pytest.fixture(scope="module")
def pair():
    x = torch.stack([data.load_image(name, 32) for name in ("chelsea", "astronaut")])
    x_target = torch.stack([data.load_image(name, 32) for name in ("coffee", "rocket")])
    return x, x_target


def initial_pcc(result):
    return metrics.map_similarity(result.original_map, result.target_map)["pcc"]


@pytest.mark.parametrize("name, options", [
    ("zennit.epsilon_plus_flat", dict(iterations=120, lr=1e-3)),
    ("captum.saliency", dict(iterations=120, lr=2e-3)),
])
def test_attack_moves_explanation_to_target_and_keeps_class(name, options, model, pair):
    x, x_target = pair
    attack = ManipulationAttack(model, name, **options)
    result = attack(x, attack.target_maps(x_target))
    before, after = initial_pcc(result), result.metrics["expl_target_pcc"]
    for b, a in zip(before, after):
        assert a > b + 0.25, (before, after)
    assert all(result.metrics["class_kept"])
    assert max(result.metrics["input_linf"]) < 0.35
    assert min(result.metrics["input_ssim"]) > 0.5
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    # the reported map is the one an unsuspecting user computes on the ReLU network
    relu_map = attack.evaluate(result.x_adv, result.original_class)[2]
    assert torch.allclose(relu_map, result.adversarial_map)
    assert attack.explain.activations == [] or all(a.beta is None for a in attack.explain.activations)


def test_samples_in_a_batch_are_independent(model, pair):
    x, x_target = pair
    attack = ManipulationAttack(model, "zennit.epsilon_plus_flat", iterations=15, lr=1e-3)
    targets = attack.target_maps(x_target)
    both = attack(x, targets).x_adv
    alone = attack(x[:1], targets[:1]).x_adv
    assert torch.allclose(both[:1], alone, atol=1e-5)


def test_linf_budget_is_respected(model, pair):
    x, x_target = pair
    attack = ManipulationAttack(model, "captum.saliency", iterations=20, lr=1e-2, linf=2 / 255)
    result = attack(x, attack.target_maps(x_target))
    assert (result.x_adv - x).abs().max() <= 2 / 255 + 1e-6


def test_best_so_far_never_worse_than_start(model, pair):
    """With an absurd step size the last iterate is garbage; the kept one is not."""
    x, x_target = pair
    attack = ManipulationAttack(model, "zennit.epsilon_plus_flat", iterations=10, lr=0.5)
    result = attack(x, attack.target_maps(x_target))
    assert all(result.metrics["class_kept"])


def test_beta_schedule_is_the_papers():
    attack = ManipulationAttack(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3),
                                                    torch.nn.ReLU(), torch.nn.Linear(3, 2)),
                                "captum.saliency", iterations=100)
    assert attack.beta(0) == pytest.approx(10.0)
    assert attack.beta(50) == pytest.approx(10 * 10 ** 0.5)
    assert attack.beta(99) == pytest.approx(10 * 10 ** 0.99)


def test_lrp_has_no_beta_and_smoothing_fixes_beta(model):
    assert ManipulationAttack(model, "zennit.epsilon").beta(5) is None
    smoothed = ManipulationAttack(model, "captum.saliency", smooth_beta=3.0)
    assert smoothed.beta(0) == smoothed.beta(1000) == 3.0


def test_total_relevance_preservation_rescales_target(model, pair):
    x, x_target = pair
    attack = ManipulationAttack(model, "zennit.epsilon_plus_flat", iterations=3,
                                preserve_total_relevance=True, weight_relevance=1.0)
    result = attack(x, attack.target_maps(x_target).abs())
    assert torch.allclose(result.target_map.sum((1, 2)), result.original_map.sum((1, 2)), rtol=1e-4)
    assert len(result.history["relevance"]) == 3


def test_presets_and_overrides():
    assert make_config("lrp").iterations == 1500
    assert make_config("cifar10").weight_expl / make_config("cifar10").weight_output == 1e5
    assert make_config("gradient", lr=0.1).lr == 0.1
    assert set(PRESETS) >= {"gradient", "integrated_gradients", "lrp", "cifar10"}
    with pytest.raises(ManipBenchError, match="unknown preset"):
        make_config("imagenet-fast")
    with pytest.raises(ManipBenchError, match="unknown attack option"):
        make_config("lrp", iteration=3)
    with pytest.raises(ManipBenchError, match="iterations must be"):
        make_config("lrp", iterations=0)


@pytest.mark.parametrize("name", ["captum.deconvolution", "captum.deeplift"])
def test_non_attackable_methods_are_refused(name, model):
    with pytest.raises(ManipBenchError, match="cannot be attacked"):
        ManipulationAttack(model, name)


def test_functional_relu_model_is_refused():
    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(12, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    attack = ManipulationAttack(Functional(), "captum.saliency", iterations=2)
    with pytest.raises(ManipBenchError, match="no nn.ReLU modules"):
        attack(torch.rand(1, 3, 2, 2), torch.rand(1, 2, 2))


def test_bad_images_and_target_maps(model):
    attack = ManipulationAttack(model, "zennit.epsilon", iterations=1)
    with pytest.raises(ManipBenchError, match=r"in \[0, 1\]"):
        attack(torch.rand(1, 3, 32, 32) * 255, torch.rand(1, 32, 32))
    with pytest.raises(ManipBenchError, match="target_map must have shape"):
        attack(torch.rand(2, 3, 32, 32), torch.rand(3, 32, 32))
    with pytest.raises(ManipBenchError, match="positive mass"):
        attack(torch.rand(1, 3, 32, 32), torch.zeros(1, 32, 32))


def test_model_unchanged_after_interrupted_attack(model, pair):
    x, x_target = pair
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = ManipulationAttack(model, "captum.saliency", iterations=50)
    targets = attack.target_maps(x_target)
    calls = {"n": 0}
    original = attack.explain.attribute

    def interrupt(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return original(*args)

    attack.explain.attribute = interrupt
    with pytest.raises(KeyboardInterrupt):
        attack(x, targets)
    assert all(a.beta is None for a in attack.explain.activations)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert isinstance(model.features[1], torch.nn.ReLU) and type(model.features[1]) is torch.nn.ReLU


def test_attack_accepts_an_attributor_instance(model, pair):
    x, x_target = pair
    explain = attributors.create("captum.integrated_gradients", model, steps=4)
    attack = ManipulationAttack(model, explain, iterations=2)
    assert attack.preset == "integrated_gradients"
    assert attack(x, attack.target_maps(x_target)).iterations == 2


@pytest.mark.parametrize("name", ["zennit.epsilon", "captum.saliency"])
def test_start_and_step_are_the_loop(name, model, pair):
    """The public start/step pair does what one attack run does, step by step."""
    x, x_target = pair
    attack = ManipulationAttack(model, name, iterations=4, lr=1e-3, linf=0.02)
    target_map = attack.target_maps(x_target)
    result = attack(x, target_map)
    state = attack.start(x, target_map)
    steps = [attack.step(state) for _ in range(4)]
    assert state.step == 4 == result.iterations
    assert [s.loss.mean().item() for s in steps] == pytest.approx(result.history["loss"], rel=1e-4)
    assert [s.beta for s in steps] == result.history["beta"]
    assert torch.equal(steps[0].x, x) and not torch.equal(state.x_adv, x)
    assert (state.x_adv - x).abs().max() <= 0.02 + 1e-6
