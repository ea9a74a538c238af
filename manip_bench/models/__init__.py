"""The model zoo: ``available()``, ``load(name, weights, device)`` and facts about each model.

Every model returned by :func:`load` is in eval mode, takes images in [0, 1] of shape
``(N, 3, H, W)`` and normalises them itself. Torchvision models are wrapped as
``Sequential(normalize=Normalize(...), net=<torchvision model>)``; the embedded models
(:data:`EMBEDDED_MODELS`: :class:`~manip_bench.models.cifar_vgg.CifarVGG`, batch norm folded
away, :class:`~manip_bench.models.cifar_resnet.CifarResNet`, a ResNet-20 with batch norm,
:class:`~manip_bench.models.cifar_convnext.CifarConvNeXt`, a small ConvNeXt with LayerNorm
and GELU, and :class:`~manip_bench.models.cifar_vit.CifarViT`, torchvision's
``VisionTransformer`` with 4 x 4 patches) carry their own ``normalize`` and their weights
ship inside the package.
"""
import os
import pickle
from collections import OrderedDict, namedtuple
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .. import plugins
from ..defaults import DEFAULT_MODEL
from ..errors import ManipBenchError, unknown_name
from .cifar_convnext import CifarConvNeXt
from .cifar_resnet import CifarResNet
from .cifar_vgg import CIFAR10_CLASSES, CifarVGG, Normalize
from .cifar_vit import CifarViT

