"""Report on a results folder: summary table and CSV, box plots, example grids, β sweep.

Everything is rebuilt from the folder alone: the rows of every ``results*.jsonl`` (merged
over shards) and the example tensors in ``examples/``. ``config.json`` is only read to
tell a β sweep from a plain grid.
"""
import csv
import dataclasses
import json
import math
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .. import defences, manipulability
from ..errors import ManipBenchError
from ..threat import Budget, format_value
from .grid import CONFIG_NAME, file_slug, load_examples, method_of
from .intervals import median_interval
from .results import cell_key, read_results
from .smooth import SMOOTHGRAD

#: metrics in the printed table, with their headers (summary.csv holds every metric)
TABLE_METRICS = {"expl_target_pcc": "target\nPCC", "expl_target_ssim": "target\nSSIM",
                 "expl_target_mse": "target\nMSE", "expl_original_pcc": "original\nPCC",
                 "input_ssim": "image\nSSIM", "input_linf": "image\nL∞"}
#: the paper's Fig. 3 panels: explanation vs target (top), image vs original (bottom)
BOX_METRICS = (("expl_target_mse", "expl_target_ssim", "expl_target_pcc"),
               ("input_mse", "input_ssim", "input_pcc"))
#: the β sweep's panels (rows); each panel shows vs-target and vs-original
SWEEP_METRICS = ("pcc", "ssim", "mse")


def _figure(**options):
    """A new ``matplotlib.figure.Figure``: no pyplot, so no backend to select or close."""
    from matplotlib.figure import Figure  # matplotlib only when a figure is drawn
    return Figure(**options)


def _values(rows, key):
    """Float array of one metric (``None``/NaN -> NaN; booleans -> 0/1)."""
    return np.array([math.nan if row["metrics"].get(key) is None else float(row["metrics"][key])
                     for row in rows], dtype=float)


def _stats(values):
    """Median, 10th and 90th percentile, NaNs ignored (all NaN -> NaN)."""
    values = values[~np.isnan(values)]
    if not values.size:
        return math.nan, math.nan, math.nan
    return tuple(float(v) for v in np.percentile(values, [50, 10, 90]))


def group_cells(rows):
    """``{cell key: rows}`` in row order (rows from :func:`read_results` are sorted)."""
    cells = OrderedDict()
    for row in rows:
        cells.setdefault(cell_key(row), []).append(row)
    return cells


def summarize(rows):
    """One dict per cell: identity, ``n``, seconds, and ``<metric>_median/_p10/_p90``.

    ``<metric>_median_lo/_hi``: the median's bootstrap 95 % interval over the cell's pairs
    (:func:`~manip_bench.bench.intervals.median_interval`).

    ``class_kept`` is summarised as ``class_kept_fraction``. Times are per image:
    ``seconds`` (the attack) and ``explain_seconds`` (one explanation), medians.
    """
    summary = []
    cells = group_cells(rows)
    budgets = {json.dumps(row.get("budget"), sort_keys=True) for row in rows}
    for group in cells.values():
        first = group[0]
        entry = {"attributor": first["attributor"], "model": first["model"],
                 "defence": first.get("defence"),
                 "options": json.dumps(first.get("options") or {}, sort_keys=True),
                 "budget": _budget_text(first.get("budget")),
                 "label": method_of(first).label(budget=len(budgets) > 1), "n": len(group),
                 "iterations": int(np.median([row["iterations"] for row in group])),
                 "seconds": float(np.median([row["seconds"] for row in group])),
                 "explain_seconds": float(np.median([row.get("explain_seconds", math.nan)
                                                      for row in group]))}
        scores = np.array(manipulability.per_sample(manipulability.columns(group)))
        entry["manipulability_median"], entry["manipulability_p10"], \
            entry["manipulability_p90"] = _stats(scores)
        entry["already_similar"] = int(sum(manipulability.already_similar(
            manipulability.columns(group))))
        keys = list(dict.fromkeys(key for row in group for key in row["metrics"]))
        for key in keys:
            values = _values(group, key)
            if key == "class_kept":
                entry["class_kept_fraction"] = float(np.nanmean(values))
                continue
            entry[f"{key}_median"], entry[f"{key}_p10"], entry[f"{key}_p90"] = _stats(values)
            entry[f"{key}_median_lo"], entry[f"{key}_median_hi"] = median_interval(values)
        summary.append(entry)
    return summary


def _budget_text(budget):
    """``linf:8/255``-style text of a row's budget (``unrecorded`` for old rows)."""
    if budget is None:
        return "unrecorded"
    budget = Budget.parse(budget)
    return budget.norm if not budget.bounded else f"{budget.norm}:{format_value(budget.eps)}"


