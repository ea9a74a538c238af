"""Sample-based maps in chunks of samples: same map and same attack gradient as all at once."""
import pytest
import torch

from conftest import tiny_net
from helpers import captum_reference, relative_error, seeded
from manip_bench import ManipBenchError, attributors, heatmaps
from manip_bench.attributors.captum import AUTO_CHUNK_VALUES, AUTO_WHOLE_VALUES

# (registry name, options, sample rows for a batch of 2)
SAMPLED = {
    "captum.integrated_gradients": ({"steps": 6}, 12),
    "captum.smoothgrad": ({"samples": 5, "stdev": 0.1}, 10),
    "captum.gradient_shap": ({"samples": 5, "stdev": 0.05}, 10),
}
# chunk sizes that divide the 10 or 12 rows, that do not, one row, more than all rows
CHUNKS = [1, 2, 3, 4, 5, 7, 64]


def attack_gradient(explain, x, target, target_map):
    """Map, and the input gradient of the attack's default loss (heatmap MSE + output MSE)."""
    x = x.clone().requires_grad_()
    output, relevance = seeded(lambda: explain(x, target))
    loss = (heatmaps.heatmap(relevance) - target_map).square().mean() * 1e3 \
        + output.softmax(1).square().mean()
    (gradient,) = torch.autograd.grad(loss, x)
    return relevance.detach(), gradient


def surrogate(name, model, **options):
    """The attributor on the attack's softplus surrogate at beta 5 (ReLU: no second derivative)."""
    explain = attributors.create(name, model, **options)
    explain.set_beta(5.0)
    return explain


@pytest.fixture
def setting():
    torch.manual_seed(2)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    target_map = heatmaps.normalize(torch.rand(2, 6, 6, dtype=torch.float64))
    return tiny_net(), x, torch.tensor([0, 2]), target_map


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_chunked_map_and_attack_gradient_equal_all_at_once(name, chunk, setting):
    model, x, target, target_map = setting
    options, _ = SAMPLED[name]
    whole = surrogate(name, model, internal_batch_size=None, **options)
    chunked = surrogate(name, model, internal_batch_size=chunk, **options)
    expected_map, expected_gradient = attack_gradient(whole, x, target, target_map)
    chunked_map, chunked_gradient = attack_gradient(chunked, x, target, target_map)
    assert expected_gradient.abs().sum() > 0
    assert relative_error(chunked_map, expected_map) <= 1e-6
    assert relative_error(chunked_gradient, expected_gradient) <= 1e-6


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_every_pass_takes_at_most_one_chunk(name, setting):
    model, x, target, target_map = setting
    options, rows = SAMPLED[name]
    explain = surrogate(name, model, internal_batch_size=3, **options)
    explain(x, target)  # the first call also runs the model once to count its classes
    passes = []
    handle = explain.model.register_forward_pre_hook(
        lambda module, inputs: passes.append(inputs[0].shape[0]))
    try:
        attack_gradient(explain, x, target, target_map)
    finally:
        handle.remove()
    passes.remove(2)  # the output for x itself, returned with the map
    assert max(passes) <= 3
    assert sum(passes) == 2 * rows  # each row once for the map, once in the backward


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_rows_that_fit_one_chunk_are_computed_in_one_pass(name, setting):
    """Chunking would only add work: the map keeps its graph, one pass over all rows."""
    model, x, target, _ = setting
    options, rows = SAMPLED[name]
    explain = surrogate(name, model, internal_batch_size=rows,
                                 **options)
    explain(x, target)
    passes = []
    handle = explain.model.register_forward_pre_hook(
        lambda module, inputs: passes.append(inputs[0].shape[0]))
    try:
        x_in = x.clone().requires_grad_()
        _, relevance = explain(x_in, target)
        torch.autograd.grad(relevance.square().sum(), x_in)
    finally:
        handle.remove()
    assert sorted(passes) == [2, rows]


#: options of the sample-based methods compared with Captum chunk by chunk
CAPTUM_OPTIONS = {
    "captum.integrated_gradients": {"steps": 7, "method": "riemann_trapezoid"},
    "captum.smoothgrad": {"samples": 4, "stdev": 0.1},
    "captum.gradient_shap": {"samples": 4, "stdev": 0.1},
}


