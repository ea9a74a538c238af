"""Does the default attack need per-method tuning? The default vs the paper presets' steps.

For every attackable method, the default budget-tied schedule (``preset="auto"``) is
compared with the method's paper preset (fixed-rate Adam) at 0.25x, 1x and 4x its step,
all inside the same budget (L-inf 8/255 unless ``--budget``) and with the same number of
iterations, on the same image pairs. Each setting is an ordinary resumable benchmark grid
under ``--out``; the script then prints and writes the comparison table::

    python benchmarks/schedule_comparison.py --pairs ../shared/data/cifar10/test \\
        --n 20 --iterations 100 --out bench-out/schedules --table docs/results/schedules.md

Rerunning the same command resumes where it stopped.
"""
import argparse
import sys
import math
from pathlib import Path

import numpy as np

from manip_bench import attributors, bench
from manip_bench.attack import PRESETS
from manip_bench.bench.report import _values

SCALES = (0.25, 1.0, 4.0)
TOLERANCE = 0.02


def settings(names):
    """``{setting: [(grid kwargs, method names)]}``: the default, and each preset step scale."""
    plans = {"auto": [({"preset": "auto"}, list(names))]}
    families = {}
    for name in names:
        families.setdefault(attributors.get_class(name).preset, []).append(name)
    for scale in SCALES:
        plans[f"paper x{scale:g}"] = [
            ({"preset": "paper", "lr": PRESETS[family]["lr"] * scale}, members)
            for family, members in families.items()]
    return plans


def run(args):
    names = bench.resolve_attributors(args.attributors)
    options = {name: {"steps": args.ig_steps} for name in names
               if name == "captum.integrated_gradients"}
    medians = {}
    chosen = settings(names)
    if args.settings:
        wanted = [w.strip() for w in args.settings.split(",")]
        chosen = {key: value for key, value in chosen.items() if key in wanted}
    for setting, plan in chosen.items():
        for kwargs, members in plan:
            folder = Path(args.out) / f"{setting.replace(' ', '_')}__{members[0]}"
            grid = bench.make_grid(members, args.model, args.pairs, args.n, args.seed,
                                   attributor_options={k: v for k, v in options.items()
                                                       if k in members},
                                   iterations=args.iterations, budget=args.budget, **kwargs)
            bench.run_grid(grid, folder, batch_size=args.batch_size, device="cpu",
                           threads=args.threads, progress=args.progress)
            rows = bench.read_results(folder)
            for name in members:
                values = _values([r for r in rows if r["attributor"] == name], "expl_target_pcc")
                medians[(name, setting)] = (float(np.nanmedian(values)), len(values))
    return names, medians


def table(names, medians, args):
    """Markdown: per method the median target PCC of each setting, and the verdict."""
    columns = ["auto", *(f"paper x{s:g}" for s in SCALES)]
    lines = [f"Median target PCC, {args.model}, {args.n} pairs from `{args.pairs}` (seed "
             f"{args.seed}), {args.iterations} iterations, budget {args.budget}; "
             f"`auto` must be >= the best paper step - {TOLERANCE}.", "",
             "| method | " + " | ".join(columns) + " | best paper | auto - best | holds |",
             "|---" * (len(columns) + 4) + "|"]
    held = 0
    for name in names:
        values = [medians.get((name, c), (math.nan, 0))[0] for c in columns]
        best = max(values[1:])
        holds = values[0] >= best - TOLERANCE
        held += holds
        lines.append(f"| `{name}` | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {best:.3f} | {values[0] - best:+.3f} | {'yes' if holds else 'NO'} |")
    lines += ["", f"holds for {held} of {len(names)} methods"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attributors", default="all")
    parser.add_argument("--model", default="cifar_vgg")
    parser.add_argument("--pairs", required=True, help="folder / ImageFolder tree / CSV of pairs")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--budget", default="8/255")
    parser.add_argument("--ig-steps", type=int, default=8,
                        help="integration steps of captum.integrated_gradients (all settings)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="folder for the grids (resumable)")
    parser.add_argument("--table", help="also write the markdown table here")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--settings", help="only these settings, comma-separated (auto, "
                                           "paper x0.25, paper x1, paper x4); default all")
    args = parser.parse_args(argv)
    names, medians = run(args)
    text = table(names, medians, args)
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n")


if __name__ == "__main__":
    from manip_bench.errors import command  # the CLI's handling: one line, exit 2
    sys.exit(command(main))
