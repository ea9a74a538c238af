"""Seconds per attack iteration and peak memory, for comparing with the paper's reference code.

Two measurements per method, each in this process:

* ``step``: :class:`steps.AttackStep` (explain -> loss -> backward -> Adam) repeated
  ``--steps`` times after one warm-up step; median wall time, peak memory of the process
  (CPU: peak RSS, reset before the first step; CUDA: max allocated);
* ``loop`` (``--loop N``): the real :class:`manip_bench.ManipulationAttack` run for
  ``N`` and ``3N`` iterations; the difference over ``2N`` iterations is the per-iteration
  cost with the engine's bookkeeping (judging, best-so-far, history), and
  ``1500 x that / batch`` the seconds per image of the paper's full attack (an
  extrapolation, printed as such).

``--stock`` times the step as the code ran before the optimisations (Zennit's own hooks,
PyTorch's own convolution backward); the loop always runs the current code. Run one
method per process for clean peak memory::

    python benchmarks/attack_time.py --model vgg16 --methods zennit.paper_lrp --threads 2
    python benchmarks/attack_time.py --model vgg16 --batch 16 --loop 10 --steps 5   # GPU
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import steps  # noqa: E402

from manip_bench import ManipulationAttack  # noqa: E402


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        except OSError:
            pass


def _peak_mib(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_kb("VmHWM:") / 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, method, x, target_map, count, device, fast=True):
    """Median seconds of ``count`` attack steps after one warm-up, and peak MiB."""
    step = steps.attack_step(model, method, x, target_map, fast=fast)
    _reset_peak(device)
    step()
    _sync(device)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = _peak_mib(device)
    del step
    return sorted(times)[len(times) // 2], times, peak


def time_loop(model, method, x, target_map, iterations, device):
    """Seconds per iteration of the real attack loop: (T(3N) - T(N)) / 2N."""
    attack = ManipulationAttack(model, method)
    target = attack.target_maps(x) if target_map is None else target_map
    totals = []
    for n in (iterations, 3 * iterations):
        attack.config.iterations = n
        _sync(device)
        start = time.perf_counter()
        attack(x, target)
        _sync(device)
        totals.append(time.perf_counter() - start)
    return (totals[1] - totals[0]) / (2 * iterations)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--methods", default="zennit.paper_lrp,captum.saliency")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--loop", type=int, default=0, help="also time the real loop (N, 3N)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stock", action="store_true",
                        help="the code before the optimisations (Zennit's own hooks, "
                             "PyTorch's own convolution backward)")
    parser.add_argument("--json", default=None, help="append one JSON line per method here")
    args = parser.parse_args(argv)

    from manip_bench import models, runtime
    device = runtime.pick_device(args.device)
    threads = runtime.pick_threads(device, models.input_size(args.model), args.threads)
    model = steps.load_model(args.model, device)
    x, _, target_map = steps.make_batch(args.model, args.batch, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {threads} threads, load average {os.getloadavg()[0]:.2f}"
    for method in args.methods.split(","):
        median, times, peak = time_steps(model, method, x, target_map, args.steps, device,
                                         fast=not args.stock)
        record = {"method": method, "model": args.model, "batch": args.batch, "where": where,
                  "step_s": median, "step_times_s": times, "peak_mib": peak,
                  "stock": args.stock, "load_after": os.getloadavg()[0]}
        line = (f"{method:28s} {args.model} b{args.batch} {where}: step {median:.3f} s "
                f"(runs {', '.join(f'{t:.3f}' for t in times)}), peak {peak:.0f} MiB")
        if args.loop:
            per_iteration = time_loop(model, method, x, None, args.loop, device)
            record["loop_iteration_s"] = per_iteration
            record["paper_attack_s_per_image"] = 1500 * per_iteration / args.batch
            line += (f"; loop {per_iteration:.4f} s/iteration -> 1500 iterations "
                     f"≈ {1500 * per_iteration / args.batch:.1f} s per image (extrapolated)")
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    from manip_bench.errors import command  # the CLI's handling: one line, exit 2
    sys.exit(command(main))