def write_csv(entries, path):
    """Write dicts as CSV (columns: the union of keys, in first-seen order)."""
    columns = list(dict.fromkeys(key for entry in entries for key in entry))
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for entry in entries:
            writer.writerow({key: "" if entry.get(key) is None else entry.get(key)
                             for key in columns})
    return Path(path)


def _fmt(value, digits=3):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}g}"


def _spread(entry, key):
    """``median (95 % interval)`` over ``[p10, p90]`` on a second line (keeps the table narrow)."""
    return (f"{_fmt(entry.get(key + '_median'))} "
            f"({_fmt(entry.get(key + '_median_lo'), 2)}–{_fmt(entry.get(key + '_median_hi'), 2)})\n"
            f"[{_fmt(entry.get(key + '_p10'), 2)}, {_fmt(entry.get(key + '_p90'), 2)}]")


def _kept(entry):
    kept = entry.get("class_kept_fraction")
    return "–" if kept is None else f"{round(kept * entry['n'])}/{entry['n']}"


def summary_table(summary):
    """A rich ``Table`` of the summary: one row per cell, median and [10th, 90th] percentile."""
    models = list(dict.fromkeys(entry["model"] for entry in summary))
    from rich.table import Table  # rich only when a table is drawn
    table = Table(title=f"explanation manipulation on {', '.join(models)}: "
                        f"median (95 % interval over pairs) [10th, 90th percentile]")
    table.add_column("method", no_wrap=True)
    if len(models) > 1:
        table.add_column("model")
    table.add_column("n", justify="right")
    table.add_column("manipu-\nlability", justify="right", overflow="fold")
    for header in TABLE_METRICS.values():
        table.add_column(header, justify="right", overflow="fold")
    table.add_column("class\nkept", justify="right")
    table.add_column("s /\nimage", justify="right", overflow="fold")
    for entry in summary:
        similar = entry.get("already_similar")
        table.add_row(entry["label"], *([entry["model"]] if len(models) > 1 else []),
                      str(entry["n"]), _spread(entry, "manipulability")
                      + (f"\n{similar} similar" if similar else ""),
                      *(_spread(entry, key) for key in TABLE_METRICS),
                      _kept(entry), _fmt(entry["seconds"], 2))
    table.caption = manipulability.describe()
    return table


def _models(rows):
    return list(dict.fromkeys(row["model"] for row in rows))


def box_plots(rows, out):
    """Fig. 3 layout per model: one panel per metric, one box per method. Returns the paths."""
    paths = []
    for model in _models(rows):
        cells = [group for group in group_cells(rows).values() if group[0]["model"] == model]
        labels = [method_of(group[0]).label() for group in cells]
        fig = _figure(figsize=(max(9.0, 0.55 * len(cells) * 3), 7))
        axes = fig.subplots(2, 3, squeeze=False)
        for r, keys in enumerate(BOX_METRICS):
            for c, key in enumerate(keys):
                ax = axes[r, c]
                data = [v[~np.isnan(v)] for v in (_values(group, key) for group in cells)]
                ax.boxplot(data, whis=(10, 90), showfliers=True)
                ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right",
                              fontsize=7)
                ax.set_title(key.replace("_", " "), fontsize=9)
                if key.endswith("mse") and all(v.size and v.min() > 0 for v in data):
                    ax.set_yscale("log")
        fig.suptitle(f"{model}: explanation vs target (top), image vs original (bottom); "
                     f"whiskers 10th/90th percentile", fontsize=10)
        fig.tight_layout()
        path = Path(out) / f"boxplots__{file_slug(model)}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def _show_image(ax, tensor):
    ax.imshow(tensor.permute(1, 2, 0).clamp(0, 1).numpy())


def _show_map(ax, tensor):
    ax.imshow(tensor.numpy(), cmap="inferno")


