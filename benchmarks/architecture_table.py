"""Manipulability by architecture: one curve score per method x model, from bench folders.

Reads the ``results*.jsonl`` of ``manip-bench bench --budgets ...`` folders (no attack is
run) and prints Markdown: the manipulability score (normalised area under the median
per-pair manipulability over log2 budget, :mod:`manip_bench.manipulability`) of every method
on every model, then the median target PCC before -> after at 8/255 with its bootstrap 95 %
interval over pairs::

    python benchmarks/architecture_table.py bench-out/arch-gradient bench-out/arch-transformer
"""
import argparse
import math

import numpy as np

from manip_bench import bench, manipulability
import importlib

from manip_bench.bench.intervals import format_interval, median_interval
from manip_bench.errors import command

EIGHT = 8 / 255
#: the module (manip_bench.bench exports a function of the same name)
report_module = importlib.import_module("manip_bench.bench.report")


def load(folders):
    rows = [row for folder in folders for row in bench.read_results(folder)]
    return rows, report_module.curves(rows)


def method_of(label):
    return label.rsplit(" (", 1)[0]


def score_table(series, models):
    scores = {(model, method_of(label)): report_module.manipulability_score(points)
              for (model, label), points in series.items()}
    methods = sorted({m for _, m in scores}, key=lambda m: (m.startswith("lrp."), m))
    lines = ["| method | " + " | ".join(f"`{m}`" for m in models) + " |",
             "|---" * (len(models) + 1) + "|"]
    for method in methods:
        cells = [f"{scores[(model, method)]:.2f}" if (model, method) in scores else "—"
                 for model in models]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return lines


def at_eight(rows, models):
    lines = ["| model | method | n | target PCC before | after | manipulability | class kept |",
             "|---|---|---|---|---|---|---|"]
    cells = {}
    for row in rows:
        if row.get("budget") and math.isclose(row["budget"]["eps"] or 0, EIGHT):
            cells.setdefault((row["model"], row["attributor"]), []).append(row)
    for model in models:
        for (m, method), group in sorted(cells.items()):
            if m != model:
                continue
            columns = manipulability.columns(group)
            before = np.array(columns[manipulability.BEFORE], dtype=float)
            after = np.array(columns[manipulability.AFTER], dtype=float)
            scores = np.array(manipulability.per_sample(columns), dtype=float)
            kept = int(sum(bool(k) for k in columns[manipulability.KEPT]))
            show = [format_interval(float(np.nanmedian(v)), median_interval(v[~np.isnan(v)]), 2)
                    for v in (before, after, scores)]
            lines.append(f"| `{model}` | `{method}` | {len(group)} | " + " | ".join(show)
                         + f" | {kept}/{len(group)} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="bench results folders")
    parser.add_argument("--models", default="cifar_vgg,cifar_resnet,cifar_convnext,cifar_vit")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    rows, series = load(args.folders)
    print("\n".join(score_table(series, models)))
    print()
    print("\n".join(at_eight(rows, models)))


if __name__ == "__main__":
    raise SystemExit(command(main))
