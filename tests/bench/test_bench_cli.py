"""`manip-bench bench`, `report` and `smooth` end to end, and their errors."""
import csv
import json
import urllib.error

import pytest
import torchvision.datasets.cifar

from bench_fixtures import image_folder  # noqa: F401 - fixture
from helpers import assert_cli_error
from manip_bench import bench, cli, data
from test_data import tiny_cifar10  # noqa: F401 - fixture (tests/test_data.py)

TINY = ["--attributors", "captum.saliency,zennit.epsilon", "--n", "3", "--iterations", "2",
        "--device", "cpu"]


def test_bench_then_report(image_folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert cli.main(["bench", *TINY, "--pairs", str(image_folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 results" in printed and "zennit.epsilon" in printed and "summary.csv" in printed
    assert len(bench.read_results(out)) == 6
    (out / "summary.csv").unlink()
    assert cli.main(["report", str(out), "--no-figures"]) == 0
    with open(out / "summary.csv") as file:
        assert len(list(csv.DictReader(file))) == 2
    # the same command resumes (nothing left); another configuration is refused
    assert cli.main(["bench", *TINY, "--pairs", str(image_folder), "--out", str(out)]) == 0
    assert len(bench.read_results(out)) == 6
    capsys.readouterr()
    assert cli.main(["bench", *TINY, "--pairs", str(image_folder), "--out", str(out),
                     "--budget", "4/255"]) == 2
    captured = capsys.readouterr()
    assert "different configuration" in captured.err and captured.err.count("\n") == 1
    assert "resumes" not in captured.out  # refused before announcing a resume
    rows = bench.read_results(out)
    assert {row["budget"]["norm"] for row in rows} == {"linf"}
    assert all(row["budget"]["eps"] == pytest.approx(8 / 255) for row in rows)
    assert {row["schedule"]["name"] for row in rows} == {"auto"}
    assert [loss["name"] for loss in rows[0]["losses"]] == ["target_map", "output"]


@pytest.mark.slow
def test_budgets_give_curves_and_a_score(image_folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "curves"
    assert cli.main(["bench", *TINY, "--attributors", "captum.saliency", "--pairs",
                     str(image_folder), "--budgets", "1/255,4/255,16/255", "--out",
                     str(out)]) == 0
    printed = capsys.readouterr().out
    assert "manipulability" in printed and "16/255" in printed
    assert len(bench.read_results(out)) == 9
    with open(out / "curves.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["budget"] for row in rows] == ["1/255", "4/255", "16/255"]
    assert len({row["score"] for row in rows}) == 1 and 0 <= float(rows[0]["score"]) <= 1
    assert (out / "curves.png").exists()


def test_old_results_without_budgets_are_still_reported(image_folder, tmp_path):  # noqa: F811
    out = tmp_path / "old"
    assert cli.main(["bench", *TINY, "--attributors", "captum.saliency", "--pairs",
                     str(image_folder), "--out", str(out)]) == 0
    for path in bench.results_files(out):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            for key in ("budget", "losses", "schedule"):
                del row[key]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = bench.report(out, figures=False)["summary"]
    assert summary[0]["budget"] == "unrecorded" and summary[0]["n"] == 3


def test_sharded_bench_writes_its_own_file(image_folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    argv = ["bench", *TINY, "--attributors", "captum.saliency", "--pairs", str(image_folder),
            "--out", str(out)]
    assert cli.main([*argv, "--shard", "1/2"]) == 0
    assert "manip-bench report" in capsys.readouterr().out
    assert [p.name for p in bench.results_files(out)] == ["results-rank1-of-2.jsonl"]
    assert_cli_error(capsys, ["bench", *TINY, "--shard", "0/2"], "--out")  # shards share --out


@pytest.mark.slow
def test_smooth_command(image_folder, tmp_path):  # noqa: F811
    out = tmp_path / "smooth"
    assert cli.main(["smooth", "--betas", "5", "--stdevs", "0.01", "--samples", "2", "--n", "1",
                     "--iterations", "1", "--device", "cpu", "--pairs", str(image_folder),
                     "--out", str(out)]) == 0
    assert (out / "smooth.png").exists() and (out / "smooth.csv").exists()
    assert len(bench.read_results(out)) == 3  # ReLU, beta 5, SmoothGrad


@pytest.mark.parametrize("argv, message", [
    (["bench", "--attributors", "captum.deconvolution"], "cannot be attacked"),
    (["bench", "--models", "vgg17"], "unknown model"),
    (["bench", "--n", "1000"], "bundled images give"),
    (["bench", "--shard", "2/2"], "need 0 <= i < N"),
    (["report", "/no/such/folder"], "no such results folder"),
    (["bench", "--budget=-8/255"], ">= 0"),
    (["bench", "--budget", "lots"], "number or a fraction"),
    (["bench", "--budgets", "1/255,2"], "exceeds the image range"),
    (["bench", "--loss", "ssim"], "unknown loss"),
    (["bench", "--budgets", "1/255", "--budget", "2/255"], "not both"),
])
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, tmp_path, capsys):
    assert_cli_error(capsys, [*argv, *(["--out", tmp_path / "x"] if argv[0] != "report" else [])],
                     message)


def test_csv_with_a_missing_file_names_the_row(image_folder, tmp_path, capsys):  # noqa: F811
    table = tmp_path / "pairs.csv"
    table.write_text(f"original,target\n{image_folder}/chelsea.png,{image_folder}/coffee.png\n"
                     f"{image_folder}/missing.png,{image_folder}/coffee.png\n")
    assert_cli_error(capsys, ["bench", "--attributors", "captum.saliency", "--pairs", table,
                              "--out", tmp_path / "run"], "row 2", "missing.png")
    assert not (tmp_path / "run").exists()


def test_bench_on_cifar10_in_torchvision_format(tiny_cifar10, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert cli.main(["bench", "--attributors", "captum.saliency", "--n", "3", "--iterations", "2",
                     "--device", "cpu", "--pairs", "cifar10", "--data-root", str(tiny_cifar10),
                     "--out", str(out)]) == 0
    assert "3 results" in capsys.readouterr().out
    rows = bench.read_results(out)
    assert len(rows) == 3
    batches = tiny_cifar10 / data.CIFAR10_FOLDER
    assert all(row[key].startswith(f"{batches / 'test_batch'}#") for row in rows
               for key in ("original", "target"))
    grid = json.loads((out / "config.json").read_text())["grid"]
    assert grid["pair_source"] == str(batches)
    assert [tuple(pair) for pair in grid["pairs"]] == data.cifar10_pairs(3, 0, root=tiny_cifar10)


def test_cifar10_absent_offline_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the default root: empty
    err = assert_cli_error(capsys, ["bench", "--attributors", "captum.saliency", "--pairs",
                                    "cifar10", "--out", tmp_path / "run"])
    assert err.startswith(f"error: CIFAR-10 not found in {tmp_path / 'cache' / 'manip_bench'}")
    assert "cifar-10-batches-py" in err and torchvision.datasets.CIFAR10.url in err
    assert not (tmp_path / "run").exists()
