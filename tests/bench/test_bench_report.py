"""Reports: rebuilt from the JSONL alone; summary CSV; figures; the β sweep."""
import csv
import shutil

import numpy as np
import pytest
from rich.console import Console

from bench_fixtures import image_folder, tiny_grid  # noqa: F401 - fixtures
from manip_bench import ManipBenchError, bench
from manip_bench.bench.report import summarize


@pytest.fixture(scope="module")
def finished(tiny_grid, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("bench") / "run"
    bench.run_grid(tiny_grid, out, batch_size=3, device="cpu")
    return out


def test_report_writes_summary_and_figures(finished):
    console = Console(record=True, width=250)
    result = bench.report(finished, console=console)
    names = {p.name for p in result["files"]}
    assert names == {"summary.csv", "boxplots__cifar_vgg.png", "examples__cifar_vgg.png"}
    assert all((finished / name).stat().st_size > 0 for name in names)
    text = console.export_text()
    assert "captum.saliency" in text and "zennit.epsilon" in text
    assert "target" in text and "PCC" in text
    with open(finished / "summary.csv") as file:
        table = list(csv.DictReader(file))
    assert [row["attributor"] for row in table] == ["captum.saliency", "zennit.epsilon"]
    assert all(row["n"] == "3" for row in table)
    for column in ("expl_target_pcc_median", "expl_target_pcc_p10", "expl_target_pcc_p90",
                   "input_ssim_median", "class_kept_fraction", "seconds", "explain_seconds"):
        assert column in table[0]
    assert "sweep" not in result


def test_summary_statistics_are_medians_and_percentiles(finished):
    rows = bench.read_results(finished)
    entry = summarize(rows)[0]
    values = [r["metrics"]["expl_target_pcc"] for r in rows
              if r["attributor"] == entry["attributor"]]
    assert entry["expl_target_pcc_median"] == pytest.approx(np.median(values))
    assert entry["expl_target_pcc_p10"] == pytest.approx(np.percentile(values, 10))
    assert entry["expl_target_pcc_p90"] == pytest.approx(np.percentile(values, 90))


def test_report_rebuilds_the_summary_from_the_jsonl_alone(finished, tmp_path):
    alone = tmp_path / "copy"
    alone.mkdir()
    shutil.copy(finished / "results.jsonl", alone / "results-rank0-of-1.jsonl")
    result = bench.report(alone)
    assert result["summary"] == bench.report(finished, figures=False)["summary"]
    assert (alone / "summary.csv").read_text() == (finished / "summary.csv").read_text()
    assert (alone / "boxplots__cifar_vgg.png").exists()
    assert not (alone / "examples__cifar_vgg.png").exists()  # no examples/ folder was copied


def test_report_on_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ManipBenchError, match="no results"):
        bench.report(tmp_path)
    with pytest.raises(ManipBenchError, match="no such results folder"):
        bench.report(tmp_path / "nope")


@pytest.mark.slow
def test_smooth_sweep_reports_beta_and_smoothgrad(image_folder, tmp_path):  # noqa: F811
    sweep = bench.make_sweep(["captum.saliency"], betas=[2, 20], stdevs=[0.02], samples=2,
                             pairs=image_folder, n=2, iterations=2)
    labels = [m.label() for m in sweep.methods]
    assert labels == ["captum.saliency", "captum.saliency β=2", "captum.saliency β=20",
                      "captum.smoothgrad samples=2 σ=0.02"]
    out = tmp_path / "smooth"
    bench.run_grid(sweep, out, device="cpu")
    rows = bench.read_results(out)
    assert {r["defence"] for r in rows} == {None, "beta=2", "beta=20"}
    assert all(r["explain_seconds"] > 0 for r in rows)
    console = Console(record=True, width=250)
    result = bench.report(out, console=console)
    assert {"smooth.csv", "smooth.png"} <= {p.name for p in result["files"]}
    series = [(e["series"], e["x"]) for e in result["sweep"]]
    assert series == [("captum.saliency", 2.0), ("captum.saliency", 20.0),
                      ("captum.saliency", float("inf")), ("SmoothGrad (σ)", 0.02)]
    assert "explanation" in console.export_text()


def test_sweep_takes_every_method_and_refuses_bad_values():
    lrp = bench.sweep_methods(["zennit.epsilon"], betas=[5], stdevs="")
    assert [(m.attributor, m.defence) for m in lrp] == [("zennit.epsilon", None),
                                                        ("zennit.epsilon", "beta=5")]
    with pytest.raises(ManipBenchError, match="betas must be positive"):
        bench.sweep_methods(["captum.saliency"], betas=[0, 1])
    methods = bench.sweep_methods("captum.saliency", betas="1,5", stdevs="", relu=False)
    assert [(m.attributor, m.defence) for m in methods] == [("captum.saliency", "beta=1"),
                                                             ("captum.saliency", "beta=5")]


def test_manipulability_score_is_the_normalised_area_over_log_budget():
    from manip_bench.bench.report import curves, manipulability_score
    points = [{"eps": e / 255, "median": m} for e, m in ((1, 0.2), (2, 0.4), (4, 0.8))]
    assert manipulability_score(points) == pytest.approx((0.3 + 0.6) / 2)
    flat = [{"eps": e / 255, "median": 0.5} for e in (1, 2, 8, 16)]
    assert manipulability_score(flat) == pytest.approx(0.5)

    def row(eps, pair, before, pcc, kept=True):
        return {"attributor": "captum.saliency", "model": "m", "pair": pair, "defence": None,
                "options": {}, "budget": {"norm": "linf", "eps": eps},
                "metrics": {"expl_target_pcc_before": before, "expl_target_pcc": pcc,
                            "class_kept": kept}}

    rows = [row(1 / 255, 0, 0.2, 0.6), row(1 / 255, 1, 0.1, -0.2), row(1 / 255, 2, 0.95, 0.97),
            row(4 / 255, 0, 0.2, 0.9), row(4 / 255, 1, 0.1, 0.95, kept=False),
            row(4 / 255, 2, 0.95, 0.99)]
    (key, series), = curves(rows).items()
    assert key == ("m", "captum.saliency (linf)")
    # gains (0.6-0.2)/0.8 = 0.5 and 0 (moved away) at 1/255, (0.9-0.2)/0.8 = 0.875 and 0
    # (class flipped) at 4/255; pair 2 is already similar (0.95 >= 0.9) and left out
    assert [p["median"] for p in series] == pytest.approx([0.25, 0.4375])
    assert [p["already_similar"] for p in series] == [1, 1]
    assert [p["pcc_before"] for p in series] == pytest.approx([0.2, 0.2])
