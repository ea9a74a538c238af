"""Median target PCC per method for several results folders, on the pairs they share.

Each folder is one `bench` grid (e.g. the default attack on two models, or on one model
before and after a change); rows are matched by (original, target) image, so the medians
compare the same pairs::

    python benchmarks/model_comparison.py \\
        "VGG=bench-out/schedules/auto__captum.gradient_shap" \\
        "ResNet-20=bench-out/resnet/auto__captum.lrp" --table docs/results/grid_cifar_resnet.md
"""
import argparse
import os
import sys

import numpy as np

from manip_bench import bench

METRICS = ("expl_target_pcc", "input_ssim", "class_kept")


def load(folder):
    """``{(attributor, original, target): row}`` of a results folder (image paths resolved)."""
    return {(r["attributor"], os.path.realpath(r["original"]), os.path.realpath(r["target"])): r
            for r in bench.read_results(folder)}


def table(columns, metric="expl_target_pcc"):
    """Markdown: one row per method present in every folder, medians over shared pairs."""
    names = [label for label, _ in columns]
    rows = [rows for _, rows in columns]
    methods = sorted({key[0] for key in rows[0]}.intersection(*({k[0] for k in r} for r in rows)))
    lines = ["| method | pairs | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for method in methods:
        shared = set.intersection(*({k[1:] for k in r if k[0] == method} for r in rows))
        medians = [np.nanmedian([float(r[(method, *pair)][metric]) for pair in shared])
                   for r in rows]
        lines.append(f"| `{method}` | {len(shared)} | "
                     + " | ".join(f"{m:.3f}" for m in medians) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("columns", nargs="+", help="LABEL=FOLDER, one per column")
    parser.add_argument("--metric", default="expl_target_pcc", choices=METRICS)
    parser.add_argument("--table", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    columns = [(label, load(folder)) for label, folder in
               (column.split("=", 1) for column in args.columns)]
    text = table(columns, args.metric)
    print(text)
    if args.table:
        with open(args.table, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    from manip_bench.errors import command  # the CLI's handling: one line, exit 2
    sys.exit(command(main))
