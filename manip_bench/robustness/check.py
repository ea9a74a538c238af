"""Run the manipulation attack on a recognised method and score how far its explanations move.

:func:`check_robustness` recognises the user's method (:mod:`.recognise`), runs
:class:`~manip_bench.attack.ManipulationAttack` on every input within an L-inf budget and
returns a :class:`~.report.RobustnessReport` whose score is the median per-sample
:func:`manipulability` (defined in :mod:`manip_bench.robustness`); :func:`check_folder`
does the same for a zoo model on a folder of images (``manip-bench check``).

Nothing of the user's is changed: the model is copied (by the attributors), the Captum
object and the composite are only read, and the random number generators of torch and
NumPy are restored afterwards (also on an interrupt).
"""
from pathlib import Path

import numpy as np
import torch

from .. import attributors, data, defences, heatmaps, manipulability, models
from ..attack import ManipulationAttack
from ..defaults import CHECK_ITERATIONS as DEFAULT_ITERATIONS  # attack iterations
from ..errors import ManipBenchError
from ..runtime import private_random_state
from ..threat import DEFAULT_BUDGET, Budget
from .recognise import SUPPORTED_CAPTUM, SUPPORTED_ZENNIT, recognise
from .report import RobustnessReport

#: default L-inf budget in pixel units (images in [0, 1])
DEFAULT_LINF = 8 / 255
_UNSET = object()


def _images(inputs, device):
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(inputs)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ManipBenchError("inputs must be one image tensor of shape (N, C, H, W) "
                              "(tuples of inputs are not supported)")
    x = inputs.detach().to(device=device, dtype=torch.float32)
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ManipBenchError(
            f"inputs must be images in [0, 1] (got values in [{x.min():.3g}, {x.max():.3g}]): the "
            f"L-inf budget is in pixel units. If your pipeline feeds normalised tensors, put the "
            f"normalisation into the model, e.g. nn.Sequential(manip_bench.models.cifar_vgg."
            f"Normalize(mean, std), model), and pass [0, 1] images")
    return x


def _classes(target, n, device):
    if target is None:
        return None
    target = torch.as_tensor(target, device=device).reshape(-1)
    if target.numel() == 1:
        target = target.expand(n)
    if target.numel() != n or target.is_floating_point():
        raise ManipBenchError(f"target must be an int or {n} class indices, "
                              f"got shape {tuple(target.shape)}")
    return target.long()


