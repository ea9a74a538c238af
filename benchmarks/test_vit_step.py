"""A Saliency attack step on torchvision's ViT-B/16 at 224x224 (random weights), with its
forward+backward baseline from the same run: attention under double backprop (math kernel).

    pytest benchmarks/test_vit_step.py --benchmark-json vit.json
    python benchmarks/ratios.py vit.json        # the step as a multiple of forward+backward

The goal is a step of at most 4x forward+backward.
"""
import pytest
import torch
import torchvision
from torch import nn

import steps


@pytest.fixture(scope="module")
def vit(device):
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16()
    nn.init.normal_(model.heads.head.weight, std=0.01)  # torchvision's head is zero
    return model.eval().to(device)


@pytest.fixture(scope="module")
def vit_inputs(device):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 224, 224, generator=generator).to(device)
    return x, torch.tensor([3], device=device), torch.rand(1, 224, 224, generator=generator).to(device)


@pytest.mark.parametrize("kind", ["forward_backward", "captum.saliency"])
def test_vit_b16_step(benchmark, device, vit, vit_inputs, kind):
    x, target, target_map = vit_inputs
    if kind == "forward_backward":
        run = steps.forward_backward(vit, x, target)
        info = {"kind": "baseline", "method": kind}
    else:
        run = steps.attack_step(vit, kind, x, target_map)
        info = {"kind": "step", "method": kind}
    benchmark.extra_info.update(info, model="vit_b_16", batch=1, input_size=224,
                                device=device.type, threads=torch.get_num_threads())
    benchmark.pedantic(steps.synchronized(run, device), rounds=2, warmup_rounds=1, iterations=1)
