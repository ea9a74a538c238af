"""The embedded CIFAR-10 vision transformer: torchvision's ``VisionTransformer`` on [0, 1] images."""
from torch import nn

from .cifar_vgg import CIFAR10_MEAN, CIFAR10_STD, Normalize

#: torchvision ``VisionTransformer`` arguments of the embedded model (4 x 4 patches: 64 tokens)
CIFAR_VIT_CONFIG = dict(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                        hidden_dim=128, mlp_dim=256)


class CifarViT(nn.Module):
    """normalize -> ``torchvision.models.VisionTransformer`` (submodule ``net``).

    Parameters
    ----------
    num_classes : int
    head_std : float
        Standard deviation of the normal initialisation of the classification head.
    **config
        Overrides of :data:`CIFAR_VIT_CONFIG`.

    Notes
    -----
    ``net`` is torchvision's own class (``nn.MultiheadAttention`` inside), so its state_dict
    keys are torchvision's: a bare ``VisionTransformer`` state_dict loads with
    ``models.load("cifar_vit", weights=path)``. Torchvision initialises the head to zero,
    which makes every gradient of a randomly initialised model zero; here the head starts
    from small random weights instead (``weights="random"`` gives nonzero explanations).
    Input size is fixed at ``image_size`` (32). The shipped weights
    (``models.load("cifar_vit")``, 0.55 M parameters) were trained for 21 minutes on one
    shared CPU thread (0.69 epochs) and score 40.08 % on the 10,000 CIFAR-10 test images
    (docs/models.md).
    """

    def __init__(self, num_classes=10, head_std=0.01, **config):
        super().__init__()
        from torchvision.models import VisionTransformer  # torchvision imports in seconds

        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.net = VisionTransformer(num_classes=num_classes, **{**CIFAR_VIT_CONFIG, **config})
        nn.init.normal_(self.net.heads.head.weight, std=head_std)

    def forward(self, x):
        return self.net(self.normalize(x))
