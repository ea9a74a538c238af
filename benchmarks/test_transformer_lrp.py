"""Attack steps on ViT-B/16 at 224x224 (random weights) and their baselines.

One attack step of ``lrp.attnlrp`` / ``lrp.cp_lrp`` and of ``captum.saliency`` (attention
under double backprop, through the math kernel) -- explain -> loss -> backward -> Adam
step -> projection, :class:`steps.AttackStep` -- beside the forward and the
forward+backward of the same model and image; each benchmark's ``extra_info`` has the
fields ``benchmarks/ratios.py`` reads, so it prints the step ÷ forward+backward ratio::

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_transformer_lrp.py \\
        --bench-threads 1 --bench-rounds 2 --bench-warmup 1 \\
        --benchmark-timer time.process_time --benchmark-json benchmarks/results/vit-cpu.json
    python benchmarks/ratios.py benchmarks/results/vit-cpu.json

torchvision initialises the classification head to zeros (every map would be zero), so
it is re-initialised (normal, std 0.1) as in the tests.
"""
import os
import platform

import pytest
import torch
from torch import nn

import steps

MODEL, SIZE, BATCH = "vit_b_16", 224, 1
NAMES = ["lrp.attnlrp", "lrp.cp_lrp", "captum.saliency"]


@pytest.fixture(scope="module")
def vit(device, request):
    from torchvision.models import vit_b_16

    threads = request.config.getoption("--bench-threads")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = vit_b_16(weights=None)
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model.eval().to(device)


@pytest.fixture(scope="module")
def vit_inputs(device):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, SIZE, SIZE, generator=generator)
    target_map = torch.rand(BATCH, SIZE, SIZE, generator=generator)
    return x.to(device), torch.tensor([1] * BATCH, device=device), target_map.to(device)


def timed(benchmark, request, device, run, kind, method):
    """Time ``run`` (pedantic, as the other suites) and record what ratios.py reads."""
    cuda = device.type == "cuda"
    rounds = request.config.getoption("--bench-rounds") or (5 if cuda else 3)
    warmup = request.config.getoption("--bench-warmup")
    benchmark.extra_info.update(
        kind=kind, method=method, model=MODEL, batch=BATCH, input_size=SIZE,
        device=device.type, gpu=torch.cuda.get_device_name(device) if cuda else None,
        cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark.pedantic(steps.synchronized(run, device), rounds=rounds, iterations=1,
                       warmup_rounds=(2 if cuda else 1) if warmup is None else warmup)


@pytest.mark.parametrize("baseline", ["forward", "forward_backward"])
def test_vit_baseline(benchmark, request, device, vit, vit_inputs, baseline):
    x, target, _ = vit_inputs
    run = {"forward": steps.forward, "forward_backward": steps.forward_backward}[baseline]
    timed(benchmark, request, device, run(vit, x, target), "baseline", baseline)


def test_vit_attack_step(benchmark, request, device, vit, vit_inputs, method):
    x, _, target_map = vit_inputs
    step = steps.AttackStep(vit, method, x, target_map)
    timed(benchmark, request, device, step, "step", method)


test_vit_attack_step.methods = NAMES
