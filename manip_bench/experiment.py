"""One manipulation experiment end to end: load, attack, write results (``manip-bench run``)."""
import json
import shutil
from pathlib import Path

import torch

from . import data, defences, models
from .attack import DEFAULT_PRESET, ManipulationAttack
from .bench.intervals import ONE_PAIR
from .errors import ManipBenchError
from .figures import overview_figure
from .runtime import (fresh_out_dir, move_into_place, pick_device, pick_threads,
                      private_random_state, staging_folder, versions)

#: result.json metric keys that are a public contract
CONTRACT_METRICS = ("expl_target_pcc", "expl_target_ssim", "expl_target_mse", "expl_original_pcc",
                    "input_ssim", "input_mse", "input_linf", "output_mse", "class_kept")


def read_record(out):
    """The ``result.json`` of a run folder, as a dict."""
    return json.loads((Path(out) / "result.json").read_text())


def run(attributor="zennit.epsilon", model="cifar_vgg", weights="default", image=None,
        target_image=None, target_map=None, preset=DEFAULT_PRESET, device="auto", seed=0,
        out=None, threads=None, progress=None, defence=None, **overrides):
    """Attack one image's explanation (toward a target) and write the results to ``out``.

    The target is the explanation of ``target_image`` (default: a bundled photo) or, with
    ``target_map``, any grayscale image used as the heatmap; an untargeted loss
    (``loss="topk"``, ``"center_of_mass"``) takes neither. Files are written to a
    temporary folder first and moved into place at the end, so a failed or interrupted
    run leaves nothing half-written. ``defence`` (``"beta=2"``, a
    :class:`~manip_bench.defences.BetaSmoothing`) attacks the defended model's explanation.
    Returns ``(AttackResult, output folder)``.
    """
    out = fresh_out_dir(out)
    defence = defences.parse(defence)
    device = pick_device(device)
    size = models.input_size(model)
    threads = pick_threads(device, size, threads)
    with private_random_state(seed, device):
        net = defences.apply(defence, models.load(model, weights, device))
        x = data.load_image(image or data.DEFAULT_IMAGE, size)[None].to(device)
        attack = ManipulationAttack(net, attributor, preset=preset, progress=progress,
                                    **overrides)
        if not attack.targeted:
            if target_map is not None or target_image is not None:
                raise ManipBenchError(f"loss {attack.config.loss!r} is untargeted: give no "
                                      f"target image or target map")
            target, target_x, target_source = None, None, None
        elif target_map is not None:
            target, target_x = data.load_target_map(target_map, size)[None].to(device), None
            target_source = str(target_map)
        else:
            target_source = target_image or data.DEFAULT_TARGET_IMAGE
            target_x = data.load_image(target_source, size)
            target = attack.target_maps(target_x[None].to(device))
        result = attack(x, target)

    staging = staging_folder(out)
    try:
        classes = models.class_names(model)
        record = {
            "attributor": result.attributor, "model": model, "weights": str(weights),
            "image": str(image or data.DEFAULT_IMAGE),
            ("target_map" if target_map is not None else "target_image"): target_source,
            "preset": attack.preset, "config": result.config.to_json(), **result.describe(),
            "defence": defences.spec_of(defence), "iterations": result.iterations,
            "seconds": round(result.seconds, 3), "device": str(device), "threads": threads,
            "seed": seed, "original_class": classes[int(result.original_class[0])],
            "metrics": {key: values[0] for key, values in result.metrics.items()},
            "stability": ONE_PAIR, "versions": versions(),
        }
        (staging / "result.json").write_text(json.dumps(record, indent=2))
        data.save_image(result.x_adv[0], staging / "manipulated.png")
        torch.save(result.x_adv.cpu(), staging / "manipulated.pt")
        overview_figure(result, staging / "overview.png", target_image=target_x)
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result, out
