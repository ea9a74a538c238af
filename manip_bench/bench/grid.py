"""The benchmark grid: methods x models x image pairs, sharded, run resumably.

A :class:`Grid` is pure data (JSON-able): which methods (attributor, optional smoothing
beta, attributor options), which models, which ``(original, target)`` pairs, the attack
preset and overrides, the seed. :func:`run_grid` attacks every pair of this process's
shard in batches and appends one JSON line per finished result (see
:mod:`manip_bench.bench.results`), skipping what the folder already holds, so rerunning
the same command after an interruption completes the grid.
"""
import contextlib
import dataclasses
import json
import os
import random
import time
import zlib
from pathlib import Path

import torch

from .. import attributors, data, defences, models
from ..attack import ManipulationAttack, make_config
from ..defaults import BUNDLED  # ``pairs`` value for pairs drawn from the bundled photos
from ..errors import ManipBenchError
from ..runtime import default_out_dir as runtime_out_dir
from ..runtime import folder_path, pick_device, pick_threads, private_random_state, versions
from ..threat import Budget
from .results import ResultsWriter, read_results, results_name, row_key

CONFIG_NAME = "config.json"
EXAMPLES_DIR = "examples"


@dataclasses.dataclass
class GridMethod:
    """One attributor setting: registry name, optional defence (``"beta=2"``, see
    :mod:`manip_bench.defences`), options for ``create``,
    and the threat model it is attacked under (``budget``, a :class:`~manip_bench.threat.Budget`
    as plain data; ``None`` in rows written before budgets were recorded)."""

    attributor: str
    defence: str = None
    options: dict = dataclasses.field(default_factory=dict)
    budget: dict = None

    def __post_init__(self):
        self.defence = defences.spec_of(self.defence)  # "beta=2.0", BetaSmoothing(2) -> "beta=2"

    def label(self, budget=False):
        """Short text for tables and figures, e.g. ``captum.saliency β=5`` (``L∞ 4/255``)."""
        parts = [self.attributor]
        if self.defence is not None:
            parts.append(defences.parse(self.defence).label())
        parts += [f"{'σ' if key == 'stdev' else key}={_short(value)}"
                  for key, value in sorted(self.options.items())]
        if budget and self.budget is not None:
            parts.append(Budget.parse(self.budget).label())
        return " ".join(parts)

    def cell_id(self, model):
        """File-name-safe id of the cell (this method on ``model``)."""
        parts = [self.attributor, model]
        if self.defence is not None:
            parts.append(self.defence.replace("=", ""))
        parts += [f"{key}{_short(value)}" for key, value in sorted(self.options.items())]
        if self.budget is not None:
            budget = Budget.parse(self.budget)
            parts.append(budget.norm + (f"{budget.eps * 255:.4g}" if budget.bounded else ""))
        return "__".join(file_slug(part) for part in parts)

    def to_json(self):
        return {"attributor": self.attributor, "defence": self.defence,
                "options": dict(self.options), "budget": self.budget}


def method_of(row):
    """The :class:`GridMethod` a result row belongs to."""
    return GridMethod(row["attributor"], row.get("defence"), row.get("options") or {},
                      row.get("budget"))


