"""Class activation maps (Grad-CAM and its family), differentiable in the input.

A CAM weighs the activation ``A`` of one layer (``N, C, h, w``) with the gradient ``G`` of
the target logit w.r.t. that activation and upsamples the result to the image. Here ``G``
is computed with ``create_graph=True``, so a loss on the map can be differentiated in
``x`` (on a ReLU network through the attack's softplus surrogate, as for every gradient
method). The adapters reproduce two stock libraries, one small class per method:

- Captum's layer methods (``LayerGradCam``, ``GuidedGradCam``,
  ``LayerGradientXActivation``, ``LayerIntegratedGradients``): their layer-resolution map,
  upsampled as Captum's ``LayerAttribution.interpolate`` does (``F.interpolate``, ``"nearest"`` by default);
- pytorch-grad-cam (``GradCAM``, ``GradCAMPlusPlus``, ``XGradCAM``, ``HiResCAM``,
  ``LayerCAM``, ``ScoreCAM``, ``EigenCAM``): its numpy/OpenCV post-processing
  (ReLU, min-max scaling per image, ``cv2.resize`` bilinear, mean over target layers,
  min-max again) rewritten in torch with the same arithmetic, and its
  ``reshape_transform`` (ViT tokens -> grid) applied to activation and gradient alike.

The relevance an adapter returns is the map the user sees, at image size; the last
layer-resolution map stays available as ``low_resolution``. The layer is given as a
module of the caller's model, a dotted name, or left out: then the last module whose
output is a spatial map (more than one pixel) is used, found by one forward pass, and
named in ``layer_name``. pytorch-grad-cam itself is not needed to run these adapters.
"""
import collections
import contextlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ManipBenchError
from .base import Attributor, input_with_grad, one_hot, rule_active
from .captum import integration_points

#: pytorch-grad-cam's constants: min-max scaling, GradCAM++ and XGradCAM denominators,
#: ScoreCAM's mask scaling
_SCALE_EPS, _PLUSPLUS_EPS, _XGRAD_EPS, _SCORE_EPS = 1e-7, 1e-6, 1e-7, 1e-8


def layer_names(model, layer):
    """Dotted names in ``model`` of ``layer``: a module of it, a dotted name, or a list of these."""
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise ManipBenchError("give at least one layer (a module of the model or its dotted name)")
    by_module = {id(module): name for name, module in model.named_modules()}
    names = []
    for item in layers:
        if isinstance(item, nn.Module):
            if id(item) not in by_module:
                raise ManipBenchError(f"layer {type(item).__name__} is not a module of the model; "
                                      f"pass a module of the model you explain, or its dotted name")
            names.append(by_module[id(item)])
        elif isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError as error:
                raise ManipBenchError(f"the model has no layer named {item!r}; see "
                                      f"[name for name, _ in model.named_modules()]") from error
            names.append(item)
        else:
            raise ManipBenchError(f"a layer must be a module or a dotted name, got "
                                  f"{type(item).__name__}")
    return names


