"""`manip-bench run` and `list` end to end, and their error handling."""
import json

import pytest
import torch

from helpers import assert_cli_error
from manip_bench import ManipulationAttack, cli, data, metrics, models
from manip_bench.experiment import CONTRACT_METRICS


def run_cli(*argv):
    return cli.main(list(argv))


def test_run_writes_a_valid_result(tmp_path):
    out = tmp_path / "run"
    assert run_cli("run", "--attributor", "zennit.epsilon", "--iterations", "5",
                   "--out", str(out)) == 0
    result = json.loads((out / "result.json").read_text())
    for key in ("attributor", "model", "iterations", "seconds", "metrics"):
        assert key in result
    assert result["attributor"] == "zennit.epsilon" and result["model"] == "cifar_vgg"
    assert result["iterations"] == 5
    assert set(CONTRACT_METRICS) <= set(result["metrics"])
    assert isinstance(result["metrics"]["class_kept"], bool)
    assert {p.name for p in out.iterdir()} == {"result.json", "overview.png", "manipulated.png",
                                             "manipulated.pt"}
    assert result["budget"] == {"norm": "linf", "eps": 8 / 255}
    assert result["schedule"]["name"] == "auto" and result["preset"] == "auto"
    assert [loss["name"] for loss in result["losses"]] == ["target_map", "output"]
    assert_saved_image_reproduces_the_record(out, result)


def assert_saved_image_reproduces_the_record(out, record):
    """``manipulated.pt`` reloaded: in the budget around the run's image, and explaining it
    again gives the class and the target PCC that result.json reports."""
    x_adv = torch.load(out / "manipulated.pt", weights_only=True)
    x = data.load_image(record["image"], 32)[None]
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    linf = (x_adv - x).abs().max().item()
    assert 0 < linf <= 8 / 255 + 1e-6
    assert linf == pytest.approx(record["metrics"]["input_linf"], abs=1e-6)
    attack = ManipulationAttack(models.load(record["model"]), record["attributor"])
    target_map = attack.target_maps(data.load_image(record["target_image"], 32)[None])
    original_class = attack.evaluate(x)[0].argmax(1)
    output, _, adversarial_map = attack.evaluate(x_adv, original_class)
    classes = models.class_names(record["model"])
    assert classes[original_class.item()] == record["original_class"]
    assert (output.argmax(1) == original_class).item() == record["metrics"]["class_kept"]
    pcc = metrics.map_similarity(adversarial_map, target_map)["pcc"][0]
    assert pcc == pytest.approx(record["metrics"]["expl_target_pcc"], abs=1e-4)


def test_run_says_what_it_did(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", "--iterations", "3", "--budget", "4/255", "--out", str(out)) == 0
    printed = " ".join(capsys.readouterr().out.split())
    result = json.loads((out / "result.json").read_text())
    for text in ("chelsea → coffee", f"{result['original_class']}: p = ", "L∞ 4/255",
                 "auto preset", "3 iterations", "the explanation now matches the target map "
                 "with PCC", "the image changed by at most", "class kept"):
        assert text in printed, text
    assert result["budget"]["eps"] == pytest.approx(4 / 255)
    assert result["metrics"]["input_linf"] <= 4 / 255 + 1e-6


def test_untargeted_run_and_the_paper_preset(tmp_path, capsys):
    out = tmp_path / "topk"
    assert run_cli("run", "--attributor", "captum.saliency", "--loss", "topk", "--iterations",
                   "3", "--out", str(out)) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "top pixels are still on top" in printed and "none (untargeted)" in printed
    assert "expl_target_pcc" not in json.loads((out / "result.json").read_text())["metrics"]
    paper = tmp_path / "paper"
    assert run_cli("run", "--preset", "paper", "--iterations", "3", "--out", str(paper)) == 0
    result = json.loads((paper / "result.json").read_text())
    assert result["budget"] == {"norm": "none", "eps": None} and result["preset"] == "lrp"
    assert result["schedule"] == {"name": "adam", "lr": pytest.approx(5e-5)}


def test_run_leaves_the_callers_random_stream_alone(tmp_path):
    from manip_bench import experiment

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    experiment.run(attributor="zennit.epsilon", out=tmp_path / "run", iterations=2)
    assert torch.equal(torch.rand(3), expected)


def test_run_with_a_target_map_and_a_gradient_method(tmp_path):
    out = tmp_path / "run"
    assert run_cli("run", "--attributor", "captum.saliency", "--target-map", "text",
                   "--iterations", "3", "--out", str(out)) == 0
    assert json.loads((out / "result.json").read_text())["target_map"] == "text"


@pytest.mark.parametrize("argv, message", [
    (["--image", "/no/such/file.png"], "/no/such/file.png"),
    (["--preset", "fastest"], "unknown preset"),
    (["--model", "vgg17"], "unknown model"),
    (["--attributor", "zennit.epsilom"], "Did you mean 'zennit.epsilon'"),
    (["--attributor", "captum.deconvolution"], "cannot be attacked"),
    (["--iterations", "0"], "iterations must be a whole number >= 1"),
    (["--budget=-1/255"], ">= 0"),
    (["--budget", "x/255"], "number or a fraction"),
    (["--budget", "300/255"], "exceeds the image range"),
    (["--loss", "center_of_mas"], "Did you mean 'center_of_mass'"),
    (["--loss", "topk", "--target-image", "coffee"], "untargeted"),
    (["--lr", "0.01"], "auto schedule ties its steps"),
])
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert_cli_error(capsys, ["run", *argv, "--out", out], message)
    assert not out.exists()
    assert not any(tmp_path.iterdir())


def test_offline_pretrained_weights_are_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert_cli_error(capsys, ["run", "--model", "resnet18", "--out", tmp_path / "run"],
                     "--weights random")


def test_existing_nonempty_out_is_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert_cli_error(capsys, ["run", "--iterations", "1", "--out", tmp_path], "not empty")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_list_shows_attributors_models_and_presets(capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    for word in ("zennit.paper_lrp", "cifar_vgg", "vgg16", "cifar10"):
        assert word in out


@pytest.mark.slow
def test_version_module_entry_and_defaults_in_help(capsys):
    import subprocess
    import sys

    from manip_bench import __version__
    with pytest.raises(SystemExit):
        run_cli("--version")
    assert capsys.readouterr().out.strip() == f"manip-bench {__version__}"
    with pytest.raises(SystemExit):
        run_cli("run", "--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: zennit.epsilon)" in help_text and "(default: auto)" in help_text
    done = subprocess.run([sys.executable, "-m", "manip_bench", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "usage: manip-bench" in done.stdout


def test_run_folder_has_ordinary_permissions(tmp_path):
    import os
    import stat
    out = tmp_path / "run"
    assert run_cli("run", "--iterations", "1", "--out", str(out)) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
