"""What a defence costs: clean accuracy, and how faithful the clean explanation stays.

For every method of a defence grid (:mod:`.defend`), on the grid's original images
(no attack):

- ``similarity``: PCC of the defended clean heatmap with the undefended one (the same
  attributor on the plain model; SmoothGrad is compared with the plain gradient);
- ``deletion_gap``: :func:`manip_bench.metrics.deletion_gap` of the defended clean heatmap,
  on the network that classifies under the defence (the user's own for β-smoothing and
  SmoothGrad, the fine-tuned one for :class:`~manip_bench.defences.FineTuned`); higher
  is more faithful, a random ranking gives about 0.

and per defence the test accuracy of the network the explanation is computed on, on a
labelled image folder (``root/<class>/*``, CIFAR-10 class names). Everything is kept in
``costs.json`` beside the results, recomputed when the grid or the data differ.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .. import data, defences, heatmaps, metrics, models
from ..attributors import create
from ..progress import interactive, reporter
from ..runtime import private_random_state
from .grid import CONFIG_NAME, method_of, parse_model
from .smooth import SMOOTHGRAD

COSTS_NAME = "costs.json"
#: the undefended counterpart of SmoothGrad (Theorem 2 of the paper relates the two)
SMOOTHGRAD_REFERENCE = "captum.saliency"


def _median(values):
    values = np.asarray(values, dtype=float)
    return float(np.nanmedian(values)) if np.isfinite(values).any() else float("nan")


def _heatmap(name, model, options, x, target, seed):
    with private_random_state(seed, x.device):  # SmoothGrad's noise: the same on every rerun
        _, relevance = create(name, model, **options)(x, target)
    return heatmaps.heatmap(relevance.detach())


ACCURACY_BATCH = 500


def _accuracy(model, images, labels, advance, batch_size=ACCURACY_BATCH):
    """Accuracy on uint8 ``images`` (N, 3, H, W) with class indices ``labels``;
    ``advance(accuracy=...)`` after every batch, with the accuracy so far."""
    from ..models.train_cifar import to_float
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            batch = to_float(images[start:start + batch_size]).to(device)
            correct += (model(batch).argmax(1).cpu() == labels[start:start + batch_size]).sum().item()
            advance(accuracy=correct / min(start + batch_size, len(labels)))
    return correct / len(labels)


def _labelled(folder):
    folder = Path(folder) if folder else None
    return folder is not None and folder.is_dir() and \
        {p.name for p in folder.iterdir() if p.is_dir()} >= {"airplane", "truck"}


def compute_costs(out, accuracy_data=None, device="cpu", steps=16, progress=None):
    """The costs of every method of the defence grid in ``out`` (see the module text);
    ``progress`` as in :func:`manip_bench.progress.reporter`."""
    config = json.loads((Path(out) / CONFIG_NAME).read_text())["grid"]
    name, weights = parse_model(config["models"][0])
    net = models.load(name, weights, device)
    originals = list(dict.fromkeys(original for original, _ in config["pairs"]))
    x = data.load_batch(originals, models.input_size(name)).to(device)
    with torch.no_grad():
        target = net(x).argmax(1)
    undefended, entries = {}, []
    with reporter(progress, "clean maps: similarity and deletion", len(config["methods"]),
                  gap=math.nan) as advance:
        for raw in config["methods"]:
            entries.append(_method_costs(method_of(raw), net, x, target, undefended,
                                         config["seed"], steps))
            advance(gap=entries[-1]["deletion_gap"])
    random_gap = metrics.deletion_gap(net, x, torch.rand(x.shape[0], *x.shape[2:],
                                      generator=torch.Generator().manual_seed(0)).to(device),
                                      target, steps)
    accuracy = {}
    if _labelled(accuracy_data):
        from ..models.train_cifar import load_image_folder
        if progress is True or (progress is None and interactive()):
            print(f"reading the labelled images of {accuracy_data} for the test accuracy ...",
                  file=sys.stderr, flush=True)
        images, labels = load_image_folder(str(accuracy_data), None, 0, 2)
        specs = list(dict.fromkeys(raw.get("defence") for raw in config["methods"]))
        batches = math.ceil(len(labels) / ACCURACY_BATCH)
        with reporter(progress, f"test accuracy ({len(labels)} images)", len(specs) * batches,
                      shorten="a smaller --accuracy-data folder shortens it",
                      accuracy=math.nan) as advance:
            accuracy = {str(spec): _accuracy(defences.apply(spec, net), images, labels, advance)
                        for spec in specs}
    return {"grid": config, "accuracy_data": str(accuracy_data) if accuracy else None,
            "steps": steps, "methods": entries, "random_deletion_gap": _median(random_gap),
            "accuracy": accuracy}


def _method_costs(method, net, x, target, undefended, seed, steps):
    """Similarity to the undefended map and deletion gap of one method's clean maps."""
    defence = defences.parse(method.defence)
    defended = defences.apply(defence, net)
    heatmap = _heatmap(method.attributor, defended, method.options, x, target, seed)
    reference = (SMOOTHGRAD_REFERENCE, {}) if method.attributor == SMOOTHGRAD \
        else (method.attributor, method.options)
    key = json.dumps(reference, sort_keys=True)
    if key not in undefended:
        undefended[key] = _heatmap(reference[0], net, reference[1], x, target, seed)
    classifier = net if defence is None else defence.classifier(net, defended)
    similarity = metrics.map_similarity(heatmap, undefended[key])["pcc"]
    gap = metrics.deletion_gap(classifier, x, heatmap, target, steps)
    return {**method.to_json(), "label": method.label(), "n": len(x),
            "similarity": _median(similarity), "deletion_gap": _median(gap)}


def costs(out, accuracy_data=None, device="cpu", progress=None):
    """``costs.json`` of ``out``, computed now if absent or made for another grid or data."""
    path = Path(out) / COSTS_NAME
    config = json.loads((Path(out) / CONFIG_NAME).read_text())["grid"]
    if path.exists():
        stored = json.loads(path.read_text())
        same_data = accuracy_data is None or stored.get("accuracy_data") == str(accuracy_data)
        if stored.get("grid") == config and same_data:
            return stored
    result = compute_costs(out, accuracy_data, device, progress=progress)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(result, indent=1))
    staging.replace(path)
    return result


__all__ = ["COSTS_NAME", "compute_costs", "costs"]
