"""The defence table: its grid (defences, matched SmoothGrad, cells that cannot run), the
costs measured on the clean maps, the report files, and resuming without losing rows."""
import json
import math

import pytest
import torch

from bench_fixtures import image_folder, interrupt_after  # noqa: F401 - fixture
from helpers import assert_cli_error
from manip_bench import ManipBenchError, bench, cli, data, metrics
from manip_bench.bench import costs as costs_module
from manip_bench.bench.defence_table import column_of
from manip_bench.bench.results import read_rows, row_key

SMALL = dict(attributors="captum.saliency,pattern.attribution", betas="10",
             finetuned="cifar_vgg_robust", model="cifar_vgg", n=2, iterations=2, samples=2)


def assert_defence_report(out):
    """The report files of a SMALL-like defend folder are there; returns defence.md's text."""
    for name in ("defence.md", "defence.csv", "defence.png", "costs.json"):
        assert (out / name).stat().st_size > 0
    text = (out / "defence.md").read_text()
    assert "| `captum.saliency` |" in text and "Not run: pattern.attribution fine-tuned" in text
    return text


def test_matched_sigma_is_theorem_2_of_the_paper():
    assert bench.matched_stdev(1.0) == pytest.approx(0.6931472 * 2.5066283, rel=1e-6)
    assert bench.matched_stdev(10.0) == pytest.approx(0.17374, abs=1e-5)
    assert bench.defend.matched_beta(bench.matched_stdev(3.0)) == pytest.approx(3.0)


def test_defence_grid_has_every_defence_and_leaves_out_what_cannot_run(image_folder):  # noqa
    grid = bench.make_defence_grid(pairs=image_folder, **SMALL)
    labels = [m.label() for m in grid.methods]
    assert labels == ["captum.saliency", "captum.saliency β=10",
                      "captum.saliency fine-tuned (cifar_vgg_robust)", "pattern.attribution",
                      "pattern.attribution β=10", "captum.smoothgrad samples=2 σ=0.173746"]
    # the shipped patterns fit the bundled weights only: said, not run
    assert list(grid.skipped) == ["pattern.attribution fine-tuned (cifar_vgg_robust)"]
    assert "patterns" in grid.skipped["pattern.attribution fine-tuned (cifar_vgg_robust)"]
    assert [column_of(m) for m in grid.methods] == ["none", "β=10", "fine-tuned (cifar_vgg_robust)",
                                                   "none", "β=10", "β=10"]
    assert grid.kind == "defend" and grid.to_json()["skipped"] == grid.skipped
    with pytest.raises(ManipBenchError, match="one model"):
        bench.make_defence_grid(pairs=image_folder, **dict(SMALL, model="cifar_vgg,cifar_resnet"))