def _device(model):
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def check_robustness(explainer, inputs, target=None, *, model=None, target_map=None,
                     iterations=DEFAULT_ITERATIONS, budget=DEFAULT_BUDGET, linf=_UNSET, lr=None,
                     defence=None, seed=0, progress=None, **attribute_kwargs):
    """Attack the explanations of ``inputs`` and report how far they can be manipulated.

    Parameters
    ----------
    explainer : captum Attribution, zennit Composite or str
        The user's own Captum object (``Saliency(model)``, ``InputXGradient``,
        ``IntegratedGradients``, ``GuidedBackprop``, ``NoiseTunnel(Saliency(model))``,
        ``GradientShap``, ``LRP``), a built-in Zennit composite (``EpsilonPlusFlat``,
        ``EpsilonPlus``, ``EpsilonAlpha2Beta1``, ``EpsilonGammaBox``) with ``model=``, or a
        registry name with ``model=``. See :func:`recognise`. DeepLift and Deconvolution
        are recognised but cannot be attacked here: a :class:`ManipBenchError` says why.
    inputs : torch.Tensor or numpy.ndarray
        Images ``(N, C, H, W)`` in [0, 1] (the model normalises inside).
    target : int or sequence of int, optional
        As in Captum's ``attribute()``. The attack keeps the model's prediction, so it
        explains the predicted class; inputs predicted as another class than ``target``
        are skipped and listed in ``report.skipped``.
    model : torch.nn.Module, optional
        With a composite or a registry name.
    target_map : torch.Tensor, optional
        ``(H, W)`` or ``(N, H, W)`` heatmap(s) to steer toward. Default: input ``i`` is
        steered toward the explanation of input ``(i + 1) mod N`` (N >= 2 needed).
    iterations : int
        Attack steps of the default budget-tied, self-tuning attack.
    budget : str or Budget
        The threat model (:class:`manip_bench.threat.Budget`): ``"8/255"`` (default, L-inf
        in [0, 1] pixel units), ``"l2:0.5"``, ``"none"``.
    linf : float or None, optional
        Shorthand for ``budget="linf:<linf>"`` (None: unbounded).
    lr : float, optional
        Use the paper's fixed-rate Adam with this step (pixel units) instead of the
        self-tuning schedule.
    defence : str or manip_bench.defences.BetaSmoothing, optional
        Also assess the explanation under this defence (``"beta=2"``: the beta-smoothed
        model, any method), reported in ``report.smoothed``: what the defence buys.
    seed : int or None
        Seeds torch and NumPy inside the check (the caller's random state is restored).
    progress : None, bool or callable
        ``None`` (default): a progress bar with an ETA when standard error is a terminal,
        nothing when piped or under pytest; ``False``: never; see
        :func:`manip_bench.progress.reporter`. A warning says when the first iteration
        predicts a run of several minutes.
    **attribute_kwargs
        The arguments the user passes to Captum's ``attribute()`` (``abs=``, ``n_steps=``,
        ``method=``, ``baselines=`` (zero only), ``nt_type=`` ('smoothgrad' only),
        ``nt_samples=``, ``stdevs=``, ``n_samples=``); with a registry name: its options.

    Returns
    -------
    RobustnessReport
        ``print(report)`` shows tables, ``report.score`` is the manipulability in [0, 1]
        (see :mod:`manip_bench.robustness`), ``report.to_dict()`` everything as plain data.
    """
    method = recognise(explainer, model, **attribute_kwargs)
    cls = attributors.get_class(method.name)
    if not cls.attackable:
        raise ManipBenchError(
            f"{method.source} cannot be assessed: {cls.not_attackable_reason}, so no gradient "
            f"attack can run on it (this is no evidence that it is robust). Supported: "
            f"{', '.join(SUPPORTED_CAPTUM)}; zennit {', '.join(SUPPORTED_ZENNIT)}")
    if method.target is not None:  # pytorch-grad-cam's targets=[ClassifierOutputTarget(c)]
        if target is not None and list(_classes(target, len(method.target), "cpu").tolist()) \
                != list(method.target):
            raise ManipBenchError("target= and the CAM's targets= name different classes; "
                                  "give one of them")
        target = method.target
    defence = defences.parse(defence)
    device = _device(method.model)
    x = _images(inputs, device)
    if linf is not _UNSET:
        budget = Budget("linf", linf) if linf else Budget("none")
    attack_options = dict(iterations=int(iterations), budget=Budget.parse(budget).to_json(),
                          **({"schedule": "adam", "lr": lr} if lr is not None else {}))
    with private_random_state(seed, device):
        explain = method.create()
        explain.num_classes(x)  # a wrong size: one clear error, no attack
        with torch.no_grad():
            predicted = explain.model(x).argmax(1)
        classes = _classes(target, x.shape[0], device)
        skipped = {} if classes is None else {
            i: f"predicted class {int(p)} is not target {int(t)}"
            for i, (p, t) in enumerate(zip(predicted, classes)) if p != t}
        keep = [i for i in range(x.shape[0]) if i not in skipped]
        if not keep:
            raise ManipBenchError("no input is predicted as its target class; the attack keeps "
                                  "the prediction, so it explains the predicted class "
                                  "(pass target=None)")
        if target_map is None and len(keep) < 2:
            raise ManipBenchError("the default targets are the other inputs' explanations: pass "
                                  "at least 2 inputs (predicted as their target), or a target_map")
        maps = _target_maps(target_map, keep, x.shape[0])
        run = dict(method=method, x=x, keep=keep, target_map=maps, options=attack_options,
                   progress=progress, seed=seed, skipped=skipped)
        report = _assess(explain, **run)
        if defence is not None:
            report.smoothed = _assess(method.create(defence), **run, defence=defence)
            pairs = zip(report.smoothed.per_sample["class"], report.per_sample["class"])
            agrees = [a == b for a, b in pairs]
            report.smoothed.per_sample["same_class_as_unsmoothed"] = agrees
            report.smoothed.agreement = float(np.mean(agrees))
    return report


