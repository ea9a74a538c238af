"""The manipulability score: what an attack achieved, per sample, defined once.

Used by :func:`manip_bench.check_robustness` (its ``s_i`` and score), the benchmark
report (each cell's manipulability in ``summary.csv``) and the manipulability curves.
Every result keeps the raw values the score is made of (``expl_target_pcc_before``,
``expl_target_pcc``, ``class_kept``), so a score can always be recomputed.

Targeted attacks (a target map ``t``; ``h`` the heatmap, PCC the Pearson correlation)::

    before = PCC(h(x), t)       after = PCC(h(x_adv), t)
    s = clip((after - before) / (1 - before), 0, 1)    if the top-1 class is kept
    s = 0                                               if the class flipped, or after is NaN
    s = NaN ("already similar")                         if before >= ALREADY_SIMILAR_PCC

``s`` is the share of the similarity that was left to gain which the attack gained: 0 when
the map did not move toward the target, 1 when it now equals the target in correlation.
An input whose own map already agrees with its target (``before >= 0.9``) is not a test of
anything -- an attack that changes nothing would look like a success -- so it is marked
*already similar*, left out of medians and counted separately. A ``before`` that is
undefined (a constant map) counts as 0.

Untargeted attacks (``loss="topk"``) have no target: ``s = 1 - top-k intersection`` of the
manipulated and the original map (before the attack the intersection is 1, so this is the
same gain), 0 where the class flipped.
"""
import math

import numpy as np

from .defaults import ALREADY_SIMILAR_PCC

#: the raw per-sample values a targeted score is made of, as named in attack results
BEFORE, AFTER, TOPK, KEPT = ("expl_target_pcc_before", "expl_target_pcc",
                             "expl_original_topk", "class_kept")


def _float(value):
    return math.nan if value is None else float(value)


def gain(before, after, kept=True, similar=ALREADY_SIMILAR_PCC):
    """One sample's targeted score (see the module docstring): a float in [0, 1] or NaN."""
    before, after = _float(before), _float(after)
    if before >= similar:
        return math.nan
    if not kept or math.isnan(after):
        return 0.0
    before = 0.0 if math.isnan(before) else before
    return min(max((after - before) / (1.0 - before), 0.0), 1.0)


def targeted(metrics):
    """Whether per-sample ``metrics`` come from a targeted attack (they hold a target PCC)."""
    return AFTER in metrics


def per_sample(metrics, similar=ALREADY_SIMILAR_PCC):
    """Scores of every sample of ``metrics`` (``{name: per-sample values}``, as in
    :attr:`manip_bench.AttackResult.metrics` or a column of result rows).

    NaN marks an already similar input. Targeted metrics without ``expl_target_pcc_before``
    (results written before it was recorded) cannot be scored: every value is NaN.
    """
    kept = [bool(k) for k in metrics[KEPT]]
    if not targeted(metrics):
        return [min(max(1.0 - _float(t), 0.0), 1.0) if k and not math.isnan(_float(t)) else 0.0
                for t, k in zip(metrics[TOPK], kept)]
    if BEFORE not in metrics:
        return [math.nan] * len(kept)
    return [gain(b, a, k, similar) for b, a, k in zip(metrics[BEFORE], metrics[AFTER], kept)]


def already_similar(metrics, similar=ALREADY_SIMILAR_PCC):
    """Per sample: does the original map already agree with its target (``before >= similar``)?"""
    if not targeted(metrics) or BEFORE not in metrics:
        return [False] * len(metrics[KEPT])
    return [_float(b) >= similar for b in metrics[BEFORE]]


def median(scores):
    """The score of a set of samples: the median over those that are scored (NaN if none)."""
    values = np.asarray(scores, dtype=float)
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else math.nan


def columns(rows):
    """``{metric: [value per row]}`` of result rows (each with a ``metrics`` dict)."""
    keys = dict.fromkeys(key for row in rows for key in row["metrics"])
    return {key: [row["metrics"].get(key) for row in rows] for key in keys}


def describe(similar=ALREADY_SIMILAR_PCC):
    """One sentence that says how a per-sample score is made (for reports and tables)."""
    return (f"s_i = gain in target PCC over what was left to gain, (after - before) / "
            f"(1 - before), clipped to [0, 1]; 0 where the class flipped; inputs whose own map "
            f"already matched the target (PCC before >= {similar:g}) are 'already similar' and "
            f"not counted")


__all__ = ["AFTER", "BEFORE", "KEPT", "TOPK", "already_similar", "columns", "describe", "gain",
           "median", "per_sample", "targeted"]
