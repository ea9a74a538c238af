"""Where and how a job runs: device, CPU threads, random state, installed versions.

A leaf module: it imports only the standard library, NumPy and torch (and, inside
``pick_device``, :class:`manip_bench.errors.ManipBenchError`, itself a leaf), so every
layer above it -- the attack engine, the bench, the robustness check, the CLI -- can use
it without importing any of the others.
"""
import contextlib
import importlib.metadata
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: distributions whose versions decide a result, as ``versions()`` reports them
VERSIONED = {"manip_bench": "manip-bench", "torch": "torch", "torchvision": "torchvision",
             "captum": "captum", "zennit": "zennit"}


def pick_device(name="auto"):
    """``auto``: CUDA when torch sees it, else CPU."""
    from .errors import ManipBenchError  # a leaf: keeps this module's own imports stdlib/torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ManipBenchError(f"unknown device {name!r} (use auto, cpu or cuda)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ManipBenchError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def pick_threads(device, input_size, threads=None):
    """CPU threads: small inputs run fastest on one thread (thread start-up dominates)."""
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    if threads is None:
        threads = 1 if input_size <= 64 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def private_random_state(seed, device):
    """Seed torch and NumPy for one job, and give the caller back their own streams after."""
    devices = [device] if torch.device(device).type == "cuda" else []
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)
            yield
    finally:
        np.random.set_state(state)


def installed_version(distribution):
    """The installed version of ``distribution`` (its package metadata), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions():
    """Versions of everything that decides a result, read from the installed metadata."""
    return {**{key: installed_version(name) for key, name in VERSIONED.items()},
            "python": platform.python_version()}


def default_out_dir(root="manip-out"):
    """A new, unused folder under ``root`` named by the time."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        path, n = Path(root) / f"{stamp}-{n}", n + 1
    return path


def _file_above(path):
    """The nearest existing path at or above ``path`` if it is a file, else None."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def folder_path(path, option="--out"):
    """``path`` as a ``Path`` that can be (or is) a folder: refused with a one-line error
    naming ``option`` when it, or a folder above it, is a file."""
    from .errors import ManipBenchError  # a leaf, as in pick_device
    path = Path(path)
    file = _file_above(path)
    if file is not None:
        where = "is a file" if file == path else f"is inside {file}, which is a file"
        raise ManipBenchError(f"{option} {path} {where}, not a folder; give a folder path "
                              f"(new or empty)")
    return path


def file_path(path, option):
    """``path`` as a ``Path`` a file can be written to (its folder is created when written);
    refused with a one-line error naming ``option`` when it is a folder or lies under a file."""
    from .errors import ManipBenchError
    path = Path(path)
    if path.is_dir():
        raise ManipBenchError(f"{option} {path} is a folder; give a file name")
    file = _file_above(path.parent)
    if file is not None:
        raise ManipBenchError(f"{option} {path} is inside {file}, which is a file; give a "
                              f"path in a folder")
    return path


def fresh_out_dir(out=None, root="manip-out"):
    """``out`` as a path, refused if it exists and is not empty (or is a file); None: a new
    folder under ``root``."""
    from .errors import ManipBenchError  # a leaf, as in pick_device
    if out is None:
        return default_out_dir(root)
    out = folder_path(out)
    if out.exists() and any(out.iterdir()):
        raise ManipBenchError(f"output folder {out} exists and is not empty; choose another --out")
    return out


def staging_folder(out):
    """A new private folder beside ``out`` to write results into, so that an error leaves
    nothing half-written: :func:`move_into_place` then makes it ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def move_into_place(staging, out):
    """Rename the finished ``staging`` folder to ``out`` (absent or empty), with the
    permissions of an ordinary new folder (``mkdtemp`` makes it 0700)."""
    out = Path(out)
    if out.exists():
        out.rmdir()
    umask = os.umask(0)
    os.umask(umask)
    Path(staging).chmod(0o777 & ~umask)
    Path(staging).rename(out)
