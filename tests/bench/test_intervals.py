"""Bootstrap intervals of medians over pairs (manip_bench.bench.intervals) and their use in reports."""
import math
from pathlib import Path

import numpy as np
import pytest

from manip_bench import bench
from manip_bench.bench.intervals import format_interval, median_interval
from manip_bench.bench.report import summarize

STORED = Path(__file__).parents[2] / "docs" / "results" / "bench-cifar_vgg"


def test_interval_holds_the_sample_median_and_is_reproducible():
    values = np.random.default_rng(1).normal(0.8, 0.1, 20)
    low, high = median_interval(values)
    assert low < np.median(values) < high
    assert median_interval(values) == (low, high)


def test_interval_covers_the_true_median_about_95_percent_of_the_time():
    """200 draws of 20 pairs from a skewed distribution with a known median (ln 2 for Exp(1))."""
    rng = np.random.default_rng(0)
    covered = [low <= math.log(2) <= high for low, high in
               (median_interval(rng.exponential(1.0, 20), resamples=500, seed=i)
                for i in range(200))]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_interval_narrows_with_more_pairs():
    rng = np.random.default_rng(3)
    widths = [np.subtract(*median_interval(rng.normal(0, 1, n))[::-1]) for n in (20, 320)]
    assert widths[1] < widths[0] / 2


def test_interval_ignores_nan_and_handles_one_or_no_value():
    assert median_interval([0.5, math.nan, 0.5, 0.5]) == (0.5, 0.5)
    assert median_interval([0.7]) == (0.7, 0.7)
    assert all(math.isnan(v) for v in median_interval([math.nan]))


def test_format_interval():
    assert format_interval(0.9012, (0.871, 0.925)) == "0.90 (0.87–0.93)"
    assert format_interval(math.nan, (math.nan, math.nan)) == "–"


@pytest.mark.skipif(not STORED.is_dir(), reason=f"stored results folder {STORED} absent")
def test_summary_gives_each_median_its_interval_over_the_cells_pairs():
    """On the stored raw rows of the paper-preset table (20 pairs per method)."""
    rows = bench.read_results(STORED)
    for entry in summarize(rows):
        values = [row["metrics"]["expl_target_pcc"] for row in rows
                  if row["attributor"] == entry["attributor"]]
        assert len(values) == entry["n"] == 20
        interval = (entry["expl_target_pcc_median_lo"], entry["expl_target_pcc_median_hi"])
        assert interval == median_interval(values)
        assert interval[0] <= entry["expl_target_pcc_median"] <= interval[1]


def test_run_records_how_far_its_one_pair_number_goes(tmp_path):
    """``manip-bench run`` attacks one pair: its result.json says what that number can tell."""
    from manip_bench import experiment
    from manip_bench.bench.intervals import ONE_PAIR
    _, out = experiment.run("captum.saliency", iterations=2, device="cpu", out=tmp_path / "run")
    stability = experiment.read_record(out)["stability"]
    assert stability == ONE_PAIR and "one image pair" in stability and "bench" in stability
