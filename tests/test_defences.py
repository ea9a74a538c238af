"""beta-smoothing as one model transform: every attackable method takes it, large beta = ReLU."""
import numpy as np
import pytest
import torch

from conftest import tiny_net
from manip_bench import ManipBenchError, attributors, defences, models

ATTACKABLE = list(attributors.GROUPS["all"])  # PatternAttribution included


def explain(name, model, x, target):
    options = {"steps": 4} if name == "captum.integrated_gradients" else {}
    torch.manual_seed(0)
    np.random.seed(0)
    return attributors.create(name, model, **options)(x, target)[1].detach()


@pytest.mark.parametrize("name", ATTACKABLE)
def test_every_method_takes_the_smoothed_model_and_large_beta_recovers_its_map(name):
    model, target = models.load("cifar_vgg"), torch.tensor([3, 5])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    relu = explain(name, model, x, target)
    large = explain(name, defences.beta_smooth(model, 1e4), x, target)
    small = explain(name, defences.beta_smooth(model, 1.0), x, target)
    if name != "captum.lrp":  # Captum's epsilon=1e-9 divides by pre-activations that
        # softplus lifts off zero: measured 4-20 % apart at beta 1e4 on this model
        assert (large - relu).norm() <= 5e-2 * relu.norm()
    assert (small - relu).norm() > 1e-2 * relu.norm()  # the defence changes the map
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks


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
    state = {k: v.clone() for k, v in model.state_dict().items()}
    defence = defences.parse("finetuned=cifar_vgg_robust")
    assert defence == defences.FineTuned("cifar_vgg_robust") and defence.spec == \
        "finetuned=cifar_vgg_robust" and defences.spec_of(defence) == defence.spec
    tuned = defences.apply(defence, model)
    robust = models.load("cifar_vgg_robust")
    assert all(torch.equal(v, robust.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
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
