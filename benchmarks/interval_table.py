"""A results folder as a Markdown table: every median with its bootstrap 95 % interval over pairs.

Reads only the folder's ``results*.jsonl`` (no attack is run), so a stored raw-results folder
can be re-reported with intervals at any time::

    python benchmarks/interval_table.py docs/results/bench-cifar_vgg \\
        --table docs/results/paper_presets_cifar_vgg.md
"""
import argparse
from pathlib import Path

from manip_bench import bench
from manip_bench.bench.intervals import LEVEL, format_interval

#: (summary key, column header, digits)
COLUMNS = (("expl_target_pcc", "target PCC", 2), ("expl_target_ssim", "target SSIM", 2),
           ("expl_original_pcc", "original-map PCC", 2), ("input_ssim", "input SSIM", 3),
           ("input_linf", "input L∞", 3))


def table(summary):
    """Markdown lines: one row per cell, ``median (low–high)`` per column."""
    lines = ["| method | n | " + " | ".join(header for _, header, _ in COLUMNS)
             + " | class kept | s / image |", "|---" * (len(COLUMNS) + 4) + "|"]
    for entry in summary:
        cells = [format_interval(entry.get(f"{key}_median", float("nan")),
                                 (entry.get(f"{key}_median_lo"), entry.get(f"{key}_median_hi")),
                                 digits) for key, _, digits in COLUMNS]
        kept = round(entry["class_kept_fraction"] * entry["n"])
        lines.append(f"| `{entry['label']}` | {entry['n']} | " + " | ".join(cells)
                     + f" | {kept}/{entry['n']} | {entry['seconds']:.1f} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a bench results folder")
    parser.add_argument("--table", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    lines = [f"Median ({LEVEL:.0%} bootstrap interval over pairs) per method, from the rows "
             f"in `{Path(args.folder).as_posix()}`.", "", *table(bench.summarize(
                 bench.read_results(args.folder)))]
    print("\n".join(lines))
    if args.table:
        Path(args.table).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
