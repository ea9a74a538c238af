"""The embedded CIFAR-10 residual network: a ResNet-20 with batch norm that takes [0, 1] images."""
import torch
from torch import nn

from .cifar_vgg import CIFAR10_MEAN, CIFAR10_STD, Normalize

# output channels per stage; each stage after the first halves the side length
CIFAR_RESNET_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, then ReLU.

    Parameters
    ----------
    in_channels, out_channels : int
    stride : int
        Stride of the first convolution (2 at the start of a downsampling stage).

    Notes
    -----
    The shortcut is a 1x1 convolution with batch norm when the shape changes and
    ``nn.Identity()`` otherwise. Every ReLU is its own ``nn.ReLU`` module (not in place),
    so gradient methods can swap them.
    """

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """normalize -> conv-BN-ReLU stem -> 3 stages of BasicBlocks -> global average pool -> fc.

    Parameters
    ----------
    blocks : int
        BasicBlocks per stage (3 gives ResNet-20).
    widths : tuple of int
        Output channels of the three stages.
    num_classes : int

    Notes
    -----
    Takes images in [0, 1] of shape ``(N, 3, H, W)`` (meant for 32 x 32) and normalises them
    with the CIFAR-10 mean and std in its first submodule ``normalize``.
    """

    def __init__(self, blocks=3, widths=CIFAR_RESNET_WIDTHS, num_classes=10):
        super().__init__()
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        channels, stages = widths[0], []
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(channels, width, stride if block == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def zero_init_residuals(model):
    """Set the last batch-norm scale of every block to zero (each block starts as identity)."""
    for module in model.modules():
        if isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)
    return model
