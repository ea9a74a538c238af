"""Metrics on hand-made inputs with known values."""
import math

import numpy as np

import pytest
import torch

from conftest import SHARED_DATA, requires_shared_data
from manip_bench import heatmaps, metrics


def test_identical_maps_are_perfectly_similar():
    a = torch.rand(2, 8, 8)
    result = metrics.map_similarity(a, a.clone())
    assert result["mse"] == [0.0, 0.0]
    assert result["ssim"] == pytest.approx([1.0, 1.0])
    assert result["pcc"] == pytest.approx([1.0, 1.0])
    assert result["spearman"] == pytest.approx([1.0, 1.0])
    assert result["topk"] == [1.0, 1.0]


def test_negated_map_has_pcc_minus_one_and_known_mse():
    a = torch.arange(16.0).view(1, 4, 4)
    b = 15 - a
    result = metrics.map_similarity(a, b)
    assert result["pcc"][0] == pytest.approx(-1.0)
    assert result["spearman"][0] == pytest.approx(-1.0)
    assert result["mse"][0] == pytest.approx(((a - b) ** 2).mean().item())
    assert result["topk"][0] == 0.0


def test_top_k_intersection_counts_shared_top_pixels():
    a = torch.zeros(1, 10, 10)
    b = torch.zeros(1, 10, 10)
    a.view(-1)[:5] = torch.arange(5.0, 10.0)       # top-5 of a: pixels 0..4
    b.view(-1)[3:8] = torch.arange(5.0, 10.0)      # top-5 of b: pixels 3..7
    assert metrics.top_k_intersection(a[0].numpy(), b[0].numpy(), fraction=0.05) == pytest.approx(2 / 5)


def test_constant_map_correlation_is_nan_not_an_error():
    result = metrics.map_similarity(torch.ones(1, 4, 4), torch.rand(1, 4, 4))
    assert math.isnan(result["pcc"][0]) and math.isnan(result["spearman"][0])


def test_image_similarity_norms():
    x = torch.zeros(1, 3, 8, 8)
    y = x.clone()
    y[0, 0, 0, 0] = 0.5
    y[0, 1, 2, 3] = -0.25
    result = metrics.image_similarity(y, x)
    assert result["linf"][0] == pytest.approx(0.5)
    assert result["l2"][0] == pytest.approx(math.sqrt(0.25 + 0.0625))
    assert result["mse"][0] == pytest.approx((0.25 + 0.0625) / (3 * 64))
    assert metrics.image_similarity(x, x)["ssim"][0] == pytest.approx(1.0)


def test_ssim_matches_scikit_image_directly():
    from skimage.metrics import structural_similarity
    a, b = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    expected = structural_similarity(a[0].double().numpy(), b[0].double().numpy(),
                                     data_range=1.0, channel_axis=0)
    assert metrics.image_similarity(a, b)["ssim"][0] == pytest.approx(expected)


def test_output_similarity_class_kept_and_probabilities():
    before = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    after = torch.tensor([[2.0, 0.0, 0.0], [4.0, 3.0, 0.0]])
    result = metrics.output_similarity(after, before)
    assert result["class_kept"] == [True, False]
    assert result["output_mse"][0] == 0.0
    assert result["prob_before"][1] == pytest.approx(before.softmax(1)[1, 1].item())
    assert result["prob_after"][1] == pytest.approx(after.softmax(1)[1, 1].item())


def test_summarize_takes_medians_and_kept_fraction():
    summary = metrics.summarize({"pcc": [0.1, 0.5, 0.9, float("nan")], "class_kept": [True, False]})
    assert summary == {"pcc": 0.5, "class_kept": 0.5}


def test_heatmap_sums_abs_over_channels_and_normalises():
    relevance = torch.tensor([[[[1.0, -2.0]], [[-3.0, 0.0]]]])  # (1, 2, 1, 2)
    assert torch.allclose(heatmaps.heatmap(relevance), torch.tensor([[[4 / 6, 2 / 6]]]))
    assert torch.allclose(heatmaps.heatmap(relevance, signed=True), torch.tensor([[[-2.0, -2.0]]]))


def test_rescale_total_matches_reference_sum():
    target, reference = torch.rand(2, 4, 4), torch.rand(2, 4, 4) * 3
    rescaled = heatmaps.rescale_total(target, reference)
    assert torch.allclose(rescaled.sum((1, 2)), reference.sum((1, 2)))


def test_prepare_target_resizes_and_normalises():
    target = heatmaps.prepare_target(torch.rand(8, 8), batch=2, size=(4, 4))
    assert target.shape == (2, 4, 4)
    assert torch.allclose(target.sum((1, 2)), torch.ones(2))


class _LinearOnPixels(torch.nn.Module):
    """Two classes; logit 1 is a weighted sum of pixels, logit 0 is 0."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def forward(self, x):
        score = (x.sum(1) * self.weights).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_deletion_curve_removes_the_top_pixels_first_and_matches_a_hand_computation():
    weights = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    model = _LinearOnPixels(weights)
    x = torch.ones(1, 3, 2, 2) / 3  # every pixel's channels sum to 1: logit = sum of weights left
    target = torch.tensor([1])
    curve = metrics.deletion_curve(model, x, weights[None], target, steps=4)
    logits = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0])  # removing 4, then 3, 2, 1
    assert torch.allclose(curve[0], torch.sigmoid(logits), atol=1e-6)
    reverse = metrics.deletion_curve(model, x, -weights[None], target, steps=4)
    assert torch.allclose(reverse[0], torch.sigmoid(torch.tensor([10.0, 9.0, 7.0, 4.0, 0.0])))
    expected = np.trapezoid(torch.sigmoid(logits).double().numpy(), dx=0.25)
    score = metrics.deletion_score(model, x, weights[None], target, steps=4)
    assert score == pytest.approx([expected])
    assert score[0] < metrics.deletion_score(model, x, -weights[None], target, steps=4)[0]


@requires_shared_data("cifar10", "test")
def test_deletion_gap_ranks_a_true_map_above_a_random_one_on_a_trained_model():
    from manip_bench import attributors, data, models
    from manip_bench.bench import sample_pairs
    model = models.load("cifar_vgg")
    pairs = sample_pairs(SHARED_DATA / "cifar10" / "test", 20, seed=0)
    x = data.load_batch([original for original, _ in pairs], 32)
    target = model(x).argmax(1)
    _, relevance = attributors.create("zennit.epsilon_plus_flat", model)(x, target)
    heatmap = heatmaps.heatmap(relevance.detach())
    random = torch.rand(heatmap.shape, generator=torch.Generator().manual_seed(0))
    true_gap = metrics.deletion_gap(model, x, heatmap, target)
    random_gap = metrics.deletion_gap(model, x, random, target)
    assert np.median(true_gap) > 0.03 and abs(np.median(random_gap)) < 0.02, (true_gap, random_gap)
