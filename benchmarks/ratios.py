"""Print the ratio table of a ``pytest benchmarks --benchmark-json FILE`` run (markdown).

Every time is a median over rounds; every ratio divides two medians of the same run:

* ``÷ f+b``: step ÷ forward+backward-to-input of the same model and batch;
* ``÷ ref``: Captum adapter ÷ its raw-autograd explanation; Zennit attributor (fast path)
  ÷ the same attributor through Zennit's own hooks (``fast=False``);
* ``b16 speed-up``: images per second at batch 16 ÷ at batch 1.

Usage: ``python benchmarks/ratios.py benchmarks/results/cuda-h100.json [more.json ...]``;
``python benchmarks/ratios.py benchmarks/results/reference-cpu-2core.jsonl`` divides
``attack_time.py --json`` records by the paper's reference implementation's time and memory.
"""
import argparse
import json
import sys
from collections import defaultdict


def load(path):
    """``{(model, batch): {(kind, method): benchmark}}`` and the run's description."""
    with open(path) as handle:
        data = json.load(handle)
    runs = defaultdict(dict)
    description = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "kind" not in info:
            continue
        runs[(info["model"], info["batch"])][(info["kind"], info["method"])] = bench
        description = {key: info.get(key) for key in
                       ("device", "gpu", "cpu", "cpu_count", "threads", "torch")}
    description["machine"] = data.get("machine_info", {}).get("node")
    return runs, description


def median(bench):
    return bench["stats"]["median"] if bench else None


def fmt_time(seconds):
    if seconds is None:
        return "–"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_ratio(value):
    return "–" if value is None else f"{value:.2f}×"


def ratio(a, b):
    return a / b if a is not None and b else None


def table(runs, description):
    lines = []
    where = description.get("gpu") or f"CPU ({description.get('cpu_count')} cores)"
    lines.append(f"### {description.get('device')}: {where}, torch {description.get('torch')}")
    for (model, batch) in sorted(runs, key=lambda key: (key[0], key[1])):
        group = runs[(model, batch)]
        fb = median(group.get(("baseline", "forward_backward")))
        threads = next(iter(group.values()))["extra_info"].get("threads")
        lines += ["", f"**{model}, batch {batch}** (forward+backward {fmt_time(fb)}, "
                      f"forward {fmt_time(median(group.get(('baseline', 'forward'))))}, "
                      f"raw-autograd saliency step "
                      f"{fmt_ratio(ratio(median(group.get(('baseline', 'raw_saliency'))), fb))}"
                      f"{'' if description.get('gpu') else f', CPU threads: {threads}'})", "",
                  "| step | time | ÷ f+b | reference | ref ÷ f+b | step ÷ ref | b16 speed-up "
                  "| peak MiB |", "|---|---|---|---|---|---|---|---|"]
        for (kind, method), bench in sorted(group.items(), key=lambda item: item[0][1]):
            if kind != "step":
                continue
            step = median(bench)
            reference = group.get(("raw", method)) or group.get(("stock", method))
            ref_name = ("raw autograd" if ("raw", method) in group
                        else "Zennit hooks" if ("stock", method) in group else "")
            other = runs.get((model, 16 if batch == 1 else None), {}).get((kind, method))
            speedup = ratio(step * 16, median(other)) if batch == 1 and other else None
            peak = bench["extra_info"].get("peak_mib")
            cells = [method, fmt_time(step), fmt_ratio(ratio(step, fb)), ref_name,
                     fmt_ratio(ratio(median(reference), fb)) if reference else "–",
                     fmt_ratio(ratio(step, median(reference))) if reference else "–",
                     fmt_ratio(speedup), "–" if peak is None else f"{peak:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the paper's reference implementation on a 2-core machine (VGG-16, 224², batch 1, CPU):
#: (method, threads) -> (seconds per attack iteration, peak memory in GB)
REFERENCE = {("zennit.paper_lrp", 2): (7.55, 5.0), ("zennit.paper_lrp", 1): (12.0, 5.0),
             ("captum.saliency", 2): (2.03, 3.8), ("captum.saliency", 1): (3.4, 3.8)}


def reference_table(path):
    """``attack_time.py --json`` lines divided by the reference implementation's numbers."""
    lines = ["| step (VGG-16, 224², batch 1) | threads | s / iteration | ÷ reference "
             "| peak memory | ÷ reference |", "|---|---|---|---|---|---|"]
    with open(path) as handle:
        for record in map(json.loads, handle):
            threads = int(record["where"].split(",")[1].split()[0]) \
                if record["where"].startswith("CPU") else None
            seconds, gigabytes = REFERENCE.get((record["method"], threads), (None, None))
            peak_gb = record["peak_mib"] * 2**20 / 1e9
            lines.append(f"| {record['method']} | {threads} | {record['step_s']:.2f} "
                         f"| {fmt_ratio(ratio(record['step_s'], seconds))} | {peak_gb:.2f} GB "
                         f"| {fmt_ratio(ratio(peak_gb, gigabytes))} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="--benchmark-json output files, or "
                        "attack_time.py --json lines (*.jsonl): compared with the reference code")
    args = parser.parse_args(argv)
    for path in args.files:
        if path.endswith(".jsonl"):
            print(reference_table(path))
        else:
            runs, description = load(path)
            print(table(runs, description))
        print()


if __name__ == "__main__":
    from manip_bench.errors import command  # the CLI's handling: one line, exit 2
    sys.exit(command(main))
