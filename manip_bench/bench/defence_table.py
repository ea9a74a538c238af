"""The defence table and figure of a ``manip-bench defend`` folder.

One entry per method and defence: robustness (the median target PCC the attack reached,
lower is better; the fraction of images whose class was kept) beside the costs of
:mod:`.costs` (similarity of the clean map to the undefended one, deletion gap, accuracy
of the explained network). Written as ``defence.csv`` (every column), ``defence.md``
(pivots of target PCC, similarity and deletion gap, and accuracy) and ``defence.png``
(robustness against faithfulness).
"""
import json
import math
from pathlib import Path

from .. import defences
from .defend import matched_beta
from .grid import method_of
from .smooth import SMOOTHGRAD

NONE = "none"
SMOOTHGRAD_ROW = "SmoothGrad (matched σ)"


def column_of(method):
    """The defence column of a grid method: ``none``, ``β=3``, ``fine-tuned``; SmoothGrad
    sits in the column of the β its σ is matched to."""
    if _matched(method):
        return defences.BetaSmoothing(round(matched_beta(method.options["stdev"]), 3)).label()
    defence = defences.parse(method.defence)
    return NONE if defence is None else defence.label()


def row_of(method):
    """The table row: the attributor, or ``SmoothGrad (matched σ)``."""
    return SMOOTHGRAD_ROW if _matched(method) else method.attributor


def _matched(method):
    """SmoothGrad at a σ given by the defence grid (the plain ``captum.smoothgrad`` method,
    at its default σ, is a row of its own)."""
    return method.attributor == SMOOTHGRAD and "stdev" in method.options


def defence_entries(summary, costs):
    """Entries joining the attack summary of each cell with its costs (grid order)."""
    by_cell = {json.dumps([e["attributor"], e["defence"], json.loads(e["options"])],
                          sort_keys=True): e for e in summary}
    accuracy = costs.get("accuracy", {})
    entries = []
    for cost in costs["methods"]:
        method = method_of(cost)
        attack = by_cell.get(json.dumps([method.attributor, method.defence, method.options],
                                        sort_keys=True), {})
        entries.append({
            "method": row_of(method), "defence": column_of(method), "label": method.label(),
            "n": attack.get("n", 0),
            "target_pcc": attack.get("expl_target_pcc_median", math.nan),
            "target_pcc_p10": attack.get("expl_target_pcc_p10", math.nan),
            "target_pcc_p90": attack.get("expl_target_pcc_p90", math.nan),
            "class_kept": attack.get("class_kept_fraction", math.nan),
            "similarity": cost["similarity"], "deletion_gap": cost["deletion_gap"],
            "accuracy": accuracy.get(str(method.defence), math.nan)})
    return entries


def _cell(value, digits=2):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _pivot(entries, key):
    rows = list(dict.fromkeys(e["method"] for e in entries))
    columns = list(dict.fromkeys(e["defence"] for e in entries))
    cells = {(e["method"], e["defence"]): e for e in entries}
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        values = [_cell(cells[(row, c)][key]) if (row, c) in cells else "–" for c in columns]
        lines.append(f"| `{row}` | " + " | ".join(values) + " |")
    return lines


def markdown(entries, costs, skipped=None):
    """``defence.md``: pivots (target PCC, similarity, deletion gap), the accuracy of each
    defence's explained network, and the cells left out with their reasons."""
    accuracy = {e["defence"]: e["accuracy"] for e in entries if e["method"] != SMOOTHGRAD_ROW}
    n = max((e["n"] for e in entries), default=0)
    lines = [f"Median target PCC the attack reached ({n} pairs; lower is more robust):", ""]
    lines += _pivot(entries, "target_pcc")
    lines += ["", "Faithfulness of the clean map: PCC with the undefended map (1 = unchanged):",
              ""]
    lines += _pivot(entries, "similarity")
    lines += ["", f"Faithfulness of the clean map: deletion gap (higher is better; a random "
                  f"ranking gives {_cell(costs['random_deletion_gap'], 3)}):", ""]
    lines += _pivot(entries, "deletion_gap")
    if any(not math.isnan(value) for value in accuracy.values()):
        lines += ["", "Test accuracy of the network the explanation is computed on "
                      f"({costs.get('accuracy_data')}):", "",
                  "| " + " | ".join(accuracy) + " |", "|---" * len(accuracy) + "|",
                  "| " + " | ".join(_cell(100 * v, 2) + " %" for v in accuracy.values()) + " |"]
    for label, reason in (skipped or {}).items():
        lines += ["", f"Not run: {label} ({reason})."]
    return "\n".join(lines) + "\n"


def rich_table(entries):
    """The full table for the terminal."""
    from rich.table import Table
    table = Table(title="defences: robustness (target PCC, lower is better) and cost")
    for header in ("method", "defence", "target PCC", "class kept", "similarity to undefended",
                   "deletion gap", "accuracy"):
        table.add_column(header, no_wrap=header == "method")
    for e in entries:
        table.add_row(e["method"], e["defence"], _cell(e["target_pcc"]),
                      _cell(e["class_kept"]), _cell(e["similarity"]),
                      _cell(e["deletion_gap"], 3),
                      "–" if math.isnan(e["accuracy"]) else f"{100 * e['accuracy']:.2f} %")
    return table


def figure(entries, path):
    """Robustness (x: target PCC reached) against faithfulness (y: similarity to the
    undefended map), one marker per defence, one line per method."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.add_subplot()
    columns = list(dict.fromkeys(e["defence"] for e in entries))
    markers = dict(zip(columns, "os^Dvx*P"))
    for method in dict.fromkeys(e["method"] for e in entries):
        points = [e for e in entries if e["method"] == method]
        line, = ax.plot([e["target_pcc"] for e in points], [e["similarity"] for e in points],
                        lw=0.8, alpha=0.6)
        for e in points:
            ax.scatter(e["target_pcc"], e["similarity"], marker=markers.get(e["defence"], "o"),
                       color=line.get_color(), s=28)
        first = points[0]
        ax.annotate(method.split(".")[-1], (first["target_pcc"], first["similarity"]),
                    fontsize=6, xytext=(3, 2), textcoords="offset points")
    for column, marker in markers.items():
        ax.scatter([], [], marker=marker, color="grey", label=column)
    ax.set_xlabel("target PCC the attack reached (lower: more robust)")
    ax.set_ylabel("clean map's PCC with the undefended map (higher: more faithful)")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return Path(path)


__all__ = ["column_of", "defence_entries", "figure", "markdown", "rich_table", "row_of"]
