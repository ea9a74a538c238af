"""Attack losses: values, registry, and gradients against finite differences (float64)."""
import pytest
import torch

from manip_bench import ManipBenchError, heatmaps, losses
from manip_bench.losses import Explanation, Reference


def explanation(relevance, output):
    return Explanation(output, relevance, heatmaps.heatmap(relevance))


@pytest.fixture
def reference():
    torch.manual_seed(0)
    relevance = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    target = heatmaps.normalize(torch.rand(2, 6, 6, dtype=torch.float64))
    return Reference(torch.randn(2, 4, dtype=torch.float64), relevance,
                     heatmaps.heatmap(relevance), target)


@pytest.mark.parametrize("loss", [
    losses.TargetMap(1.0), losses.OutputPreservation(1.0), losses.OutputPreservation(1.0, "logits"),
    losses.TotalRelevance(1.0), losses.TopK(1.0, fraction=0.1), losses.CenterOfMass(1.0),
])
def test_loss_gradients_match_finite_differences(loss, reference):
    torch.manual_seed(1)
    relevance = (reference.relevance + 0.3 * torch.randn_like(reference.relevance)).requires_grad_()
    output = (reference.output + 0.3 * torch.randn_like(reference.output)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda r, o: loss(explanation(r, o), reference), (relevance, output))


def test_loss_values(reference):
    same = explanation(reference.relevance, reference.output)
    assert torch.equal(losses.TargetMap(2.0)(same, reference),
                       2 * (reference.heatmap - reference.target_map).square().flatten(1).mean(1))
    assert losses.OutputPreservation()(same, reference).abs().max() == 0
    assert losses.TotalRelevance()(same, reference).abs().max() == 0
    # at the start the top-k mass is the largest it can be; the centre has not moved
    top = losses.TopK(fraction=0.1)
    uniform = explanation(torch.ones_like(reference.relevance), reference.output)
    assert (top(same, reference) > top(uniform, reference)).all()
    assert losses.CenterOfMass()(same, reference).abs().max() < 1e-12


def test_center_of_mass_of_a_point_and_its_shift_direction():
    maps = torch.zeros(1, 5, 7, dtype=torch.float64)
    maps[0, 1, 2] = 1.0
    assert losses.center_of_mass(maps).tolist() == [[1.0, 2.0]]
    reference = Reference(torch.zeros(1, 2), torch.zeros(1, 1, 5, 7), maps, None)
    moved = torch.zeros_like(maps)
    moved[0, 4, 6] = 1.0  # toward the farthest corner: the loss falls
    assert losses.CenterOfMass(1.0).value(Explanation(None, None, moved), reference) < 0


def test_registry_and_weights():
    assert {"target_map", "topk", "center_of_mass"} == set(losses.available(True))
    assert {"output", "total_relevance"} <= set(losses.available())
    assert losses.create("topk", fraction=0.2).fraction == 0.2
    assert losses.TargetMap().weight == 1e5 and losses.OutputPreservation().weight == 1.0
    assert losses.TopK(3.0).to_json() == {"name": "topk", "weight": 3.0, "fraction": 0.05}
    with pytest.raises(ManipBenchError, match="Did you mean 'topk'"):
        losses.get_class("top_k")
    with pytest.raises(ManipBenchError, match="fraction"):
        losses.TopK(fraction=2)
    with pytest.raises(ManipBenchError, match="weight"):
        losses.TargetMap(-1)
    with pytest.raises(ManipBenchError, match="unexpected keyword"):
        losses.create("target_map", fraction=0.1)


def test_a_custom_loss_registers_and_runs_in_the_attack():
    from manip_bench import ManipulationAttack

    @losses.register
    class Brightest(losses.Loss):
        """Push relevance onto the first pixel (a toy objective)."""

        name = "test_brightest"
        explanation = True

        def value(self, current, reference):
            return -current.heatmap[:, 0, 0]

    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
        attack = ManipulationAttack(model, "captum.saliency", iterations=5, loss="test_brightest")
        result = attack(torch.rand(2, 3, 6, 6))
        assert [loss["name"] for loss in result.losses] == ["test_brightest", "output"]
        assert (result.adversarial_map[:, 0, 0] >= result.original_map[:, 0, 0]).all()
    finally:
        del losses.LOSSES["test_brightest"]
