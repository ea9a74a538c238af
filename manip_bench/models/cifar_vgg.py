"""The embedded CIFAR-10 classifier: a small VGG that takes [0, 1] images."""
from collections import OrderedDict

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# channels per conv layer, "M" = 2x2 max-pool (a VGG block boundary)
CIFAR_VGG_CONFIG = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, so a model can take images in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std

    def bounds(self):
        """Lowest and highest value a [0, 1] image takes after normalisation."""
        low = (-self.mean / self.std).min().item()
        high = ((1 - self.mean) / self.std).max().item()
        return low, high


class CifarVGG(nn.Module):
    """normalize -> features (conv/ReLU blocks, max-pool between) -> flatten -> classifier."""

    def __init__(self, config=CIFAR_VGG_CONFIG, num_classes=10, batch_norm=False):
        super().__init__()
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        layers, channels = [], 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(channels, item, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU())
            channels = item
        self.features = nn.Sequential(*layers)
        pools = sum(item == "M" for item in config)
        side = 32 // 2**pools
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(channels * side * side, 256),
            relu=nn.ReLU(),
            fc2=nn.Linear(256, num_classes),
        ))

    def forward(self, x):
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(x, 1))

    def shipped_patterns(self):
        """PatternAttribution's default (:mod:`manip_bench.attributors.pattern`): the patterns
        file shipped for this architecture and the weights file they were estimated for."""
        from . import CIFAR_VGG_PATTERNS, CIFAR_VGG_WEIGHTS  # the zoo's files, patchable there
        return CIFAR_VGG_PATTERNS, CIFAR_VGG_WEIGHTS


def fold_batch_norm(model):
    """Return a batch-norm-free ``CifarVGG`` computing the same function (eval mode)."""
    config = [m.out_channels if isinstance(m, nn.Conv2d) else "M"
              for m in model.features if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    folded = CifarVGG(config, model.classifier.fc2.out_features, batch_norm=False)
    folded.normalize.load_state_dict(model.normalize.state_dict())
    folded.classifier.load_state_dict(model.classifier.state_dict())
    convs = [m for m in folded.features if isinstance(m, nn.Conv2d)]
    source = list(model.features)
    with torch.no_grad():
        for conv in convs:
            index = next(i for i, m in enumerate(source) if isinstance(m, nn.Conv2d))
            original, bn = source[index], source[index + 1]
            source = source[index + 1:]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.copy_(original.weight * scale.view(-1, 1, 1, 1))
            bias = original.bias if original.bias is not None else torch.zeros_like(bn.bias)
            conv.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return folded.eval()