def example_grids(out, order=None):
    """Per model: one row per method, original/manipulated/target images and their maps."""
    examples = load_examples(out)
    if order is not None:  # the summary's order
        rank = {key: i for i, key in enumerate(order)}
        examples.sort(key=lambda e: rank.get(_example_key(e), len(rank)))
    paths = []
    columns = (("x", "original", _show_image), ("x_adv", "manipulated", _show_image),
               ("x_target", "target image", _show_image),
               ("original_map", "original map", _show_map),
               ("adversarial_map", "manipulated map", _show_map),
               ("target_map", "target map", _show_map))
    for model in dict.fromkeys(e["model"] for e in examples):
        chosen = [e for e in examples if e["model"] == model]
        fig = _figure(figsize=(1.7 * len(columns), 1.8 * len(chosen) + 0.4))
        axes = fig.subplots(len(chosen), len(columns), squeeze=False)
        for r, example in enumerate(chosen):
            for c, (key, title, show) in enumerate(columns):
                ax = axes[r, c]
                show(ax, example[key])
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(title, fontsize=8)
            pcc = example["metrics"].get("expl_target_pcc")
            axes[r, 0].set_ylabel(f"{example['label']}\nPCC {_fmt(pcc)}", fontsize=7)
        fig.suptitle(f"{model}: pair 0", fontsize=9)
        fig.tight_layout()
        path = Path(out) / f"examples__{file_slug(model)}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def _example_key(example):
    return cell_key({"attributor": example["attributor"], "model": example["model"],
                     "defence": example.get("defence"), "options": example["options"]})


# ---- manipulability curves (several budgets) ---------------------------------------------------


def curves(rows):
    """``{(model, method label): [(eps, entry)]}`` for methods attacked under several budgets.

    Only bounded budgets of one norm form a curve; ``entry`` holds ``eps``, ``n``, the
    median / 10th / 90th percentile of the per-pair manipulability
    (:mod:`manip_bench.manipulability`: gain in target PCC over what was left to gain, class
    flips 0, already similar pairs left out), how many pairs were ``already_similar``, and
    the median target PCC before and after the attack (``pcc_before``, ``pcc_after``).
    """
    series = OrderedDict()
    for group in group_cells(rows).values():
        budget = group[0].get("budget")
        if budget is None or not Budget.parse(budget).bounded:
            continue
        method = dataclasses.replace(method_of(group[0]), budget=None)
        key = (group[0]["model"], f"{method.label()} ({Budget.parse(budget).norm})")
        series.setdefault(key, []).append(_curve_point(group, Budget.parse(budget).eps))
    return {key: sorted(points, key=lambda p: p["eps"]) for key, points in series.items()
            if len(points) > 1}


def _curve_point(group, eps):
    """One budget's point: the manipulability per pair, summarised."""
    columns = manipulability.columns(group)
    targeted = manipulability.targeted(columns)
    median, p10, p90 = _stats(np.array(manipulability.per_sample(columns), dtype=float))
    point = {"eps": eps, "n": len(group),
             "metric": "manipulability" if targeted else "1 - top-k",
             "median": median, "p10": p10, "p90": p90,
             "already_similar": int(sum(manipulability.already_similar(columns)))}
    if targeted:
        point["pcc_before"] = _stats(_values(group, manipulability.BEFORE))[0]
        point["pcc_after"] = _stats(_values(group, manipulability.AFTER))[0]
    return point


def manipulability_score(points):
    """Normalised area under the median curve over log budget (one value in [0, 1])."""
    x = np.log2([p["eps"] for p in points])
    y = np.array([p["median"] for p in points])
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def curve_entries(series):
    """Flat rows for ``curves.csv``: model, method, budget, metric, median, percentiles, score."""
    return [{"model": model, "method": method, "budget": format_value(p["eps"]),
             "eps": p["eps"], **{k: p.get(k) for k in ("n", "metric", "median", "p10", "p90",
                                                       "already_similar", "pcc_before",
                                                       "pcc_after")},
             "score": manipulability_score(points)}
            for (model, method), points in series.items() for p in points]


def curve_table(series):
    """Methods ranked by manipulability score, with the median at each budget."""
    budgets = sorted({p["eps"] for points in series.values() for p in points})
    from rich.table import Table  # rich only when a table is drawn
    table = Table(title="manipulability: normalised area under the median curve over log "
                        "budget (0 robust, 1 fully manipulable)")
    table.add_column("method", no_wrap=True)
    table.add_column("model")
    table.add_column("score", justify="right", style="bold")
    for eps in budgets:
        table.add_column(format_value(eps), justify="right")
    ranked = sorted(series.items(), key=lambda item: -manipulability_score(item[1]))
    for (model, method), points in ranked:
        by_eps = {p["eps"]: p["median"] for p in points}
        table.add_row(method, model, f"{manipulability_score(points):.3f}",
                      *(_fmt(by_eps.get(eps)) for eps in budgets))
    return table


