"""Results as JSON lines: appended durably, read back tolerantly, shards merged.

One line per (method, model, pair). A batch of lines is written with one ``write``,
then ``flush`` and ``os.fsync``, so a finished result survives Ctrl-C, ``kill -9`` or a
power cut. A process killed in the middle of a write can leave a truncated last line:
readers ignore it, and :class:`ResultsWriter` cuts it off before appending again.
"""
import json
import math
import os
from pathlib import Path

from ..errors import ManipBenchError

#: every results file in a folder (one per shard, or ``results.jsonl`` for a single run)
RESULTS_GLOB = "results*.jsonl"

#: the keys of every result row (a public contract). ``pair`` indexes config.json's pairs;
#: ``seconds`` is the attack's wall time per image (batch time / ``batch``),
#: ``explain_seconds`` one explanation's; ``metrics`` holds every per-sample value of
#: ``AttackResult.metrics`` (``None`` where a metric is undefined, e.g. PCC of a flat map)
#: ``budget`` is the threat model (``{"norm", "eps"}``), ``losses`` and ``schedule`` say
#: how the attack was run (rows written before these were recorded lack all three).
ROW_FIELDS = ("attributor", "model", "pair", "original", "target", "defence", "options",
              "budget", "losses", "schedule", "preset", "iterations", "seconds",
              "explain_seconds", "batch", "device", "original_class", "metrics")


def results_name(shard=None):
    """``results.jsonl``, or ``results-rank{i}-of-{n}.jsonl`` for shard ``(i, n)``."""
    if shard is None or shard[1] == 1:
        return "results.jsonl"
    return f"results-rank{shard[0]}-of-{shard[1]}.jsonl"


def options_key(options):
    """Canonical text of an attributor-options dict (part of a row's identity)."""
    return json.dumps(options or {}, sort_keys=True)


def budget_key(budget):
    """Canonical text of a budget dict (``None`` for rows that predate budgets)."""
    return None if budget is None else json.dumps(budget, sort_keys=True)


def cell_key(row):
    """What identifies a cell: attributor, model, defence, attributor options, budget."""
    return (row["attributor"], row["model"], row.get("defence"),
            options_key(row.get("options")), budget_key(row.get("budget")))


def row_key(row):
    """What identifies a result: its cell and the pair index."""
    return (*cell_key(row), row["pair"])


def _plain(value):
    """JSON-safe copy: NaN/inf become ``None`` (strict JSON), tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def repair(path):
    """Make ``path`` end at a line boundary before appending; returns the bytes cut off.

    A complete JSON object that merely lacks its newline is kept (the newline is added);
    anything else after the last newline is a write interrupted mid-line and is dropped.
    """
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as file:
        data = file.read()
        if not data or data.endswith(b"\n"):
            return 0
        cut = data.rfind(b"\n") + 1
        try:
            complete = isinstance(json.loads(data[cut:]), dict)
        except ValueError:
            complete = False
        if complete:
            file.write(b"\n")
            dropped = 0
        else:
            file.truncate(cut)
            dropped = len(data) - cut
        file.flush()
        os.fsync(file.fileno())
    return dropped


class ResultsWriter:
    """Append rows to one JSONL file, each batch flushed and fsync'ed to disk.

    Opening repairs a truncated last line left by an interrupted run. Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = repair(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, rows):
        """Write ``rows`` (dicts) as JSON lines, durably, in one write."""
        text = "".join(json.dumps(_plain(row), allow_nan=False) + "\n" for row in rows)
        if text:
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_rows(path):
    """Rows of one JSONL file; an unfinished last line (a killed writer) is ignored.

    A damaged line anywhere else is an error naming the file and line.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if number == len(lines):  # after the last newline: an interrupted write
                continue
            raise ManipBenchError(f"{path}: line {number} is not a JSON result row; remove the "
                                  f"line (or the file) and rerun to recompute it")
        rows.append(row)
    return rows


def results_files(folder):
    """All results files of a folder (every shard), sorted by name."""
    return sorted(Path(folder).glob(RESULTS_GLOB))


def read_results(folder):
    """Every row in ``folder``'s results files, merged; the first of any duplicate kept.

    Rows are sorted by method, model and pair, so a merged sharded run reads the same as
    an unsharded one.
    """
    seen, rows = set(), []
    for path in results_files(folder):
        for row in read_rows(path):
            key = row_key(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return sorted(rows, key=_sort_key)


def _sort_key(row):
    defence = row.get("defence")
    budget = row.get("budget") or {}
    return (row["model"], row["attributor"], defence is not None, _defence_order(defence),
            options_key(row.get("options")), budget.get("norm") or "", budget.get("eps") or 0.0,
            row["pair"])


def _defence_order(spec):
    """Sort key of a defence spec: beta-smoothing by beta (then any other spec by text)."""
    kind, _, value = (spec or "").partition("=")
    try:
        return (kind, float(value), "")
    except ValueError:
        return (kind, 0.0, value)


__all__ = ["RESULTS_GLOB", "ROW_FIELDS", "ResultsWriter", "budget_key", "cell_key", "options_key", "read_results",
           "read_rows", "repair", "results_files", "results_name", "row_key"]