def _short(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def file_slug(text):
    """``text`` with every character a file name should not hold replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in str(text))


@dataclasses.dataclass
class Grid:
    """Everything that decides the results of a benchmark (what ``config.json`` compares).

    Build one with :func:`make_grid` (or :func:`manip_bench.bench.smooth.make_sweep`).
    """

    methods: list
    models: list
    pairs: list
    pair_source: str = BUNDLED
    preset: str = "paper"
    overrides: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    kind: str = "bench"
    #: cells left out because they cannot run, ``{label: reason}`` (the defence table's)
    skipped: dict = dataclasses.field(default_factory=dict)

    def to_json(self):
        """Plain JSON form (lists, not tuples), as stored in ``config.json``."""
        grid = {"kind": self.kind, "methods": [m.to_json() for m in self.methods],
                "models": list(self.models), "pair_source": str(self.pair_source),
                "pairs": [list(pair) for pair in self.pairs], "preset": self.preset,
                "overrides": self.overrides, "seed": self.seed}
        if self.skipped:
            grid["skipped"] = dict(self.skipped)
        return json.loads(json.dumps(grid))

    @property
    def size(self):
        """Number of results in the whole grid."""
        return len(self.methods) * len(self.models) * len(self.pairs)


def resolve_attributors(names):
    """Registry names from names and groups (``gradient``, ``lrp``, ``all``; see GROUPS).

    ``names`` is a list or a comma-separated string; order is kept, duplicates dropped,
    and a method that cannot be attacked is an error.
    """
    if isinstance(names, str):
        names = names.split(",")
    attributors.available()  # plugins join the groups when loaded
    resolved = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        for member in attributors.GROUPS.get(name, [name]):
            cls = attributors.get_class(member)
            if not cls.attackable:
                raise ManipBenchError(f"{member} cannot be attacked ({cls.not_attackable_reason}); "
                                      f"leave it out of the grid")
            if member not in resolved:
                resolved.append(member)
    if not resolved:
        raise ManipBenchError(f"no attributors given; use names or groups "
                              f"({', '.join(attributors.GROUPS)})")
    return resolved


def parse_model(spec):
    """``"name"`` or ``"name:weights"`` (``default``, ``random`` or a state_dict path)."""
    name, _, weights = str(spec).partition(":")
    models.input_size(name)  # a clear error for an unknown name
    weights = weights or "default"
    if weights not in ("default", "random") and not Path(weights).is_file():
        raise ManipBenchError(f"model {spec!r}: no such weights file {weights!r}; use NAME, "
                              f"NAME:random or NAME:PATH_TO_STATE_DICT")
    return name, weights


def _model_list(specs):
    if isinstance(specs, str):
        specs = specs.split(",")
    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise ManipBenchError(f"no models given; available: {', '.join(models.available())}")
    for spec in specs:
        parse_model(spec)
    return list(dict.fromkeys(specs))


def sample_pairs(source=BUNDLED, n=None, seed=0):
    """``(original, target)`` pairs from a folder, an ImageFolder tree, a CSV or ``bundled``.

    Folders and CSV files follow :func:`manip_bench.data.image_pairs`. ``bundled`` draws
    ``n`` (default 12) distinct ordered pairs of different photos among
    :data:`manip_bench.data.BUNDLED_IMAGES`, so an original may recur with another target.
    """
    if str(source) != BUNDLED:
        return data.image_pairs(source, n, seed)
    names = data.BUNDLED_IMAGES
    everything = [(a, b) for a in names for b in names if a != b]
    n = len(names) if n is None else n
    if not isinstance(n, int) or not 1 <= n <= len(everything):
        raise ManipBenchError(f"bundled images give 1 to {len(everything)} pairs, {n!r} asked; "
                              f"give a folder or CSV with --pairs for more")
    return random.Random(seed).sample(everything, n)


def make_grid(attributors="all", models=("cifar_vgg",), pairs=BUNDLED, n=20, seed=0,
              preset="auto", attributor_options=None, budgets=None, **overrides):
    """A checked :class:`Grid` of ``attributors`` (names or groups) x ``models`` x ``n`` pairs.

    Parameters
    ----------
    attributors : str or list
        Registry names and groups (``gradient``, ``lrp``, ``all``), list or comma-separated.
    models : str or list
        Zoo names, each optionally ``name:weights`` (``random`` or a state_dict path).
    pairs : str or path
        ``"bundled"``, a folder / ImageFolder tree of images, or a CSV with columns
        ``original,target``; ``n`` pairs are drawn with ``seed`` (CSV: the first ``n`` rows).
    preset : str
        ``"auto"`` (default: budget-tied self-tuning attack), ``"paper"`` (each method's own
        preset) or a key of ``manip_bench.attack.PRESETS``.
    attributor_options : dict, optional
        ``{registry name: {option: value}}`` passed to ``attributors.create``.
    budgets : str or list, optional
        Several threat models (``"1/255,2/255,4/255"``, or a list of budgets): every method
        is attacked under each (manipulability curves). Default: the preset's budget or
        ``budget=`` among the overrides.
    **overrides
        :class:`~manip_bench.attack.AttackConfig` fields for every cell (``iterations``, ``lr``...).
    """
    names = resolve_attributors(attributors)
    attributor_options = attributor_options or {}
    unknown = sorted(set(attributor_options) - set(names))
    if unknown:
        raise ManipBenchError(f"attributor_options given for {', '.join(unknown)}, which the "
                              f"grid does not include")
    if budgets is not None:
        if overrides.get("budget") is not None or overrides.get("linf") is not None:
            raise ManipBenchError("give either budgets or one budget, not both")
        budgets = parse_budgets(budgets)
    else:
        budgets = [None]
    methods = [GridMethod(name, None, dict(attributor_options.get(name, {})), budget)
               for name in names for budget in budgets]
    return build_grid(methods, models, pairs, n, seed, preset, overrides, "bench")


def parse_budgets(budgets):
    """Budgets from a list or comma-separated text, as plain data (see :class:`Budget`)."""
    if isinstance(budgets, str):
        budgets = [b for b in budgets.split(",") if b.strip()]
    parsed = [Budget.parse(b).to_json() for b in budgets]
    if not parsed:
        raise ManipBenchError("budgets: give at least one, e.g. 1/255,2/255,4/255,8/255")
    return list({json.dumps(b, sort_keys=True): b for b in parsed}.values())


def build_grid(methods, model_specs, pairs=BUNDLED, n=20, seed=0, preset="auto", overrides=None,
               kind="bench"):
    """A checked :class:`Grid` of explicit :class:`GridMethod` objects (see :func:`make_grid`).

    Each method's budget (``None``: the preset's, or ``budget=``/``linf=`` among the
    overrides) is resolved here and stored on the method, so every row records it.
    """
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    default_budget = {key: overrides.pop(key) for key in ("budget", "linf") if key in overrides}
    resolved = []
    for method in methods:
        unknown = sorted(set(method.options) - set(attributors.options(method.attributor)))
        if unknown:
            raise ManipBenchError(f"{method.attributor} does not take option(s) "
                                  f"{', '.join(unknown)}")
        method_preset = attributors.get_class(method.attributor).preset \
            if preset == "paper" else preset
        budget = {"budget": method.budget} if method.budget is not None else default_budget
        config = make_config(method_preset, **overrides, **budget)  # bad values fail now
        resolved.append(dataclasses.replace(method, budget=config.budget.to_json()))
    return Grid(methods=resolved, models=_model_list(model_specs),
                pairs=[tuple(map(str, p)) for p in sample_pairs(pairs, n, seed)],
                pair_source=str(pairs), preset=preset, overrides=overrides, seed=seed, kind=kind)


def parse_shard(text):
    """``"i/N"`` -> ``(i, N)`` with 0 <= i < N."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ManipBenchError(f"shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ManipBenchError(f"shard {text!r}: need 0 <= i < N")
    return index, count


