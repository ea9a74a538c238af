"""One attack step per attackable attributor, with its baselines and references, same run.

Each benchmark's ``extra_info`` says what it is (``kind``: baseline / step / raw / stock),
the method, model, batch, device (GPU name, CPU threads) and peak memory of one step.
``python benchmarks/ratios.py FILE.json`` divides every step by the forward+backward of
the same model and batch from the same run.
"""
import pytest

import steps

BASELINES = {"forward": steps.forward, "forward_backward": steps.forward_backward}


@pytest.mark.parametrize("baseline", ["forward", "forward_backward", "raw_saliency"])
def test_baseline(measure, model, inputs, batch, baseline):
    x, target, target_map = inputs
    if baseline == "raw_saliency":
        run = steps.raw_saliency(model, x, target_map)
    else:
        run = BASELINES[baseline](model, x, target)
    measure(run, "baseline", baseline, batch)


def test_attack_step(measure, model, inputs, batch, method):
    x, _, target_map = inputs
    measure(steps.attack_step(model, method, x, target_map), "step", method, batch)


def test_raw_step(measure, model, inputs, batch, method):
    """The Captum adapters' attack step with the explanation in plain autograd."""
    x, _, target_map = inputs
    measure(steps.raw_step(model, method, x, target_map), "raw", method, batch)


test_raw_step.methods = sorted(steps.RAW_REFERENCES)


def test_zennit_stock_step(measure, model, inputs, batch, method):
    """The Zennit attributors' attack step before the optimisations (Zennit's own hooks)."""
    x, _, target_map = inputs
    measure(steps.attack_step(model, method, x, target_map, fast=False), "stock", method, batch)


test_zennit_stock_step.methods = list(steps.ZENNIT)