CIFAR_VGG_WEIGHTS = Path(__file__).with_name("cifar_vgg.pt")
#: PatternAttribution's patterns for CifarVGG with those weights (``CifarVGG.shipped_patterns``)
CIFAR_VGG_PATTERNS = Path(__file__).with_name("cifar_vgg_patterns.pt")
CIFAR_RESNET_WEIGHTS = Path(__file__).with_name("cifar_resnet.pt")
CIFAR_VGG_ROBUST_WEIGHTS = Path(__file__).with_name("cifar_vgg_robust.pt")
CIFAR_CONVNEXT_WEIGHTS = Path(__file__).with_name("cifar_convnext.pt")
CIFAR_VIT_WEIGHTS = Path(__file__).with_name("cifar_vit.pt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_MODELS = ("alexnet", "densenet121", "resnet18", "vgg16")

EmbeddedModel = namedtuple("EmbeddedModel", "build weights input_size classes dataset train_args")
EmbeddedModel.__doc__ = """An embedded model: its class, the module attribute naming its weights
file (looked up on every use, so it can be patched), input side, class names, training data
and the ``train_cifar`` arguments that retrain it."""

#: train_cifar options shared by the ConvNeXt and the ViT
_MODERN_TRAINING = (" --optimizer adamw --schedule cosine --lr 2e-3 --weight-decay 0.05"
                    " --batch-size 128 --epochs 10 --time-budget 1260 --eval-every 1"
                    " --threads 1 --workers 1 --device cpu")

#: name -> facts of each model whose weights ship inside the package
EMBEDDED_MODELS = {
    "cifar_vgg": EmbeddedModel(CifarVGG, "CIFAR_VGG_WEIGHTS", 32, CIFAR10_CLASSES, "CIFAR-10", ""),
    "cifar_resnet": EmbeddedModel(CifarResNet, "CIFAR_RESNET_WEIGHTS", 32, CIFAR10_CLASSES,
                                  "CIFAR-10", " --arch resnet"),
    # cifar_vgg fine-tuned with a penalty on the input Hessian (Dombrowski et al. 2022)
    "cifar_vgg_robust": EmbeddedModel(
        CifarVGG, "CIFAR_VGG_ROBUST_WEIGHTS", 32, CIFAR10_CLASSES, "CIFAR-10",
        " --init manip_bench/models/cifar_vgg.pt --epochs 2 --lr 0.005 --curvature-penalty 1e-5"
        " --curvature-beta 10 --clip-grad-norm 1 --threads 1 --workers 1 --device cpu"
        " --channels-last --eval-every 1"),
    # trained for a fixed wall-clock budget on one CPU thread: a rerun on another machine
    # gets as many steps as that machine manages in 21 minutes. Shipped: 38.16 % (ConvNeXt,
    # 0.77 epochs) and 40.08 % (ViT, 0.69 epochs) on the 10,000 test images (docs/models.md)
    "cifar_convnext": EmbeddedModel(CifarConvNeXt, "CIFAR_CONVNEXT_WEIGHTS", 32, CIFAR10_CLASSES,
                                    "CIFAR-10", " --arch convnext" + _MODERN_TRAINING),
    "cifar_vit": EmbeddedModel(CifarViT, "CIFAR_VIT_WEIGHTS", 32, CIFAR10_CLASSES, "CIFAR-10",
                               " --arch vit" + _MODERN_TRAINING),
}


#: name -> facts of each model added with :func:`register` (e.g. by a plugin)
REGISTERED_MODELS = {}


def register(name, input_size, classes, dataset="registered"):
    """Decorator: make ``build`` (a no-argument function returning a model in eval mode that
    takes [0, 1] images, with its trained weights) loadable as zoo model ``name``.

    Third-party packages call it from a module named by a ``manip_bench.plugins`` entry
    point (:mod:`manip_bench.plugins`); ``weights="random"`` or a path then work as for
    the embedded models.
    """
    def decorator(build):
        if name in EMBEDDED_MODELS or name in TORCHVISION_MODELS:
            raise ManipBenchError(f"model name {name!r} is taken by a built-in model")
        REGISTERED_MODELS[name] = EmbeddedModel(build, None, int(input_size), tuple(classes),
                                                dataset, "")
        return build
    return decorator


def _specs():
    """Embedded and registered models, by name."""
    plugins.load()
    return {**EMBEDDED_MODELS, **REGISTERED_MODELS}


def available():
    """Sorted list of model names (built-in and from installed plugins)."""
    return sorted((*_specs(), *TORCHVISION_MODELS))


def embedded_weights_path(name):
    """Path of the weights file shipped for embedded model ``name``."""
    return globals()[EMBEDDED_MODELS[name].weights]


def _check_name(name):
    if name not in available():
        raise unknown_name("model", name, available())
    return name


def _default_weights(name):
    """Torchvision's DEFAULT weights enum member for ``name`` (no download)."""
    import torchvision  # the model zoo costs seconds to import: only when a zoo model is used
    return torchvision.models.get_model_weights(name).DEFAULT


def cached_weights_path(name):
    """Where torch hub caches ``name``'s pretrained weights (it may not exist yet)."""
    url = _default_weights(_check_name(name)).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def input_size(name):
    """Side length in pixels of the square images the model is meant for."""
    if _check_name(name) in _specs():
        return _specs()[name].input_size
    return 224


def class_names(name):
    """The model's class names, in output order."""
    if _check_name(name) in _specs():
        return list(_specs()[name].classes)
    return list(_default_weights(name).meta["categories"])


def describe():
    """One row per model: name, input size, number of classes, where its weights come from."""
    rows = []
    for name in available():
        if name in REGISTERED_MODELS:
            source = f"registered ({REGISTERED_MODELS[name].dataset})"
        elif name in EMBEDDED_MODELS:
            weights_file = embedded_weights_path(name).name
            source = f"embedded ({weights_file}, {EMBEDDED_MODELS[name].dataset})"
        else:
            cached = "cached" if cached_weights_path(name).exists() else "downloads on first use"
            source = f"torchvision {_default_weights(name)} ({cached})"
        rows.append({"name": name, "input_size": input_size(name),
                     "classes": len(class_names(name)), "source": source})
    return rows


def load(name=DEFAULT_MODEL, weights="default", device="cpu"):
    """Build model ``name`` in eval mode, taking [0, 1] images and normalising inside.

    Parameters
    ----------
    name : str
        One of :func:`available`.
    weights : str or path
        ``"default"`` (embedded weights / torchvision's DEFAULT pretrained weights,
        downloaded once into torch hub's cache), ``"random"`` (random init: seed with
        ``torch.manual_seed`` before calling), or a path to a ``state_dict`` file of the
        bare architecture or of the model this function returns.
    device : str or torch.device
    """
    _check_name(name)
    embedded = _specs().get(name)
    if weights == "default" and name in REGISTERED_MODELS:
        model = embedded.build()
    elif weights == "default" and embedded is not None:
        path = embedded_weights_path(name)
        if not path.exists():
            raise ManipBenchError(
                f"embedded weights missing at {path}; reinstall manip-bench or train them "
                f"with python -m manip_bench.models.train_cifar{embedded.train_args}")
        model = embedded.build()
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    elif weights == "default":
        model = _wrap(_pretrained(name))
    elif name in REGISTERED_MODELS:
        model = embedded.build()
        if weights == "random":
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        else:
            _load_file(model, name, weights)
    else:
        if embedded:
            model = embedded.build()
        else:
            import torchvision
            model = _wrap(torchvision.models.get_model(name))
        if weights != "random":
            _load_file(model, name, weights)
    return model.to(device).eval()


def _wrap(net):
    return nn.Sequential(OrderedDict(normalize=Normalize(IMAGENET_MEAN, IMAGENET_STD), net=net))


def _pretrained(name):
    """Torchvision model with DEFAULT weights; a clear error when they cannot be downloaded."""
    import torchvision
    enum = _default_weights(name)
    path = cached_weights_path(name)
    try:  # torch hub reads a cached file and only goes to the network when there is none
        return torchvision.models.get_model(name, weights=enum)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as error:  # URLError: OSError
        if path.exists():  # the file is there: not a download problem
            raise ManipBenchError(
                f"cannot load the cached weights {path} ({type(error).__name__}: {error}); "
                f"delete the file to download it again") from error
        raise ManipBenchError(
            f"pretrained weights for {name} ({enum}) are not cached and could not be "
            f"downloaded ({type(error).__name__}: {error}). Run once with internet access, or "
            f"put {path.name} (from {enum.url}) into {path.parent}/, or use weights 'random' "
            f"(--weights random) or a local state_dict file.") from error


def _load_file(model, name, path):
    """Load a state_dict file into ``model`` (the wrapped model or its bare ``net``)."""
    if not Path(path).is_file():
        raise ManipBenchError(
            f"no such weights file {str(path)!r}; weights is 'default', 'random' or a path "
            f"to a state_dict file")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise ManipBenchError(
            f"{path}: cannot read it as a state_dict with torch.load(weights_only=True) "
            f"({type(error).__name__}); save one with torch.save(model.state_dict(), path)"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict):
        raise ManipBenchError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    if hasattr(model, "net"):  # bare torchvision keys live under "net."
        prefixed = {f"net.{key}": value for key, value in state.items()}
        if len(own.keys() & prefixed.keys()) > len(own.keys() & state.keys()):
            state = prefixed
    # a file without normalisation buffers keeps the model's own
    state = {**{k: v for k, v in own.items() if k.startswith("normalize.")}, **state}
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
              for key in own if key in state and hasattr(state[key], "shape")
              and state[key].shape != own[key].shape]
    if missing or unexpected or shapes:
        problems = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("wrong shapes (file vs model)", shapes)) if keys]
        raise ManipBenchError(
            f"{path}: weights do not match model {name!r} ({'; '.join(problems)}). Pass a "
            f"state_dict of the bare {name} architecture or of the model manip_bench.models.load "
            f"returns")
    model.load_state_dict(state)


__all__ = ["CIFAR_CONVNEXT_WEIGHTS", "CIFAR_RESNET_WEIGHTS", "CIFAR_VGG_PATTERNS",
           "CIFAR_VGG_ROBUST_WEIGHTS", "CIFAR_VGG_WEIGHTS", "CIFAR_VIT_WEIGHTS", "DEFAULT_MODEL",
           "EMBEDDED_MODELS", "REGISTERED_MODELS", "register",
           "IMAGENET_MEAN", "IMAGENET_STD", "TORCHVISION_MODELS", "available",
           "cached_weights_path", "class_names", "describe", "embedded_weights_path",
           "input_size", "load"]
