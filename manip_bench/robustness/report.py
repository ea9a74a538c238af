"""The result of a robustness check: :class:`RobustnessReport`, its table and plain-data form."""
import dataclasses
import io

from .. import defences, manipulability, metrics
from ..defaults import ALREADY_SIMILAR_PCC
from ..threat import Budget
from .recognise import _plain

#: per-sample columns of the table: key, header, format
_COLUMNS = (
    ("input", "in", "{}".format), ("class", "class", "{}".format),
    ("target", "map\nof", "{}".format),
    ("target_pcc_before", "target\nPCC\nbefore", "{:.2f}".format),
    ("target_pcc", "target\nPCC\nafter", "{:.2f}".format),
    ("target_ssim", "target\nSSIM\nafter", "{:.2f}".format),
    ("original_pcc", "PCC to\nown\nmap", "{:.2f}".format),
    ("input_linf", "input\nL∞\n×255", lambda v: f"{v * 255:.1f}"),
    ("input_ssim", "input\nSSIM", "{:.3f}".format),
    ("class_kept", "class\nkept", lambda v: f"{v:.0%}" if isinstance(v, float) else
     ("yes" if v else "no")),
    ("manipulability", "s_i", lambda v: "similar" if v != v else f"{v:.2f}"),
)
#: the beta-smoothed table adds whether the smoothed model predicts the original model's class
_AGREES = ("same_class_as_unsmoothed", "same\nclass\nas\nReLU",
           lambda v: f"{v:.0%}" if isinstance(v, float) else ("yes" if v else "NO"))


@dataclasses.dataclass
class RobustnessReport:
    """What :func:`check_robustness` found, per input and aggregated.

    ``score`` is the median of ``per_sample["manipulability"]`` (:mod:`manip_bench.robustness`);
    ``defence`` names the defence the explanation was computed under (``"beta=2"``, or
    None); ``smoothed`` the same report for the defended (beta-smoothed) explanation (or None), with
    ``agreement`` the fraction of inputs whose smoothed prediction equals the original one;
    ``result`` the underlying :class:`~manip_bench.attack.AttackResult` (images, maps);
    ``names`` optional names of the inputs (file names), indexed like the inputs.
    """

    method: str
    source: str
    options: dict
    defence: str
    budget: dict
    seed: int
    per_sample: dict
    score: float
    skipped: dict
    seconds: float
    result: object = dataclasses.field(repr=False, default=None)
    smoothed: "RobustnessReport" = None
    agreement: float = None
    names: list = None

    def summary(self):
        """Median of each numeric per-sample value (``class_kept``, ``already_similar``: the
        fraction true); ``manipulability`` is the score (already similar inputs left out)."""
        keys = [k for k in self.per_sample if k not in ("input", "target", "class",
                                                          "manipulability")]
        summary = metrics.summarize({k: self.per_sample[k] for k in keys})
        summary["manipulability"] = self.score
        return summary

    @property
    def already_similar(self):
        """How many inputs were already similar to their target (not scored)."""
        return sum(self.per_sample.get("already_similar", ()))

    def headline(self):
        """``manipulability 0.85`` with what the score leaves out, or why there is none."""
        n, similar = len(self.per_sample["input"]), self.already_similar
        if similar == n:
            return (f"manipulability not measured: the map of every input already matched its "
                    f"target (target PCC before >= {ALREADY_SIMILAR_PCC:g}); give target maps "
                    f"that differ from the inputs' own maps")
        left_out = f" ({similar} of {n} inputs already similar, not counted)" if similar else ""
        return f"manipulability {self.score:.2f}{left_out}"

    def to_dict(self):
        """Everything as JSON-friendly plain data (no tensors)."""
        return {
            "method": self.method, "source": self.source,
            "options": {k: _plain(v) for k, v in self.options.items()},
            "defence": self.defence, "budget": dict(self.budget), "seed": self.seed,
            "score": self.score, "summary": self.summary(),
            "per_sample": {k: list(v) for k, v in self.per_sample.items()},
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "seconds": round(self.seconds, 3), "agreement": self.agreement, "names": self.names,
            "smoothed": self.smoothed.to_dict() if self.smoothed is not None else None,
        }

    def _parts(self):
        """Headline, per-sample table and budget line (rich renderables)."""
        from rich import box  # imported when drawn: `import manip_bench` stays light
        from rich.table import Table
        from rich.text import Text
        beta = f", {defences.parse(self.defence).describe()}" if self.defence else ""
        options = ", ".join(f"{k}={_plain(v)}" for k, v in self.options.items())
        method = (self.source if self.source.startswith(self.method)
                  else f"{self.source} → {self.method}({options})")
        headline = Text.assemble((f"{method}{beta}: ", "bold"),
                                 (self.headline(), "bold magenta"))
        columns = _COLUMNS + ((_AGREES,) if _AGREES[0] in self.per_sample else ())
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False)
        for _, header, _ in columns:
            table.add_column(header, justify="right", no_wrap=True)
        if self.names:
            table.add_column("image", overflow="ellipsis", no_wrap=True, max_width=16)
        for row in zip(*(self.per_sample[key] for key, _, _ in columns)):
            names = [self.names[row[0]]] if self.names else []
            table.add_row(*(fmt(v) for v, (_, _, fmt) in zip(row, columns)), *names)
        summary = self.summary()
        table.add_row("med", "", "", *(fmt(summary[key]) for key, _, fmt in columns[3:]),
                      style="bold")
        budget = Text(f"{self.budget['iterations']} iterations "
                      f"({self.budget['schedule']['name']} schedule), budget "
                      f"{Budget.parse(self.budget['budget']).label()}, "
                      f"{self.seconds:.1f} s; median output MSE {summary['output_mse']:.1e}",
                      style="dim")
        return [headline, table, budget]

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text
        parts = self._parts()
        if self.skipped:
            parts.append("skipped: " + "; ".join(f"input {i}: {why}"
                                                 for i, why in self.skipped.items()))
        if self.smoothed is not None:
            parts += ["", *self.smoothed._parts()]
            parts.append(f"the defence ({defences.parse(self.smoothed.defence).describe()}) changes the "
                         f"manipulability from {self.score:.2f} to {self.smoothed.score:.2f}; "
                         f"its prediction agrees with the original (ReLU) model's on "
                         f"{self.smoothed.agreement:.0%} of the inputs (column 'same class as "
                         f"ReLU'; 'class kept' is the smoothed model keeping its own prediction "
                         f"under attack)")
        parts.append(Text(f"{manipulability.describe()}; manipulability: median s_i (0: the "
                          f"maps did not move toward the targets, 1: they match them)",
                          style="dim"))
        return Group(*parts)

    def __str__(self):
        from rich.console import Console
        console = Console(file=io.StringIO(), width=100, color_system=None, force_terminal=False)
        console.print(self)
        return "\n".join(line.rstrip() for line in console.file.getvalue().rstrip().splitlines())


__all__ = ["RobustnessReport"]
