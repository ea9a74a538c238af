"""pytest-benchmark set-up: device, CPU threads, selection options and peak memory.

Runs on CUDA when torch sees a GPU, else on CPU. Options (all comma lists)::

    --bench-models cifar_vgg,vgg16   --bench-batches 1,16   --bench-methods NAME,...
    --bench-rounds N  --bench-warmup N  --bench-threads N  --bench-full

On CPU, VGG-16 at batch 16 is skipped unless ``--bench-full`` (minutes per step). CUDA
timings synchronise inside the timed function. On a shared CPU machine, time one thread
in CPU time (other processes then barely move the numbers)::

    pytest benchmarks --bench-threads 1 --benchmark-timer time.process_time \
        --benchmark-json benchmarks/results/cpu-2core.json

Smoke run (every benchmark once, untimed, on the 32x32 model at batch 1; about a minute
and under 1 GB on one CPU thread, see docs/benchmarks.md)::

    pytest benchmarks --bench-smoke

Ratio table: ``python benchmarks/ratios.py benchmarks/results/*.json``.
"""
import gc
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import steps  # noqa: E402

from manip_bench import models, runtime  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("manip-bench benchmarks")
    group.addoption("--bench-models", default=",".join(steps.MODELS))
    group.addoption("--bench-batches", default=",".join(map(str, steps.BATCHES)))
    group.addoption("--bench-methods", default="", help="registry names (default: all)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds (default 5 on CUDA, 3 on CPU)")
    group.addoption("--bench-warmup", type=int, default=None,
                    help="warm-up rounds (default 2 on CUDA, 1 on CPU)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="CPU threads (default: runtime.pick_threads)")
    group.addoption("--bench-full", action="store_true",
                    help="also run VGG-16 at batch 16 on CPU")
    group.addoption("--bench-smoke", action="store_true",
                    help="smoke run: every benchmark once, untimed (--benchmark-disable), "
                         f"models {SMOKE['bench_models']}, batch {SMOKE['bench_batches']}, "
                         f"{SMOKE['bench_threads']} thread")


#: what --bench-smoke sets (it wins over the same options given on the command line)
SMOKE = {"bench_models": "cifar_vgg", "bench_batches": "1", "bench_threads": 1}


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads --benchmark-disable
def pytest_configure(config):
    if config.getoption("--bench-smoke", default=False):
        config.option.benchmark_disable = True
        for name, value in SMOKE.items():
            setattr(config.option, name, value)


def _list(config, name):
    return [item for item in config.getoption(name).split(",") if item]


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", _list(config, "--bench-models"), scope="module")
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", [int(b) for b in _list(config, "--bench-batches")],
                             ids=lambda b: f"b{b}")
    if "method" in metafunc.fixturenames:
        wanted = _list(config, "--bench-methods")
        methods = getattr(metafunc.function, "methods", None) or steps.attackable()
        methods = [m for m in methods if not wanted or m in wanted]
        metafunc.parametrize("method", methods)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def model(model_name, device):
    loaded = steps.load_model(model_name, device)
    yield loaded
    del loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture
def inputs(model_name, batch, device, request):
    if device.type == "cpu" and model_name == "vgg16" and batch > 1 \
            and not request.config.getoption("--bench-full"):
        pytest.skip("VGG-16 at batch > 1 on CPU takes minutes per step; pass --bench-full")
    return steps.make_batch(model_name, batch, device)


@pytest.fixture
def threads(model_name, device, request):
    chosen = runtime.pick_threads(device, models.input_size(model_name),
                                     request.config.getoption("--bench-threads"))
    return chosen


def _rss_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return None


def peak_memory(run, device):
    """Peak memory of one call of ``run``: CUDA max allocated, or the process's peak RSS."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": peak / 2**20, "peak_over_start_mib": (peak - before) / 2**20,
                "memory_kind": "cuda max allocated"}
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _rss_kb("VmRSS:")
        run()
        peak = _rss_kb("VmHWM:")
        return {"peak_mib": peak / 1024, "peak_over_start_mib": (peak - before) / 1024,
                "memory_kind": "peak RSS (process)"}
    except OSError:
        import resource
        run()
        return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "memory_kind": "max RSS since start (process)"}


@pytest.fixture
def measure(benchmark, device, threads, model_name, request):
    """``measure(run, kind, method, batch)``: time ``run`` (pedantic) and record its context."""
    config = request.config
    cuda = device.type == "cuda"
    rounds = config.getoption("--bench-rounds") or (5 if cuda else 3)
    warmup = config.getoption("--bench-warmup")
    warmup = (2 if cuda else 1) if warmup is None else warmup

    def run_measure(run, kind, method, batch):
        run = steps.synchronized(run, device)
        info = benchmark.extra_info
        info.update(kind=kind, method=method, model=model_name, batch=batch,
                    input_size=models.input_size(model_name), device=device.type,
                    gpu=torch.cuda.get_device_name(device) if cuda else None,
                    cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                    threads=threads, torch=torch.__version__,
                    load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        try:
            benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
            if not benchmark.disabled:  # --benchmark-disable: the smoke run, once per step
                info.update(peak_memory(run, device))
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            pytest.skip(f"out of memory on {torch.cuda.get_device_name(device)}")
    return run_measure