def _labelled_folder(root):
    """A tiny CIFAR-10-style ImageFolder tree: two bundled photos per class folder."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
    for i, name in enumerate(classes):
        for photo in ("chelsea", "coffee")[: 1 + i % 2]:
            data.save_image(data.load_image(photo, 32), root / name / f"{photo}.png")
    return root


def test_defend_runs_resumes_and_reports_robustness_beside_cost(image_folder, tmp_path):  # noqa
    grid = bench.make_defence_grid(pairs=image_folder, **SMALL)
    out, seen = tmp_path / "defend", []
    with pytest.raises(KeyboardInterrupt):
        bench.run_grid(grid, out, batch_size=1, device="cpu", on_rows=interrupt_after(3, seen))
    kept = bench.read_results(out)
    assert [row_key(r) for r in kept] == [row_key(r) for r in seen]
    summary = bench.run_grid(bench.make_defence_grid(pairs=image_folder, **SMALL), out,
                             batch_size=1, device="cpu")
    rows = read_rows(summary.results_file)
    assert summary.written == 12 - len(kept) and len({row_key(r) for r in rows}) == 12
    assert all(row in rows for row in kept)  # finished rows kept as they were

    folder = _labelled_folder(tmp_path / "labelled")
    result = bench.report(out, figures=True, accuracy_data=folder)
    entries = {(e["method"], e["defence"]): e for e in result["defence"]}
    assert set(entries) == {("captum.saliency", "none"), ("captum.saliency", "β=10"),
                            ("captum.saliency", "fine-tuned (cifar_vgg_robust)"),
                            ("pattern.attribution", "none"), ("pattern.attribution", "β=10"),
                            ("SmoothGrad (matched σ)", "β=10")}
    none = entries[("captum.saliency", "none")]
    assert none["similarity"] == pytest.approx(1.0) and none["n"] == 2
    assert all(0 < e["similarity"] < 0.999 for key, e in entries.items()
               if key[1] != "none")  # every defence changes the clean map
    assert all(math.isfinite(e["target_pcc"]) and math.isfinite(e["deletion_gap"])
               for e in entries.values())
    # accuracy of the explained network, per defence, on the labelled folder
    assert 0 <= none["accuracy"] <= 1
    assert entries[("SmoothGrad (matched σ)", "β=10")]["accuracy"] == none["accuracy"]
    assert "Test accuracy" in assert_defence_report(out)
    # costs are kept and reused; the same numbers come back
    stored = json.loads((out / "costs.json").read_text())
    assert costs_module.costs(out) == stored


def test_costs_compare_with_the_undefended_map_and_score_deletion(image_folder, tmp_path):  # noqa
    grid = bench.make_defence_grid(pairs=image_folder, **dict(SMALL, attributors="captum.saliency",
                                                               finetuned=""))
    out = tmp_path / "defend"
    bench.run_grid(grid, out, batch_size=2, device="cpu")
    result = costs_module.compute_costs(out)
    by_label = {e["label"]: e for e in result["methods"]}
    # recompute one entry by hand: the β=10 map against the plain saliency map
    from manip_bench import attributors, defences, heatmaps, models
    model = models.load("cifar_vgg")
    originals = list(dict.fromkeys(o for o, _ in grid.pairs))
    x = data.load_batch(originals, 32)
    target = model(x).argmax(1)
    plain = heatmaps.heatmap(attributors.create("captum.saliency", model)(x, target)[1].detach())
    smooth = heatmaps.heatmap(attributors.create(
        "captum.saliency", defences.beta_smooth(model, 10))(x, target)[1].detach())
    entry = by_label["captum.saliency β=10"]
    assert len(originals) == 2  # the median of two values is their mean
    assert entry["similarity"] == pytest.approx(
        sum(metrics.map_similarity(smooth, plain)["pcc"]) / 2, abs=1e-6)
    assert entry["deletion_gap"] == pytest.approx(
        sum(metrics.deletion_gap(model, x, smooth, target)) / 2, abs=1e-6)
    assert result["accuracy"] == {}  # no labelled folder given


def test_cli_defend_refuses_bad_input(capsys):
    assert_cli_error(capsys, ["defend", "--betas", "0", "--n", "1"], "positive")
    assert_cli_error(capsys, ["defend", "--finetuned", "nope", "--n", "1"], "no such zoo model")


@pytest.mark.slow  # 57 s on the loaded 2-core machine (report, figures, costs)
def test_cli_defend_tiny_run_writes_the_defence_table(image_folder, tmp_path, capsys):  # noqa
    """``manip-bench defend`` end to end: one pair, one iteration, one beta."""
    out = tmp_path / "defend"
    assert cli.main(["defend", "--attributors", "captum.saliency,pattern.attribution",
                     "--betas", "10", "--samples", "2", "--n", "1", "--iterations", "1",
                     "--device", "cpu", "--pairs", str(image_folder), "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "left out: pattern.attribution fine-tuned (cifar_vgg_robust)" in printed
    assert "6 results" in printed
    rows = bench.read_results(out)
    assert len(rows) == 6 and all(row["iterations"] == 1 for row in rows)
    assert "| `pattern.attribution` |" in assert_defence_report(out)