@contextlib.contextmanager
def _replaced_output(module, replacement):
    """Make ``module`` return ``replacement`` instead of its output while the block runs."""
    handle = module.register_forward_hook(lambda m, args, output: replacement)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _recorded(modules):
    """Record ``(name, output)`` of the named ``modules`` in the order their calls finish."""
    calls = []
    handles = [module.register_forward_hook(
        lambda m, args, output, name=name: calls.append((name, output)))
        for name, module in modules.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def last_feature_map(model, x):
    """Name of the module of ``model`` that last finishes with a spatial map for input ``x``.

    A spatial map is a 4-D tensor with more than one pixel; modules that run more than once
    (a ReLU shared within a block) are skipped. For VGG-like nets this is the feature
    extractor's output, for torchvision's ResNets ``layer4``: the map before global pooling.
    """
    modules = {name: module for name, module in model.named_modules() if name}
    with _recorded(modules) as calls, torch.no_grad():
        model(x[:1].detach())
    runs = collections.Counter(name for name, _ in calls)
    spatial = [name for name, out in calls if runs[name] == 1 and isinstance(out, torch.Tensor)
               and out.dim() == 4 and out.shape[2] * out.shape[3] > 1]
    if not spatial:
        raise ManipBenchError("found no layer with a spatial output (N, C, h, w) to take the CAM "
                              "of; give layer= (and reshape_transform= for token models)")
    return spatial[-1]


def drop_grad_cam_hooks(model):
    """Remove from ``model`` (a private copy) the forward hooks a pytorch-grad-cam object
    installed on the original: copied along, they would record every activation of the
    attack into a copy of that object's lists and hook every gradient."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            owner = type(getattr(hook, "__self__", None)).__module__
            if owner.split(".")[0] == "pytorch_grad_cam":
                del module._forward_hooks[key]


def min_max(maps):
    """pytorch-grad-cam's ``scale_cam_image`` scaling: ``(m - min) / (1e-7 + max)`` per map."""
    flat = maps.flatten(1)
    shifted = maps - flat.min(1).values.view(-1, *[1] * (maps.dim() - 1))
    top = shifted.flatten(1).max(1).values.view(-1, *[1] * (maps.dim() - 1))
    return shifted / (_SCALE_EPS + top)


def resize_bilinear(maps, size):
    """(N, h, w) -> (N, H, W) as ``cv2.resize(..., INTER_LINEAR)`` (half-pixel centres)."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


class CamAttributor(Attributor):
    """A map from one layer's activation and the target logit's gradient there.

    Parameters
    ----------
    model : torch.nn.Module
    layer : nn.Module, str or list of these, optional
        The layer (a module of ``model`` or its dotted name; pytorch-grad-cam adapters
        also take a list, as its ``target_layers``). Default: found by behaviour
        (:func:`last_feature_map`) on the first call, then kept.
    """

    needs_softplus = True
    uses_gradient = True
    #: at most one layer (Captum's methods take one)
    single_layer = True

    def __init__(self, model, layer=None):
        super().__init__(model)
        drop_grad_cam_hooks(self.model)
        self.layer_names = None if layer is None else layer_names(model, layer)
        if self.layer_names is not None and self.single_layer and len(self.layer_names) > 1:
            raise ManipBenchError(f"{self.name}: takes one layer, got {len(self.layer_names)}")
        #: the last call's map at the layer's resolution (detached), (N, 1 or C, h, w)
        self.low_resolution = None

    @property
    def layer_name(self):
        """Dotted name of the layer (layers joined by ','), None until found by behaviour."""
        return None if self.layer_names is None else ",".join(self.layer_names)

    def record(self, x, target):
        """``output``, per layer the activation and the target logit's gradient (graph kept)."""
        if self.layer_names is None:
            self.layer_names = [last_feature_map(self.model, x)]
        modules = {name: self.model.get_submodule(name) for name in self.layer_names}
        with torch.enable_grad():
            with _recorded(modules) as calls:
                output = self.model(x)
            acts = []
            for name in self.layer_names:
                outs = [out for key, out in calls if key == name]
                if len(outs) != 1 or not isinstance(outs[0], torch.Tensor):
                    raise ManipBenchError(
                        f"{self.name}: layer {name!r} ran {len(outs)} time(s) in one forward "
                        f"pass or returned no single tensor; pick a layer that runs once and "
                        f"returns one tensor")
                acts.append(outs[0])
            grads = [None] * len(acts)
            if self.uses_gradient:
                score = (output * one_hot(target, output)).sum()
                grads = list(torch.autograd.grad(score, acts, create_graph=True,
                                                 allow_unused=True))
                if any(g is None for g in grads):
                    raise ManipBenchError(f"{self.name}: the model's output does not depend on "
                                          f"layer {self.layer_name!r}; pick a layer it uses")
        return output, acts, grads

    def attribute(self, x, target):
        x = input_with_grad(x)
        output, acts, grads = self.record(x, target)
        relevance = self.relevance(x, target, output, acts, grads)
        return output, relevance

    def relevance(self, x, target, output, acts, grads):
        """The upsampled map (N, 1 or C, H, W) from the recorded layer(s)."""
        raise NotImplementedError


# --- Captum's layer methods -------------------------------------------------------------

class CaptumLayerAttributor(CamAttributor):
    """Captum layer method: its layer map upsampled by ``F.interpolate(..., interpolate_mode)``.

    ``interpolate_mode``: as in Captum's ``LayerAttribution.interpolate`` (``"nearest"``,
    Captum's default, or ``"bilinear"``, ``"area"`` ...).
    """

    library = "captum"

    def __init__(self, model, layer=None, interpolate_mode="nearest"):
        super().__init__(model, layer)
        self.interpolate_mode = interpolate_mode

    def layer_map(self, activation, gradient):
        """Captum's ``attribute()`` output at the layer, from activation and gradient."""
        raise NotImplementedError

    def upsample(self, low, size):
        return F.interpolate(low, tuple(size), mode=self.interpolate_mode)

    def relevance(self, x, target, output, acts, grads):
        low = self.layer_map(acts[0], grads[0])
        self.low_resolution = low.detach()
        return self.upsample(low, x.shape[2:])


class LayerGradCam(CaptumLayerAttributor):
    """Captum's ``LayerGradCam``: channel-mean gradient times activation, summed over channels.

    ``relu_attributions``: as Captum's (default False: the signed map).
    """

    name, rule = "captum.layer_gradcam", "Grad-CAM"

    def __init__(self, model, layer=None, relu_attributions=False, interpolate_mode="nearest"):
        super().__init__(model, layer, interpolate_mode)
        self.relu_attributions = bool(relu_attributions)

    def layer_map(self, activation, gradient):
        weights = gradient.mean(dim=tuple(range(2, gradient.dim())), keepdim=True)
        cam = (weights * activation).sum(1, keepdim=True)
        return F.relu(cam) if self.relu_attributions else cam


class GuidedGradCam(LayerGradCam):
    """Captum's ``GuidedGradCam``: guided backprop times the upsampled ReLU'd Grad-CAM."""

    name, rule = "captum.guided_gradcam", "guided Grad-CAM"

    def __init__(self, model, layer=None, interpolate_mode="nearest"):
        super().__init__(model, layer, True, interpolate_mode)
        for activation in self.activations:
            activation.backward_rule = "guided"

    def relevance(self, x, target, output, acts, grads):
        cam = super().relevance(x, target, output, acts, grads)
        with torch.enable_grad(), rule_active(self.activations):
            (guided,) = torch.autograd.grad(output, x, one_hot(target, output), create_graph=True)
        return guided * cam


class LayerGradientXActivation(CaptumLayerAttributor):
    """Captum's ``LayerGradientXActivation``: gradient times activation per channel."""

    name, rule = "captum.layer_gradient_x_activation", "layer gradient x activation"

    def layer_map(self, activation, gradient):
        return gradient * activation


class LayerIntegratedGradients(CaptumLayerAttributor):
    """Captum's ``LayerIntegratedGradients`` from a zero-image baseline, graph kept.

    The layer's activation is integrated along the straight line from its value at the
    black image to its value at ``x`` (``steps`` points of Captum's ``method``), the
    network after the layer fed with each point, as Captum does; ``steps`` forward passes
    per explanation.
    """

    name, rule = "captum.layer_integrated_gradients", "layer integrated gradients"
    uses_gradient = False  # its gradients are taken at the path's points, below
    preset = "integrated_gradients"

    def __init__(self, model, layer=None, steps=50, method="gausslegendre",
                 interpolate_mode="nearest"):
        super().__init__(model, layer, interpolate_mode)
        self.step_sizes, self.alphas = integration_points(self.name, method, steps)

    def layer_map(self, activation, gradient):
        return gradient * activation  # gradient: the path integral, activation: the difference

    def relevance(self, x, target, output, acts, grads):
        layer = self.model.get_submodule(self.layer_names[0])
        with _recorded({"layer": layer}) as calls, torch.no_grad():
            self.model(torch.zeros_like(x))
        base = calls[0][1]
        difference = acts[0] - base
        steps = len(self.alphas)
        path = torch.cat([base + alpha * difference for alpha in self.alphas])
        with torch.enable_grad():
            with _replaced_output(layer, path):
                path_output = self.model(x.repeat(steps, *[1] * (x.dim() - 1)))
            score = (path_output * one_hot(target.repeat(steps), path_output)).sum()
            (gradient,) = torch.autograd.grad(score, path, create_graph=True)
        # Captum rounds the step sizes to float32 before weighting the gradients
        weights = torch.tensor(self.step_sizes).float().to(device=x.device, dtype=x.dtype)
        integral = (gradient.view(steps, *difference.shape)
                    * weights.view(-1, *[1] * difference.dim())).sum(0)
        low = self.layer_map(difference, integral)
        self.low_resolution = low.detach()
        return self.upsample(low, x.shape[2:])


# --- pytorch-grad-cam ---------------------------------------------------------------------

class GradCamAttributor(CamAttributor):
    """pytorch-grad-cam method: ``cam(A, G)`` per layer, then the library's post-processing.

    Parameters
    ----------
    model : torch.nn.Module
    layer : nn.Module, str or list of these, optional
        pytorch-grad-cam's ``target_layers`` (several: the mean of their scaled maps).
    reshape_transform : callable, optional
        pytorch-grad-cam's ``reshape_transform``, applied to the activation and its gradient
        (for ViTs: tokens -> (N, C, h, w) grid).
    """

    library = "pytorch-grad-cam"
    single_layer = False

    def __init__(self, model, layer=None, reshape_transform=None):
        super().__init__(model, layer)
        self.reshape_transform = reshape_transform

    def cam(self, x, target, activation, gradient):
        """The weighted activation summed over channels, (N, h, w), before the ReLU."""
        return (self.weights(activation, gradient)[:, :, None, None] * activation).sum(1)

    def weights(self, activation, gradient):
        """One weight per channel, (N, C)."""
        raise NotImplementedError

    def relevance(self, x, target, output, acts, grads):
        if self.reshape_transform is not None:
            acts = [self.reshape_transform(a) for a in acts]
            grads = [g if g is None else self.reshape_transform(g) for g in grads]
        for a in acts:
            if a.dim() != 4:
                raise ManipBenchError(
                    f"{self.name}: layer {self.layer_name!r} gives a {a.dim()}-D output; a CAM "
                    f"needs (N, C, h, w) (for token models pass reshape_transform=)")
        cams = [F.relu(self.cam(x, target, a, g)) for a, g in zip(acts, grads)]
        self.low_resolution = cams[0].detach()[:, None]
        scaled = [F.relu(resize_bilinear(min_max(c), x.shape[2:])) for c in cams]
        return min_max(torch.stack(scaled, 1).mean(1))[:, None]


def _spatial_sum(tensor):
    return tensor.sum(dim=(2, 3))


class GradCAM(GradCamAttributor):
    """pytorch-grad-cam ``GradCAM``: channel weights are the spatial mean of the gradient."""

    name, rule = "gradcam.gradcam", "Grad-CAM"

    def weights(self, activation, gradient):
        return gradient.mean(dim=(2, 3))


class GradCAMPlusPlus(GradCamAttributor):
    """pytorch-grad-cam ``GradCAMPlusPlus`` (second/third powers of the gradient)."""

    name, rule = "gradcam.gradcam_plus_plus", "Grad-CAM++"

    def weights(self, activation, gradient):
        square = gradient ** 2
        total = _spatial_sum(activation)[:, :, None, None]
        alpha = square / (2 * square + total * square * gradient + _PLUSPLUS_EPS)
        alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
        return _spatial_sum(F.relu(gradient) * alpha)


class XGradCAM(GradCamAttributor):
    """pytorch-grad-cam ``XGradCAM``: gradient weighted by the normalised activation."""

    name, rule = "gradcam.xgradcam", "XGrad-CAM"

    def weights(self, activation, gradient):
        total = _spatial_sum(activation)[:, :, None, None]
        return _spatial_sum(gradient * activation / (total + _XGRAD_EPS))


class HiResCAM(GradCamAttributor):
    """pytorch-grad-cam ``HiResCAM``: gradient times activation summed over channels."""

    name, rule = "gradcam.hirescam", "HiResCAM"

    def cam(self, x, target, activation, gradient):
        return (gradient * activation).sum(1)


class LayerCAM(GradCamAttributor):
    """pytorch-grad-cam ``LayerCAM``: positive gradient times activation, summed over channels."""

    name, rule = "gradcam.layercam", "LayerCAM"

    def cam(self, x, target, activation, gradient):
        return (F.relu(gradient) * activation).sum(1)


class ScoreCAM(GradCamAttributor):
    """pytorch-grad-cam ``ScoreCAM``: channel weights from the model's scores on masked inputs.

    Each channel, upsampled (bilinear, corners aligned) and min-max scaled, masks the input;
    the weights are the softmax over channels of the target logit on those masked inputs.
    No gradient in its definition, but the map is differentiable in ``x`` (masks and
    scores are); one forward pass per channel makes it ``C`` times as costly as Grad-CAM.
    ``batch_size``: masked images per forward pass (pytorch-grad-cam's default 16).
    """

    name, rule = "gradcam.scorecam", "Score-CAM"
    uses_gradient = False
    #: C forward passes per explanation: left out of the default groups (too slow for grids)
    in_default_groups = False

    def __init__(self, model, layer=None, reshape_transform=None, batch_size=16):
        super().__init__(model, layer, reshape_transform)
        self.batch_size = int(batch_size)

    def weights_for(self, x, target, activation):
        masks = F.interpolate(activation, size=x.shape[2:], mode="bilinear", align_corners=True)
        flat = masks.flatten(2)
        low, high = flat.min(2).values[..., None, None], flat.max(2).values[..., None, None]
        masks = (masks - low) / (high - low + _SCORE_EPS)
        masked = (x[:, None] * masks[:, :, None]).flatten(0, 1)
        rows = target.repeat_interleave(activation.shape[1])
        with torch.enable_grad():
            scores = torch.cat([
                self.model(chunk).gather(1, rows[i:i + len(chunk), None])[:, 0]
                for i, chunk in zip(range(0, len(masked), self.batch_size),
                                    masked.split(self.batch_size))])
        return scores.view(activation.shape[:2]).softmax(-1)

    def cam(self, x, target, activation, gradient):
        weights = self.weights_for(x, target, activation)
        return (weights[:, :, None, None] * activation).sum(1)


class EigenCAM(GradCamAttributor):
    """pytorch-grad-cam ``EigenCAM``: the first principal component of the activations.

    Explanation only. The component's sign is whatever the SVD solver (numpy's LAPACK)
    returns, and the map keeps its positive part: an arbitrarily small change of ``x`` can
    flip it to its complement, and torch's SVD does not promise numpy's sign, so no
    differentiable copy is guaranteed to show the user's map. It also ignores the target.
    """

    name, rule = "gradcam.eigencam", "Eigen-CAM"
    uses_gradient = False
    needs_softplus = False
    attackable = False
    not_attackable_reason = ("its map is the first principal component of the activations, "
                             "whose sign is set by the SVD solver's convention (it can flip "
                             "under an arbitrarily small change of x), so it has no derivative "
                             "that the library's map follows")

    def cam(self, x, target, activation, gradient):
        data = activation.detach().cpu().numpy()
        projections = []
        for sample in np.nan_to_num(data, nan=0.0):
            rows = sample.reshape(sample.shape[0], -1).T
            rows = rows - rows.mean(axis=0)
            _, _, vt = np.linalg.svd(rows, full_matrices=True)
            projections.append((rows @ vt[0]).reshape(sample.shape[1:]))
        return torch.from_numpy(np.float32(projections)).to(activation.device, activation.dtype)

    def attribute(self, x, target):
        output, relevance = super().attribute(x.detach(), target)
        return output.detach(), relevance.detach()


CLASSES = (LayerGradCam, GuidedGradCam, LayerGradientXActivation, LayerIntegratedGradients,
           GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, ScoreCAM, EigenCAM)
