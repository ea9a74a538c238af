"""Residual networks written the ways users write them, and hand-canonized twins.

Each ``*Net`` is a small CIFAR-style ResNet as found in user code; its ``Twin`` computes the
same function with every residual addition written as a Zennit ``Sum`` module and batch
norm merged into the preceding convolution by hand, so stock Zennit explains it properly.
"""
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from zennit.canonizers import MergeBatchNorm
from zennit.layer import Sum


class ShiftScale(nn.Module):
    """A user's own input normalisation: ``x * scale + shift`` (not manip-bench's class)."""

    def __init__(self, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3)):
        super().__init__()
        self.register_buffer("scale", 1 / torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("shift", -torch.tensor(mean).view(1, -1, 1, 1) / torch.tensor(
            std).view(1, -1, 1, 1))

    def forward(self, x):
        return torch.addcmul(self.shift, x, self.scale)

    def bounds(self):
        return self.shift, self.shift + self.scale


def randomise_batch_norms(model, seed=0):
    """Give every batch norm non-trivial statistics, so merging it matters."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()


class PaddingBlock(nn.Module):
    """``F.relu`` calls, in-place ``+=`` and a zero-padding shortcut (no module)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def shortcut(self, x):
        if self.stride == 1 and not self.extra:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ModuleShortcutBlock(nn.Module):
    """``nn.ReLU`` modules, ``torch.add`` and a 1x1 convolution shortcut module."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(torch.add(self.body(x), self.shortcut(x)))


class SmallResNet(nn.Module):
    """normalisation -> stem conv/bn -> three stages of one block -> pool -> linear.

    The pooling is a function call (``F.adaptive_avg_pool2d``) unless ``pool_module``."""

    def __init__(self, block, normalize=True, widths=(4, 8, 8), classes=5, pool_module=False):
        super().__init__()
        self.normalize = ShiftScale() if normalize else nn.Identity()
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(block(cin, width, 1 if i == 0 else 2))
            cin = width
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool_module else partial(F.adaptive_avg_pool2d,
                                                                          output_size=1)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(self.normalize(x))))
        return self.fc(torch.flatten(self.pool(self.stages(x)), 1))


def twin(model):
    """A hand-canonized copy of ``model``: batch norms merged, additions through ``Sum``."""
    import copy
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        if isinstance(module, PaddingBlock):
            MergeBatchNorm.merge_batch_norm([module.conv1], module.bn1)
            MergeBatchNorm.merge_batch_norm([module.conv2], module.bn2)
            module.sum = Sum()
            module.forward = _padding_forward.__get__(module)
        elif isinstance(module, ModuleShortcutBlock):
            MergeBatchNorm.merge_batch_norm([module.body[0]], module.body[1])
            MergeBatchNorm.merge_batch_norm([module.body[3]], module.body[4])
            if len(module.shortcut):
                MergeBatchNorm.merge_batch_norm([module.shortcut[0]], module.shortcut[1])
            module.sum = Sum()
            module.forward = _shortcut_forward.__get__(module)
    MergeBatchNorm.merge_batch_norm([twin.conv], twin.bn)
    return twin


def _padding_forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(self.sum(torch.stack([out, self.shortcut(x)], dim=-1)))


def _shortcut_forward(self, x):
    return self.relu(self.sum(torch.stack([self.body(x), self.shortcut(x)], dim=-1)))
