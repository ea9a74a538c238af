"""Untargeted top-k attack (Ghorbani et al. 2019) against random noise of the same size.

For each image, the top-k intersection (top 5 % of pixels) between the clean map and the map
after (a) the default attack with ``loss="topk"`` inside L-inf ``--budget`` and (b) uniform
random noise in [-budget, budget] and random-sign noise of exactly that L-inf norm, all in
the same run::

    python benchmarks/untargeted_topk.py --images ../shared/data/cifar10/test --n 20 \\
        --table docs/results/untargeted_topk.md
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from manip_bench import ManipulationAttack, data, metrics, models
from manip_bench.threat import Budget


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder / ImageFolder tree of images")
    parser.add_argument("--attributor", default="captum.saliency")
    parser.add_argument("--model", default="cifar_vgg")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--budget", default="8/255")
    parser.add_argument("--table", help="also write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    budget = Budget.parse(args.budget)
    model = models.load(args.model)
    paths = data.image_files(args.images, n=args.n, seed=args.seed)
    x = data.load_batch(paths, models.input_size(args.model))
    attack = ManipulationAttack(model, args.attributor, iterations=args.iterations, loss="topk",
                                budget=budget)
    result = attack(x)
    rows = {"attack (loss=topk)": result.metrics["expl_original_topk"]}
    for label, noise in (("uniform noise", (2 * torch.rand_like(x) - 1) * budget.eps),
                         ("random-sign noise", torch.randn_like(x).sign() * budget.eps)):
        noisy_map = attack.evaluate((x + noise).clamp(0, 1), result.original_class)[2]
        rows[label] = metrics.map_similarity(noisy_map, result.original_map)["topk"]
    kept = np.mean(result.metrics["class_kept"])
    lines = [f"Top-k intersection (top 5 % of pixels) with the clean map, `{args.attributor}` on "
             f"{args.model}, {len(paths)} images from `{args.images}` (seed {args.seed}), budget "
             f"{budget.label()}, {args.iterations} iterations; class kept by the attack: "
             f"{kept:.0%}; input SSIM median {np.median(result.metrics['input_ssim']):.3f}.", "",
             "| perturbation | median | 10th pct | 90th pct |", "|---|---|---|---|"]
    for label, values in rows.items():
        p50, p10, p90 = np.percentile(values, [50, 10, 90])
        lines.append(f"| {label} | {p50:.3f} | {p10:.3f} | {p90:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n")


if __name__ == "__main__":
    from manip_bench.errors import command  # the CLI's handling: one line, exit 2
    sys.exit(command(main))
