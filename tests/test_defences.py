"""beta-smoothing as one model transform: every attackable method takes it, large beta = ReLU."""
import pytest
import torch

from conftest import tiny_net
from helpers import assert_unchanged, seeded, snapshot
from manip_bench import ManipBenchError, attributors, defences, models

ATTACKABLE = list(attributors.GROUPS["all"])  # PatternAttribution included
#: the beta at which a smoothed map is within 2 % of the ReLU map, where 1e4 is not enough.
#: Measured on the test's model and input at 1e4: gradient methods <= 1.2 % apart, Zennit's LRP
#: <= 6e-5, Captum's LRP 75 % (0.44 % at 1e6). Its epsilon of 1e-9 barely stabilises the
#: divisions by pre-activations; softplus lifts each activation by up to log(2)/beta, which
#: moves pre-activations near zero, and so their ratios, a lot (with epsilon 1e-3: 0.15 %).
LARGE_BETA = {"captum.lrp": 1e6}


def explain(name, model, x, target):
    options = {"steps": 4} if name == "captum.integrated_gradients" else {}
    return seeded(lambda: attributors.create(name, model, **options)(x, target)[1], 0).detach()


@pytest.mark.parametrize("name", ATTACKABLE)
def test_every_method_takes_the_smoothed_model_and_large_beta_recovers_its_map(name):
    model, target = models.load("cifar_vgg"), torch.tensor([3, 5])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    relu = explain(name, model, x, target)
    large = explain(name, defences.beta_smooth(model, LARGE_BETA.get(name, 1e4)), x, target)
    small = explain(name, defences.beta_smooth(model, 1.0), x, target)
    assert (large - relu).norm() <= 2e-2 * relu.norm()
    assert (small - relu).norm() > 1e-2 * relu.norm()  # the defence changes the map
    assert_unchanged(model, before)


def test_specs_round_trip_and_bad_values_are_refused():
    assert defences.spec_of("beta=2.0") == "beta=2" and defences.parse(None) is None
    assert defences.parse("beta=2") == defences.BetaSmoothing(2)
    for bad in ("beta=0", "beta=-1", "beta=x", "softplus=2"):
        with pytest.raises(ManipBenchError):
            defences.parse(bad)
    with pytest.raises(ManipBenchError, match="already beta-smoothed"):
        defences.beta_smooth(defences.beta_smooth(tiny_net(), 2), 3)


def test_fine_tuned_defence_swaps_in_the_zoo_weights_and_leaves_the_model_alone():
    model = models.load("cifar_vgg")
    before = snapshot(model)
    defence = defences.parse("finetuned=cifar_vgg_robust")
    assert defence == defences.FineTuned("cifar_vgg_robust") and defence.spec == \
        "finetuned=cifar_vgg_robust" and defences.spec_of(defence) == defence.spec
    tuned = defences.apply(defence, model)
    robust = models.load("cifar_vgg_robust")
    assert all(torch.equal(v, robust.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert_unchanged(model, before)
    assert defence.classifier(model, tuned) is tuned  # the fine-tuned network also classifies
    smoothed = defences.beta_smooth(model, 2)
    assert defences.BetaSmoothing(2).classifier(model, smoothed) is model  # only the map
    assert repr(defence) == "FineTuned('cifar_vgg_robust')" and defence != defences.BetaSmoothing(2)
    with pytest.raises(ManipBenchError, match="no such zoo model"):
        defences.parse("finetuned=nope")
    with pytest.raises(ManipBenchError, match="same architecture"):
        defences.apply("finetuned=cifar_vgg_robust", tiny_net())
    with pytest.raises(ManipBenchError, match="finetuned=<zoo model>"):
        defences.parse("trained=cifar_vgg_robust")


def test_a_sequential_model_gets_no_extra_layer_and_large_beta_recovers_it():
    """The smoothed copy's F.relu router must not be a child: nn.Sequential would run it
    on the logits (formerly softplus(logits): a dead class got a zero map)."""
    net = tiny_net()
    smoothed = defences.beta_smooth(net, 1e4)
    assert len(list(smoothed.children())) == len(list(net.children()))
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(smoothed(x), net(x), atol=1e-3)
        assert (net(x) < 0).any()  # negative logits, which a softplus on top would lift
    target = torch.tensor([0, 1, 2, 0])
    for name in ("captum.saliency", "zennit.epsilon", "captum.guided_backprop"):
        relu = explain(name, net, x, target)
        large = explain(name, smoothed, x, target)
        assert ((large - relu).flatten(1).norm(dim=1) <= 1e-3 * relu.flatten(1).norm(dim=1)).all()