def check_folder(folder, model="cifar_vgg", weights="default", method="captum.saliency", n=8,
                 seed=0, device="cpu", **options):
    """:func:`check_robustness` of a zoo model on ``n`` images of a folder (``manip-bench check``).

    ``model`` is a zoo name (:func:`manip_bench.models.available`), ``weights`` as for
    :func:`manip_bench.models.load` (e.g. a checkpoint path), ``method`` a registry name.
    ``n`` images are drawn with ``seed`` by :func:`manip_bench.data.image_files` (all of
    them if the folder has no more) and resized to the model's input size. ``options`` go
    to :func:`check_robustness`.
    """
    net = models.load(model, weights, device)
    paths = data.image_files(folder)
    if n is not None and n < len(paths):
        paths = data.image_files(folder, n=n, seed=seed)
    x = data.load_batch(paths, models.input_size(model)).to(device)
    report = check_robustness(method, x, model=net, seed=seed, **options)
    for part in (report, report.smoothed):
        if part is not None:
            part.names = [Path(path).name for path in paths]
    return report


def _target_maps(target_map, keep, n):
    if target_map is None:
        return None
    target_map = torch.as_tensor(target_map)
    if target_map.dim() == 3 and target_map.shape[0] == n:
        return target_map[keep]
    if target_map.dim() == 2:
        return target_map
    raise ManipBenchError(f"target_map must have shape (H, W) or ({n}, H, W), "
                          f"got {tuple(target_map.shape)}")


def _assess(explain, method, x, keep, target_map, options, progress, seed, skipped,
            defence=None):
    attack = ManipulationAttack(method.model, explain, progress=progress, **options)
    x = x[keep]
    if target_map is None:
        targets = attack.target_maps(x.roll(-1, 0))
        sources = [keep[(k + 1) % len(keep)] for k in range(len(keep))]
    else:
        targets = heatmaps.prepare_target(target_map.to(x.device), x.shape[0], x.shape[2:])
        sources = ["given"] * len(keep)
    result = attack(x, targets)
    m = result.metrics
    per_sample = {
        "input": list(keep), "target": sources, "class": result.original_class.tolist(),
        "target_pcc_before": m["expl_target_pcc_before"], "target_pcc": m["expl_target_pcc"],
        "target_ssim": m["expl_target_ssim"], "original_pcc": m["expl_original_pcc"],
        "original_ssim": m["expl_original_ssim"], "input_linf": m["input_linf"],
        "input_ssim": m["input_ssim"], "output_mse": m["output_mse"],
        "prob_before": m["prob_before"], "prob_after": m["prob_after"],
        "class_kept": m["class_kept"],
    }
    per_sample["already_similar"] = manipulability.already_similar(m)
    per_sample["manipulability"] = manipulability.per_sample(m)
    return RobustnessReport(
        method=method.name, source=method.source, options=method.options,
        defence=defences.spec_of(defence), budget={"iterations": result.iterations,
                                                 **result.describe()},
        seed=seed, per_sample=per_sample,
        score=manipulability.median(per_sample["manipulability"]), skipped=dict(skipped),
        seconds=result.seconds, result=result)


__all__ = ["DEFAULT_ITERATIONS", "DEFAULT_LINF", "check_folder", "check_robustness"]
