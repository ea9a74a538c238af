"""How much of a median over image pairs is noise: bootstrap intervals.

A benchmark's median over ``n`` pairs is a random number: other pairs would give another.
:func:`median_interval` states that noise as a percentile-bootstrap interval: resample the
pairs with replacement, take the median of each resample, and keep the central ``level``
of those medians. The resampling is seeded, so a report is reproducible.

A single pair (``manip-bench run``) has no such interval; :data:`ONE_PAIR` says what to
do instead.
"""
import math

import numpy as np

#: the central share of the bootstrap medians an interval keeps
LEVEL = 0.95
#: resamples per interval (the interval's own Monte-Carlo error is about 0.01 of its width)
RESAMPLES = 2000

#: what a one-pair number can and cannot say (``manip-bench run`` and its result.json)
ONE_PAIR = ("one image pair: other pairs give other numbers (tenths apart for the same "
            "method); compare methods with manip-bench bench, whose report gives each median "
            "with a 95 % interval over pairs")


def median_interval(values, level=LEVEL, resamples=RESAMPLES, seed=0):
    """Bootstrap interval of the median of ``values`` (one value per pair).

    Parameters
    ----------
    values : array-like of float
        One value per pair; NaNs (undefined metrics) are left out.
    level : float
        Share of the bootstrap medians inside the interval (0.95: a 95 % interval).
    resamples : int
        Number of resamples of the pairs.
    seed : int
        Seed of the resampling.

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(v, v)`` for one value, ``(nan, nan)`` for none.
    """
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not values.size:
        return math.nan, math.nan
    if values.size == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    medians = np.median(values[rng.integers(0, values.size, (resamples, values.size))], axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return float(low), float(high)


def format_interval(median, interval, digits=2):
    """``"0.90 (0.87–0.92)"``: a median and its interval; ``"–"`` for an undefined median."""
    if median is None or math.isnan(median):
        return "–"
    low, high = interval
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"
