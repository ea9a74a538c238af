"""Per-step memory of attack steps, each measured in its own fresh process.

A process's peak RSS is a maximum over its whole life: measured in one process, a step
that runs after a larger one reports nothing of its own. Here every measurement is a new
Python process that loads the model, sets up the attack, and then, for each measured step
(``--steps``, default 1)::

    gc.collect(); malloc_trim(0)          # return freed heap pages to the OS
    echo 5 > /proc/self/clear_refs        # peak RSS (VmHWM) := current RSS
    before = VmRSS; step(); peak = VmHWM  # on CUDA: reset_peak_memory_stats, max allocated

and reports the step's own peak, ``peak - before``, next to the RSS with the model loaded
(``model_rss_mib``) and the whole process's peak. The step is one iteration of the attack
loop (:class:`steps.AttackStep`: explain -> loss -> backward -> Adam step), measured from
the second iteration on (``state.step = 1``: the first one also checks the derivative).
Time per step: CPU time of the process (``time.process_time``; with one thread it is
barely moved by other processes) and wall time, of the same steps.

An ``internal_batch_size`` option applies to the measured steps only: the set-up (the
original map and the judging of ``x``) always runs with the default, so that measuring
the all-at-once computation does not also pay for it twice in the set-up.

Usage (VGG-16, 224², batch 1, one thread; the README's table)::

    python benchmarks/memory.py --model vgg16 --threads 1 \\
        --run captum.saliency \\
        --run captum.integrated_gradients:steps=50 \\
        --run captum.integrated_gradients:steps=50,internal_batch_size=None \\
        --run captum.smoothgrad --run captum.smoothgrad:internal_batch_size=None \\
        --run captum.gradient_shap --run captum.gradient_shap:internal_batch_size=None \\
        --json benchmarks/results/memory-cpu-2core.json

``--run NAME[:key=value,...]`` is one measurement (values are Python literals). Runs go
one after the other, never in parallel. ``python benchmarks/memory.py --table FILE.json``
prints the table of a results file.
"""
import argparse
import ast
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def parse_run(spec):
    """``"name:key=value,..."`` -> ``(name, options)``."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return name, options


def _status_mib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_child(args):
    """Runs in the fresh process: one attack configuration, ``args.steps`` measured steps."""
    import torch

    sys.path.insert(0, str(HERE))
    import steps

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    name, options = parse_run(args.child)
    start_rss = _status_mib("VmRSS:")
    model = steps.load_model(args.model, device)
    _trim()
    model_rss = _status_mib("VmRSS:")
    model_allocated = torch.cuda.memory_allocated(device) / 2**20 if cuda else None

    x, _, target_map = steps.make_batch(args.model, args.batch, device)
    chunking = options.pop("internal_batch_size", "auto")
    step = steps.AttackStep(model, name, x, target_map,
                            **steps.attributor_options(name, model), **options)
    if hasattr(step.explain, "internal_batch_size"):
        step.explain.internal_batch_size = chunking
        options["internal_batch_size"] = chunking
    elif chunking != "auto":
        raise SystemExit(f"{name} takes no internal_batch_size")
    step.state.step = 1  # a regular iteration (the first also checks the derivative)

    records = []
    for _ in range(args.steps):
        _trim()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # VmHWM := VmRSS
            before = _status_mib("VmRSS:")
        cpu, wall = time.process_time(), time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _status_mib("VmHWM:")
        records.append({"before_mib": before, "peak_mib": peak, "own_peak_mib": peak - before,
                        "cpu_s": cpu, "wall_s": wall})
    worst = max(records, key=lambda record: record["own_peak_mib"])
    return {
        "method": name, "options": options, "model": args.model, "batch": args.batch,
        "device": device.type, "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "threads": args.threads, "torch": torch.__version__,
        "memory_kind": "CUDA max allocated" if cuda else "peak RSS (VmHWM, reset per step)",
        "start_rss_mib": start_rss, "model_rss_mib": model_rss,
        "model_allocated_mib": model_allocated,
        "own_peak_mib": worst["own_peak_mib"], "peak_mib": worst["peak_mib"],
        "peak_over_model_mib": worst["peak_mib"] - (model_allocated if cuda else model_rss),
        "cpu_s": min(r["cpu_s"] for r in records), "wall_s": min(r["wall_s"] for r in records),
        "steps": records,
    }


def run_in_fresh_process(spec, args):
    """One measurement in a new Python process; its JSON record."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", spec,
               "--model", args.model, "--batch", str(args.batch), "--threads", str(args.threads),
               "--steps", str(args.steps)] + (["--device", args.device] if args.device else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"measurement {spec!r} failed (exit code {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def label(record):
    options = ", ".join(f"{key}={value}" for key, value in record["options"].items())
    return f"{record['method']}" + (f" ({options})" if options else "")


def table(records):
    """Markdown: own peak, ÷ saliency's, time, and all-at-once ÷ chunked of the same method."""
    saliency = next((r for r in records if r["method"] == "captum.saliency"), None)
    lines = ["| step | own peak MiB | ÷ saliency | peak over model MiB | process peak MiB "
             "| s / step (CPU) | chunked ÷ all at once (time) |",
             "|---|---|---|---|---|---|---|"]
    for record in records:
        same = {k: v for k, v in record["options"].items() if k != "internal_batch_size"}
        whole = next((r for r in records if r["method"] == record["method"]
                      and r["options"].get("internal_batch_size", "auto") is None
                      and {k: v for k, v in r["options"].items()
                           if k != "internal_batch_size"} == same), None)
        chunked = record["options"].get("internal_batch_size") is not None
        time_ratio = f"{record['cpu_s'] / whole['cpu_s']:.2f}×" if whole and chunked else ""
        ratio = f"{record['own_peak_mib'] / saliency['own_peak_mib']:.2f}×" if saliency else ""
        lines.append(f"| {label(record)} | {record['own_peak_mib']:.0f} | {ratio} "
                     f"| {record['peak_over_model_mib']:.0f} | {record['peak_mib']:.0f} "
                     f"| {record['cpu_s']:.2f} | {time_ratio} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], metavar="NAME[:key=value,...]")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="measured steps per process")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--json", help="write the records (and the command) to this file")
    parser.add_argument("--table", help="print the table of a results file and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_child(args)))
        return
    if args.table:
        with open(args.table) as handle:
            print(table(json.load(handle)["records"]))
        return
    records = []
    for spec in args.run:
        record = run_in_fresh_process(spec, args)
        records.append(record)
        print(f"{label(record)}: own peak {record['own_peak_mib']:.0f} MiB, "
              f"{record['cpu_s']:.2f} s CPU / step", flush=True)
    print(table(records))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": "python benchmarks/memory.py " + " ".join(
                           sys.argv[1:] if argv is None else argv),
                       "machine": {"node": platform.node(), "cpu_count": os.cpu_count(),
                                   "processor": platform.processor() or platform.machine()},
                       "records": records}, handle, indent=1)


if __name__ == "__main__":
    from manip_bench.errors import command  # the CLI's handling: one line, exit 2
    sys.exit(command(main))
