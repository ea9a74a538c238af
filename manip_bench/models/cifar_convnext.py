"""The embedded CIFAR-10 ConvNeXt: depthwise 7x7 convolutions, LayerNorm, GELU, [0, 1] images."""
import torch
from torch import nn

from .cifar_vgg import CIFAR10_MEAN, CIFAR10_STD, Normalize

# channels and blocks per stage; the stem halves the side, each later stage halves it again
CIFAR_CONVNEXT_WIDTHS = (48, 96, 192)
CIFAR_CONVNEXT_DEPTHS = (2, 2, 2)


class ToChannelsLast(nn.Module):
    """``(N, C, H, W) -> (N, H, W, C)``, so ``nn.LayerNorm`` and ``nn.Linear`` act on channels."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    """``(N, H, W, C) -> (N, C, H, W)``."""

    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def channel_norm(channels):
    """LayerNorm over the channels of an ``(N, C, H, W)`` tensor, as a plain ``nn.LayerNorm``
    between two permutations."""
    return nn.Sequential(ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6), ToChannelsFirst())


class ConvNeXtBlock(nn.Module):
    """``x + gamma * pw2(GELU(pw1(LN(dwconv7x7(x)))))`` (Liu et al. 2022).

    Parameters
    ----------
    channels : int
    expansion : int
        Width of the hidden pointwise layer, as a multiple of ``channels``.
    layer_scale : float
        Initial value of the per-channel scale ``gamma`` of the residual branch.

    Notes
    -----
    The pointwise layers are ``nn.Linear`` on channels-last tensors (as in the reference
    implementation and torchvision's ``CNBlock``); each GELU is its own ``nn.GELU`` module.
    """

    def __init__(self, channels, expansion=4, layer_scale=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.to_last = ToChannelsLast()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pw1 = nn.Linear(channels, expansion * channels)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(expansion * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), float(layer_scale)))
        self.to_first = ToChannelsFirst()

    def forward(self, x):
        branch = self.pw2(self.act(self.pw1(self.norm(self.to_last(self.dwconv(x))))))
        return x + self.to_first(self.gamma * branch)


class CifarConvNeXt(nn.Module):
    """normalize -> patchify stem (2x2 conv, LN) -> stages of ConvNeXt blocks, joined by
    downsampling layers (LN, 2x2 stride-2 conv) -> global average pool -> LN -> fc.

    Parameters
    ----------
    widths, depths : tuple of int
        Channels and number of blocks of each stage.
    num_classes : int

    Notes
    -----
    Takes images in [0, 1] of shape ``(N, 3, H, W)`` (meant for 32 x 32: stages at 16, 8
    and 4 pixels) and normalises them with the CIFAR-10 mean and std in its first
    submodule ``normalize``. Nonlinearities: GELU only; normalisation: LayerNorm only.
    The shipped weights (``models.load("cifar_convnext")``, 0.91 M parameters) were trained
    for 21 minutes on one shared CPU thread (0.77 epochs) and score 38.16 % on the 10,000
    CIFAR-10 test images (docs/models.md).
    """

    def __init__(self, widths=CIFAR_CONVNEXT_WIDTHS, depths=CIFAR_CONVNEXT_DEPTHS, num_classes=10):
        super().__init__()
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 2, stride=2), channel_norm(widths[0]))
        stages, channels = [], widths[0]
        for index, (width, depth) in enumerate(zip(widths, depths)):
            layers = []
            if index > 0:
                layers += [channel_norm(channels), nn.Conv2d(channels, width, 2, stride=2)]
            layers += [ConvNeXtBlock(width) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_norm = nn.LayerNorm(channels, eps=1e-6)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.stages(self.stem(self.normalize(x)))
        return self.fc(self.head_norm(torch.flatten(self.pool(x), 1)))
