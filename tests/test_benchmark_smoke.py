"""The benchmark suite's step functions run (once, tiny inputs), so `tox -e bench` cannot rot."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


steps = _load("steps")
ratios = _load("ratios")


@pytest.fixture(scope="module")
def setting():
    model = steps.load_model("cifar_vgg", "cpu")
    x, target, target_map = steps.make_batch("cifar_vgg", 2, "cpu")
    return model, x, target, target_map


def test_baselines_run(setting):
    model, x, target, target_map = setting
    assert steps.forward(model, x, target)().shape == (2, 10)
    assert steps.forward_backward(model, x, target)().shape == x.shape
    assert torch.isfinite(steps.raw_saliency(model, x, target_map)()).all()


@pytest.mark.parametrize("name", steps.attackable())
def test_attack_step_runs_and_moves_the_image(name, setting):
    model, x, _, target_map = setting
    step = steps.attack_step(model, name, x, target_map)
    loss = step()
    assert torch.isfinite(loss).all()
    assert not torch.equal(step.x_adv.detach(), x)
    assert step.x_adv.min() >= 0 and step.x_adv.max() <= 1


@pytest.mark.parametrize("name", sorted(steps.RAW_REFERENCES))
def test_raw_reference_gives_the_adapters_map(name, setting):
    """The raw-autograd references compute the adapters' maps (noisy ones: same work)."""
    model, x, _, target_map = setting
    step = steps.raw_step(model, name, x, target_map)
    adapter = step.attributor
    adapter.set_beta(10.0)
    step.explain.set_beta(10.0)
    torch.manual_seed(0)
    expected = adapter(x, torch.tensor([1, 2]))[1]
    torch.manual_seed(0)
    raw = step.explain(x.clone().requires_grad_(), torch.tensor([1, 2]))[1]
    assert raw.shape == expected.shape
    if name not in ("captum.smoothgrad", "captum.gradient_shap"):  # these draw other noise
        assert ((raw - expected).norm() / expected.norm()).item() <= 1e-4
    assert torch.isfinite(step()).all()


@pytest.mark.parametrize("name", ["zennit.epsilon_plus_flat", "captum.lrp"])
def test_zennit_stock_step_runs(name, setting):
    model, x, _, target_map = setting
    step = steps.attack_step(model, name, x, target_map, fast=False)
    assert step.explain.fast is False
    assert torch.isfinite(step()).all()


def test_ratio_table_from_a_benchmark_json(tmp_path):
    def bench(kind, method, batch, median):
        return {"stats": {"median": median}, "extra_info": {
            "kind": kind, "method": method, "model": "cifar_vgg", "batch": batch,
            "device": "cpu", "gpu": None, "cpu_count": 2, "threads": 1, "torch": "x",
            "peak_mib": 100.0}}

    data = {"machine_info": {"node": "here"}, "benchmarks": [
        bench("baseline", "forward_backward", 1, 0.01), bench("step", "captum.saliency", 1, 0.03),
        bench("raw", "captum.saliency", 1, 0.025), bench("baseline", "forward_backward", 16, 0.1),
        bench("step", "captum.saliency", 16, 0.24)]}
    path = tmp_path / "run.json"
    path.write_text(__import__("json").dumps(data))
    text = ratios.table(*ratios.load(path))
    assert "| captum.saliency | 30.0 ms | 3.00× | raw autograd | 2.50× | 1.20× | 2.00× | 100 |" in text


def test_reference_comparison_table(tmp_path):
    record = {"method": "zennit.paper_lrp", "model": "vgg16", "batch": 1,
              "where": "CPU, 2 threads, load average 0.10", "step_s": 1.51,
              "peak_mib": 2.5e9 / 2**20}
    path = tmp_path / "reference.jsonl"
    path.write_text(__import__("json").dumps(record) + "\n")
    text = ratios.reference_table(str(path))
    assert "| zennit.paper_lrp | 2 | 1.51 | 0.20× | 2.50 GB | 0.50× |" in text