def curve_figure(series, path):
    """Median manipulability vs budget, one line per method (10–90 % band), per model."""
    by_model = OrderedDict()
    for (model, method), points in series.items():
        by_model.setdefault(model, []).append((method, points))
    fig = _figure(figsize=(6.5 * len(by_model), 4.5))
    axes = fig.subplots(1, len(by_model), squeeze=False)
    from matplotlib import colormaps
    from matplotlib.ticker import NullFormatter
    for ax, (model, lines) in zip(axes[0], by_model.items()):
        ranked = sorted(lines, key=lambda m: -manipulability_score(m[1]))
        for i, (method, points) in enumerate(ranked):
            xs = [p["eps"] * 255 for p in points]
            line, = ax.plot(xs, [p["median"] for p in points], "os^D"[i // 10 % 4] + "-",
                            color=colormaps["tab10"](i % 10),
                            label=f"{method} ({manipulability_score(points):.2f})")
            ax.fill_between(xs, [p["p10"] for p in points], [p["p90"] for p in points],
                            color=line.get_color(), alpha=0.08)
        ax.set_xscale("log", base=2)
        ticks = sorted({p["eps"] * 255 for _, points in lines for p in points})
        ax.set_xticks(ticks, [f"{t:g}/255" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1)
        ax.set_xlabel("budget (L∞ or L2, [0, 1] pixel units)")
        ax.set_ylabel(f"median {lines[0][1][0]['metric']} (class flips: 0)")
        ax.set_title(f"{model}: manipulability vs budget (score = normalised AUC)", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


# ---- the β sweep (paper Fig. 4) -------------------------------------------------------------


def _kind(out):
    """The ``kind`` in ``config.json`` (``""`` if it has none; None without a readable one)."""
    try:
        return json.loads((Path(out) / CONFIG_NAME).read_text()).get("kind", "")
    except (OSError, ValueError):
        return None


def _defence_report(out, summary, files, console, figures, accuracy_data):
    """The defence table of a ``manip-bench defend`` folder (see :mod:`.defence_table`)."""
    from . import defence_table
    from .costs import costs
    cost = costs(out, accuracy_data)
    entries = defence_table.defence_entries(summary, cost)
    files.append(write_csv(entries, out / "defence.csv"))
    skipped = json.loads((out / CONFIG_NAME).read_text())["grid"].get("skipped")
    (out / "defence.md").write_text(defence_table.markdown(entries, cost, skipped))
    files.append(out / "defence.md")
    if figures:
        files.append(defence_table.figure(entries, out / "defence.png"))
    if console is not None:
        _print(console, defence_table.rich_table(entries))
    return entries


def is_sweep(out, rows):
    """A folder written by ``manip-bench smooth`` (or any rows with a defence)."""
    kind = _kind(out)
    if kind is not None:
        return kind == "smooth"
    return any(row.get("defence") is not None for row in rows)


def _series(summary):
    """``{(model, series): [(x, entry)]}``: x is β (inf: ReLU), or σ for SmoothGrad."""
    series = OrderedDict()
    for entry in summary:
        options = json.loads(entry["options"])
        if (entry["attributor"] == SMOOTHGRAD and "stdev" in options
                and entry["defence"] is None):
            name, x = "SmoothGrad (σ)", float(options["stdev"])
        else:
            name = entry["attributor"] + (f" {entry['options']}" if options else "")
            x = math.inf if entry["defence"] is None else defences.parse(entry["defence"]).beta
        series.setdefault((entry["model"], name), []).append((x, entry))
    return {key: sorted(points, key=lambda p: p[0]) for key, points in series.items()}


def sweep_summary(summary):
    """Summary entries of a sweep with ``series`` (attributor or SmoothGrad) and its ``x``."""
    return [{"series": name, "x": x, **entry}
            for (_, name), points in _series(summary).items() for x, entry in points]


def sweep_table(entries):
    """The β sweep as a rich table, with the measured cost of one explanation."""
    from rich.table import Table  # rich only when a table is drawn
    table = Table(title="β-smoothing vs SmoothGrad: median [10th, 90th percentile]")
    for column in ("method", "model", "β / σ", "n"):
        table.add_column(column, no_wrap=column == "method")
    for key in ("expl_target_pcc", "expl_original_pcc", "input_ssim"):
        table.add_column(TABLE_METRICS[key], justify="right", overflow="fold")
    table.add_column("class\nkept", justify="right")
    table.add_column("ms /\nexplanation", justify="right")
    table.add_column("attack\ns / image", justify="right")
    for e in entries:
        setting = "ReLU" if e["x"] == math.inf else f"{e['x']:g}"
        table.add_row(e["series"], e["model"], setting, str(e["n"]),
                      *(_spread(e, key) for key in ("expl_target_pcc", "expl_original_pcc",
                                                    "input_ssim")),
                      _kept(e), _fmt(1000 * e["explain_seconds"], 2), _fmt(e["seconds"], 2))
    return table


def sweep_figure(entries, path):
    """Paper Fig. 4: similarity of the manipulated map to the target and to the original
    map vs β (one column per attributor; SmoothGrad vs σ), median line, 10–90 % band."""
    series = OrderedDict()
    for e in entries:
        series.setdefault((e["model"], e["series"]), []).append(e)
    fig = _figure(figsize=(3.6 * len(series), 2.6 * len(SWEEP_METRICS)))
    axes = fig.subplots(len(SWEEP_METRICS), len(series), squeeze=False)
    from matplotlib.ticker import NullFormatter
    for c, ((model, name), points) in enumerate(series.items()):
        finite = [p for p in points if p["x"] != math.inf]
        relu = [p for p in points if p["x"] == math.inf]
        for r, metric in enumerate(SWEEP_METRICS):
            ax = axes[r, c]
            for against, colour in (("target", "tab:red"), ("original", "tab:blue")):
                key = f"expl_{against}_{metric}"
                if finite:
                    xs = [p["x"] for p in finite]
                    ax.plot(xs, [p[f"{key}_median"] for p in finite], "o-", color=colour,
                            label=f"vs {against}")
                    ax.fill_between(xs, [p[f"{key}_p10"] for p in finite],
                                    [p[f"{key}_p90"] for p in finite], color=colour, alpha=0.2)
                for p in relu:
                    ax.axhline(p[f"{key}_median"], color=colour, linestyle="--", linewidth=1,
                               label=f"vs {against}, ReLU")
            if finite:
                ax.set_xscale("log")
                ax.set_xticks([p["x"] for p in finite], [f"{p['x']:g}" for p in finite],
                              fontsize=7)
                ax.xaxis.set_minor_formatter(NullFormatter())
            if metric == "mse":
                ax.set_yscale("log")
            ax.set_xlabel("σ (input range 1)" if name.startswith("SmoothGrad") else "β")
            ax.set_ylabel(metric.upper(), fontsize=9)
            if r == 0:
                ax.set_title(f"{name}\n{model}", fontsize=9)
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _print(console, table):
    """Print a table; into a file or pipe (a log) at least 160 columns wide, not cut to 80."""
    if console.is_terminal or console.width >= 160:
        console.print(table)
        return
    width = console.width
    console.width = 160
    try:
        console.print(table)
    finally:
        console.width = width


def report(out, console=None, figures=True, accuracy_data=None):
    """Summarise folder ``out``: print tables, write ``summary.csv`` and the figures.

    Returns ``{"summary": [...], "files": [paths]}``; a β sweep also writes
    ``smooth.csv`` and ``smooth.png`` and returns ``"sweep"``; a defence grid writes
    ``defence.csv``, ``defence.md`` and ``defence.png`` (costs measured on images of
    ``accuracy_data``, a labelled folder, see :mod:`.costs`) and returns ``"defence"``.
    """
    out = Path(out)
    if not out.is_dir():
        raise ManipBenchError(f"{out}: no such results folder")
    rows = read_results(out)
    if not rows:
        raise ManipBenchError(f"{out}: no results (results*.jsonl) to report on yet")
    summary = summarize(rows)
    files = [write_csv(summary, out / "summary.csv")]
    if console is not None:
        _print(console, summary_table(summary))
    if figures:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # tight_layout on crowded grids
            files += box_plots(rows, out)
            files += example_grids(out, order=list(group_cells(rows)))
    result = {"summary": summary, "files": files}
    series = curves(rows)
    if series:
        files.append(write_csv(curve_entries(series), out / "curves.csv"))
        if figures:
            files.append(curve_figure(series, out / "curves.png"))
        if console is not None:
            _print(console, curve_table(series))
        result["curves"] = {f"{model} | {method}": manipulability_score(points)
                            for (model, method), points in series.items()}
    if _kind(out) == "defend":
        result["defence"] = _defence_report(out, summary, files, console, figures, accuracy_data)
    if is_sweep(out, rows):
        entries = sweep_summary(summary)
        files.append(write_csv(entries, out / "smooth.csv"))
        if figures:
            files.append(sweep_figure(entries, out / "smooth.png"))
        if console is not None:
            _print(console, sweep_table(entries))
        result["sweep"] = entries
    if console is not None:
        console.print(f"{len(rows)} results; wrote " + ", ".join(p.name for p in files)
                      + f" in {out}", highlight=False)
    return result


__all__ = ["BOX_METRICS", "TABLE_METRICS", "box_plots", "curve_entries", "curve_figure",
           "curve_table", "curves", "example_grids", "group_cells", "is_sweep",
           "manipulability_score", "report", "summarize", "summary_table", "sweep_figure", "sweep_summary", "sweep_table",
           "write_csv"]
