"""Bad input found by a new user (issue 29): one line and exit 2 from the command line and the
benchmark scripts, a ManipBenchError from Python, and ``-V``."""
import importlib.util
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.datasets.cifar
from captum.attr import Saliency

from manip_bench import ManipBenchError, __version__, check_robustness, cli, data, models

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys):
    """Standard error of the last command, asserted to be exactly one line, no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", [
    ["run", "--iterations", "1"],
    ["bench", "--attributors", "captum.saliency", "--n", "1", "--iterations", "1"],
    ["smooth", "--n", "1", "--iterations", "1", "--betas", "5", "--stdevs", ""],
    ["geometry", "--betas", "5", "--k", "1"],
])
@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_that_is_a_file_is_one_line(command, where, tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    out = taken if where == "file" else taken / "results"
    assert cli.main([*command, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"--out {out}" in err and "not a folder" in err
    assert taken.read_text() == "mine" and sorted(tmp_path.iterdir()) == [taken]


def test_check_json_under_a_file_is_refused_before_the_work(tmp_path, capsys):
    images = tmp_path / "images"
    for name in ("chelsea", "coffee"):
        data.save_image(data.load_image(name, 32), images / f"{name}.png")
    (tmp_path / "file").write_text("mine")
    for path, says in ((tmp_path / "file" / "report.json", "which is a file"),
                       (images, "is a folder")):
        assert cli.main(["check", str(images), "--n", "2", "--iterations", "1", "--json",
                         str(path)]) == 2
        assert says in one_error_line(capsys)
        assert capsys.readouterr().out == ""  # refused before the report, not after


def test_an_image_size_the_model_does_not_take_names_the_size_it_does():
    model = models.load("cifar_vgg")  # a dense head for 32x32 inputs
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ManipBenchError, match=r"does not run on 64×64 images .* runs on 32×32"):
        check_robustness(Saliency(model), x)
    from manip_bench import ManipulationAttack
    attack = ManipulationAttack(model, "captum.saliency", iterations=1)
    with pytest.raises(ManipBenchError, match="runs on 32×32"):
        attack.target_maps(x)
    # a model that runs on none of the common sizes: the error says what was tried
    picky = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 30 * 30, 2))
    with pytest.raises(ManipBenchError, match="nor on square 3-channel images of the sizes"):
        check_robustness("captum.saliency", torch.rand(2, 3, 31, 31), model=picky)


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["-V"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"manip-bench {__version__}"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv", [
    ("schedule_comparison", ["--pairs", "cifar10", "--n", "2", "--out", "OUT"]),
    ("untargeted_topk", ["--images", "cifar10", "--n", "2"]),
    ("geometry_study", ["--pairs", "cifar10", "--n", "2", "--out", "OUT"]),
])
def test_benchmark_scripts_offline_cifar10_is_one_line(script, argv, tmp_path, monkeypatch,
                                                       capsys):
    from manip_bench.errors import command

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path / "empty"))
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert command(_script(script).main, argv) == 2
    assert "CIFAR-10 not found" in one_error_line(capsys)


def test_a_benchmark_script_run_as_a_program_shares_the_cli_handling(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "schedule_comparison.py"), "--pairs",
         str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "no such folder or CSV file" in done.stderr
