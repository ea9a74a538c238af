"""Markdown table of a ``manip-bench bench`` results folder, with each pair's start.

For every (model, method) of ``<folder>/results.jsonl``: the median target PCC the pairs
had before the attack (original image's map vs the target image's map, each for its own
predicted class, recomputed here), after it (from the results), the median gain, the
median input SSIM and how many pairs kept their class.

    python benchmarks/cam_table.py bench-out/cam
"""
import argparse
import collections
import json
from pathlib import Path

import numpy as np

from manip_bench import data, metrics, models
from manip_bench.attack import ManipulationAttack


def rows_of(folder):
    groups = collections.defaultdict(list)
    for line in (Path(folder) / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        groups[(record["model"], record["attributor"])].append(record)
    return groups


def table(folder):
    lines = ["| model | method | pairs | target PCC before | target PCC after | gain | "
             "input SSIM | class kept |", "|---|---|---|---|---|---|---|---|"]
    nets = {}
    for (model, name), records in sorted(rows_of(folder).items()):
        records.sort(key=lambda r: r["pair"])
        net = nets.setdefault(model, models.load(model))
        size = models.input_size(model)
        attack = ManipulationAttack(net, name)
        original = attack.target_maps(data.load_batch([r["original"] for r in records], size))
        target = attack.target_maps(data.load_batch([r["target"] for r in records], size))
        before = np.array(metrics.map_similarity(original, target)["pcc"])
        after = np.array([r["metrics"]["expl_target_pcc"] for r in records])
        ssim = np.median([r["metrics"]["input_ssim"] for r in records])
        kept = sum(r["metrics"]["class_kept"] for r in records)
        lines.append(f"| {model} | `{name}` | {len(records)} | {np.median(before):.3f} | "
                     f"{np.median(after):.3f} | {np.median(after - before):.3f} | {ssim:.3f} | "
                     f"{kept}/{len(records)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a bench results folder (holds results.jsonl)")
    print(table(parser.parse_args().folder))