@pytest.mark.parametrize("name", sorted(CAPTUM_OPTIONS))
def test_chunked_map_equals_captums_own(name, plain_cnn, images):
    """Same random draws in the same order as Captum: its map, chunk by chunk."""
    target = torch.tensor([0, 3, 1])
    expected = captum_reference(name, plain_cnn, images, target, **CAPTUM_OPTIONS[name])
    explain = attributors.create(name, plain_cnn, internal_batch_size=5, **CAPTUM_OPTIONS[name])
    relevance = seeded(lambda: explain(images, target)[1]).detach()
    assert relative_error(relevance, expected) <= 1e-5


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_output_keeps_its_graph(name, setting):
    """The engine's output-preservation term differentiates the output returned with the map."""
    model, x, target, _ = setting
    options, _ = SAMPLED[name]
    gradients = []
    for chunk in (None, 3):
        explain = surrogate(name, model, internal_batch_size=chunk,
                                     **options)
        x_in = x.clone().requires_grad_()
        output, _ = seeded(lambda: explain(x_in, target))
        gradients.append(torch.autograd.grad(output.square().sum(), x_in)[0])
    assert gradients[0].abs().sum() > 0
    assert relative_error(gradients[1], gradients[0]) <= 1e-12


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_backward_uses_the_beta_of_the_forward(name, setting):
    """Changing beta between explaining and differentiating does not change the derivative."""
    model, x, target, _ = setting
    options, _ = SAMPLED[name]
    explain = surrogate(name, model, internal_batch_size=4, **options)
    x_in = x.clone().requires_grad_()
    _, relevance = seeded(lambda: explain(x_in, target))
    explain.set_beta(50.0)
    (gradient,) = torch.autograd.grad(relevance.square().sum(), x_in)
    assert explain.activations[0].beta == 50.0
    reference_in = x.clone().requires_grad_()
    reference = surrogate(name, model, internal_batch_size=None,
                                   **options)
    _, reference_relevance = seeded(lambda: reference(reference_in, target))
    (reference_gradient,) = torch.autograd.grad(reference_relevance.square().sum(), reference_in)
    assert reference_gradient.abs().sum() > 0
    assert relative_error(gradient, reference_gradient) <= 1e-6


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_second_differentiation_equals_all_at_once(name, setting):
    """Hessian-vector product of a loss on the map (backward with create_graph=True)."""
    model, x, target, _ = setting
    options, _ = SAMPLED[name]
    vector = torch.rand_like(x)
    products = []
    for chunk in (None, 5):
        explain = surrogate(name, model, internal_batch_size=chunk,
                                     **options)
        x_in = x.clone().requires_grad_()
        _, relevance = seeded(lambda: explain(x_in, target))
        (gradient,) = torch.autograd.grad(relevance.square().sum(), x_in, create_graph=True)
        products.append(torch.autograd.grad((gradient * vector).sum(), x_in)[0])
    assert products[0].abs().sum() > 0
    assert relative_error(products[1], products[0]) <= 1e-6


def test_gradcheck_of_a_chunked_map(setting):
    model, x, target, _ = setting
    explain = surrogate("captum.gradient_shap", model,
                        internal_batch_size=3, samples=4, stdev=0.05)
    x = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: seeded(lambda: explain(x, target)[1]), (x,),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


def test_auto_chunks(plain_cnn):
    """Large images: one sample of each image per pass; small: all at once, or bigger chunks."""
    explain = attributors.create("captum.integrated_gradients", plain_cnn)
    assert explain.internal_batch_size == "auto"
    large = torch.zeros(2, 3, 224, 224)
    assert explain.chunked(large, 2 * 50) == 2
    assert explain.chunked(large, 2) is None  # one sample per image: nothing to split
    small = torch.zeros(16, 3, 32, 32)
    assert explain.chunked(small, AUTO_WHOLE_VALUES // 3072) is None
    assert explain.chunked(small, 16 * 50) == AUTO_CHUNK_VALUES // 3072
    assert attributors.options("captum.smoothgrad")["internal_batch_size"] == "auto"


@pytest.mark.parametrize("value", [0, -2, 2.5, "all", True])
def test_bad_internal_batch_size(value, plain_cnn):
    with pytest.raises(ManipBenchError, match="internal_batch_size must be"):
        attributors.create("captum.smoothgrad", plain_cnn, internal_batch_size=value)


def test_bad_integration_method(plain_cnn):
    with pytest.raises(ManipBenchError, match="cannot integrate with method='simpson'"):
        attributors.create("captum.integrated_gradients", plain_cnn, method="simpson")


def test_memory_benchmark_measures_each_step_in_a_fresh_process(tmp_path):
    """``benchmarks/memory.py``: one process per run, the step's own peak above its start."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "memory.py"
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(script), "--model", "cifar_vgg", "--device", "cpu",
                    "--run", "captum.smoothgrad:samples=3,internal_batch_size=1",
                    "--run", "captum.saliency", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    records = json.loads(out.read_text())["records"]
    assert [r["method"] for r in records] == ["captum.smoothgrad", "captum.saliency"]
    assert records[0]["options"] == {"samples": 3, "internal_batch_size": 1}
    for record in records:
        assert record["own_peak_mib"] > 0 and record["cpu_s"] > 0
        assert record["peak_mib"] > record["own_peak_mib"]