def shard_from_env(environ=None):
    """``(RANK, WORLD_SIZE)`` from torchrun's environment, or ``None`` outside torchrun."""
    environ = os.environ if environ is None else environ
    if int(environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return parse_shard(f"{environ.get('RANK', '0')}/{environ['WORLD_SIZE']}")


def shard_pairs(n_pairs, shard=None):
    """Pair indices of ``shard`` ``(i, N)``: every N-th, starting at i (all when ``None``)."""
    if shard is None:
        return list(range(n_pairs))
    index, count = shard
    return list(range(index, n_pairs, count))


def default_out_dir(root="bench-out", shard=None):
    """A new folder under ``root`` named by the time (shards must agree on one: give --out)."""
    if shard is not None and shard[1] > 1:
        raise ManipBenchError("a sharded run needs an explicit output folder (--out) shared "
                              "by all shards")
    return runtime_out_dir(root)


def _device(name):
    """``pick_device``; under torchrun, ``LOCAL_RANK`` picks the GPU of an ``auto``/``cuda`` run."""
    device = pick_device(name)
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", int(local_rank) % torch.cuda.device_count())
    return device


def stored_config(out, grid):
    """``config.json`` of folder ``out`` if it holds ``grid`` (``None`` for a new folder).

    A folder that holds a different grid, a damaged config, or files but no
    ``config.json`` is refused with a message that says what to do.
    """
    out = folder_path(out)
    path = out / CONFIG_NAME
    if path.exists():
        try:
            config = json.loads(path.read_text())
            stored = config["grid"]
        except (ValueError, KeyError, TypeError) as error:
            raise ManipBenchError(f"{path} is damaged ({error}); use a new output "
                                  f"folder") from error
        wanted = grid.to_json()
        if stored != wanted:
            differ = [key for key in wanted if stored.get(key) != wanted[key]]
            raise ManipBenchError(
                f"{out} holds results of a different configuration (differs in: "
                f"{', '.join(differ)}); rerun with the original settings to resume, or choose "
                f"a new output folder")
        return config
    if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ManipBenchError(f"{out} is not empty and has no {CONFIG_NAME}; choose a new or "
                              f"empty output folder")
    return None


def prepare_folder(out, grid, run_info):
    """Create ``out`` with ``config.json``, or check that its config matches ``grid``."""
    config = stored_config(out, grid)
    if config is not None:
        return config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"grid": grid.to_json(), "seed": grid.seed, **run_info}
    staging = out / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    staging.write_text(json.dumps(config, indent=2))
    os.replace(staging, out / CONFIG_NAME)  # atomic: shards starting together see a whole file
    return config


@dataclasses.dataclass
class RunSummary:
    """What :func:`run_grid` did: the folder, results written now, results found done."""

    out: Path
    written: int
    skipped: int
    total: int
    results_file: Path


def make_progress(console=None):
    """The rich ``Progress`` the runner draws (overall, per cell, per attack)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def run_grid(grid, out, batch_size=10, device="auto", shard=None, threads=None,
             progress=False, console=None, on_rows=None):
    """Run (or resume) ``grid`` into folder ``out``; returns a :class:`RunSummary`.

    Parameters
    ----------
    grid : Grid
    out : path
        Results folder: ``config.json``, ``results*.jsonl``, ``examples/<cell>.pt``.
    batch_size : int
        Pairs attacked together (results are written after each batch).
    device : str
        ``auto`` (CUDA if available; under torchrun the ``LOCAL_RANK`` GPU), ``cpu``, ``cuda:1``...
    shard : tuple or str, optional
        ``(i, N)`` or ``"i/N"``: run every N-th pair starting at i, into
        ``results-rank{i}-of-{N}.jsonl``. Default: torchrun's ``RANK``/``WORLD_SIZE``, else all.
    threads : int, optional
        CPU threads (default: 1 for small inputs, see ``runtime.pick_threads``).
    progress : bool or rich.progress.Progress
        Draw an overall bar, a bar per cell and the attack's own bar.
    on_rows : callable, optional
        Called with each batch's rows after they are on disk.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ManipBenchError(f"batch size must be a positive integer, got {batch_size!r}")
    if shard is None:
        shard = shard_from_env()
    else:
        shard = parse_shard(shard if isinstance(shard, str) else "/".join(map(str, shard)))
    device = _device(device)
    out = Path(out)
    prepare_folder(out, grid, {"kind": grid.kind, "versions": versions(), "device": str(device),
                               "batch_size": batch_size, "shard": list(shard) if shard else None,
                               "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    done = {row_key(row) for row in read_results(out)}
    indices = shard_pairs(len(grid.pairs), shard)
    plan = [(model, method, [i for i in indices if _key(method, model, i) not in done])
            for model in grid.models for method in grid.methods]
    total = len(plan) * len(indices)
    pending = sum(len(todo) for _, _, todo in plan)
    results_file = out / results_name(shard)
    bar = make_progress(console) if progress is True else progress or None
    written = 0
    with ResultsWriter(results_file) as writer, \
            (bar if progress is True else contextlib.nullcontext()):
        overall = bar.add_task(f"grid ({out.name})", total=total, completed=total - pending) \
            if bar else None
        loaded = None
        for model, method, todo in plan:
            if not todo:
                continue
            if loaded != model:
                name, weights = parse_model(model)
                with private_random_state(grid.seed, device):  # "random" weights: the same
                    net, loaded = models.load(name, weights, device), model  # in every shard
                size = models.input_size(name)
                pick_threads(device, size, threads)
            attack = ManipulationAttack(defences.apply(method.defence, net), method.attributor,
                                        preset=grid.preset,
                                        attributor_options=method.options,
                                        progress=bar or False, budget=method.budget,
                                        **grid.overrides)
            cell = bar.add_task(f"{method.label()} on {model}", total=len(todo)) if bar else None
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                rows = _run_batch(attack, grid, model, method, batch, size, device, out)
                writer.append(rows)
                written += len(rows)
                if bar:
                    bar.update(cell, advance=len(rows))
                    bar.update(overall, advance=len(rows))
                if on_rows is not None:
                    on_rows(rows)
            if bar:
                bar.remove_task(cell)
    return RunSummary(out=out, written=written, skipped=total - pending, total=total,
                      results_file=results_file)


def _key(method, model, pair):
    return row_key({**method.to_json(), "model": model, "pair": pair})


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_batch(attack, grid, model, method, batch, size, device, out):
    """Attack one batch of pairs; save the cell's example if pair 0 is in it; return rows."""
    seed = zlib.crc32(f"{grid.seed}/{method.cell_id(model)}/{batch[0]}".encode())
    with private_random_state(seed, device):  # the same batch gets the same noise on every rerun
        return _attack_batch(attack, grid, model, method, batch, size, device, out)


def _attack_batch(attack, grid, model, method, batch, size, device, out):
    pairs = [grid.pairs[i] for i in batch]
    x = data.load_batch([p[0] for p in pairs], size).to(device)
    x_target = data.load_batch([p[1] for p in pairs], size).to(device)
    target = attack.target_maps(x_target)  # also warms the explainer up for the timing
    _synchronize(device)
    start = time.perf_counter()
    attack.evaluate(x)
    _synchronize(device)
    explain_seconds = (time.perf_counter() - start) / len(batch)
    result = attack(x, target)
    if 0 in batch:
        _save_example(out, method.cell_id(model), result, batch.index(0), x_target, method,
                      model, grid.pairs[0])
    rows = []
    for j, index in enumerate(batch):
        rows.append({
            "attributor": method.attributor, "model": model, "pair": index,
            "original": pairs[j][0], "target": pairs[j][1], "defence": method.defence,
            "options": method.options, "budget": method.budget, "losses": result.losses,
            "schedule": result.schedule, "preset": attack.preset, "iterations": result.iterations,
            "seconds": result.seconds / len(batch), "explain_seconds": explain_seconds,
            "batch": len(batch), "device": str(device),
            "original_class": int(result.original_class[j]),
            "metrics": {key: values[j] for key, values in result.metrics.items()},
        })
    return rows


def _save_example(out, cell_id, result, j, x_target, method, model, pair):
    """``examples/<cell>.pt``: one pair's images and maps (float16), written atomically."""
    folder = Path(out) / EXAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)

    def half(tensor):
        return tensor[j].detach().to("cpu", torch.float16).clone()

    example = {
        "attributor": method.attributor, "model": model, "defence": method.defence,
        "options": dict(method.options), "budget": method.budget, "label": method.label(True),
        "pair": 0,
        "original": pair[0], "target": pair[1],
        "x": half(result.x), "x_adv": half(result.x_adv), "x_target": half(x_target),
        "original_map": half(result.original_map), "adversarial_map": half(result.adversarial_map),
        "target_map": half(result.target_map),
        "metrics": {key: values[j] for key, values in result.metrics.items()},
    }
    staging = folder / f".{cell_id}.{os.getpid()}.tmp"
    torch.save(example, staging)
    os.replace(staging, folder / f"{cell_id}.pt")


def load_examples(out):
    """Every saved example of a results folder, as dicts (tensors in float32)."""
    examples = []
    for path in sorted((Path(out) / EXAMPLES_DIR).glob("*.pt")):
        example = torch.load(path, weights_only=True, map_location="cpu")
        examples.append({key: value.float() if isinstance(value, torch.Tensor) else value
                         for key, value in example.items()})
    return examples


__all__ = ["BUNDLED", "Grid", "GridMethod", "RunSummary", "build_grid", "default_out_dir",
           "load_examples", "make_grid", "make_progress", "method_of", "parse_budgets",
           "parse_model", "parse_shard", "prepare_folder", "resolve_attributors", "run_grid",
           "sample_pairs", "shard_from_env", "shard_pairs", "stored_config"]
