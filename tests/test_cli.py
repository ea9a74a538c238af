"""`manip-bench run` and `list` end to end, and their error handling."""
import json

import pytest

from manip_bench import cli
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


def test_run_leaves_the_callers_random_stream_alone(tmp_path):
    import torch

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
    (["--iterations", "0"], "iterations must be at least 1"),
])
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", *argv, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
    assert not any(tmp_path.iterdir())


def test_offline_pretrained_weights_are_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert run_cli("run", "--model", "resnet18", "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "--weights random" in err and "Traceback" not in err


def test_existing_nonempty_out_is_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert run_cli("run", "--iterations", "1", "--out", str(tmp_path)) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_list_shows_attributors_models_and_presets(capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    for word in ("zennit.paper_lrp", "cifar_vgg", "vgg16", "cifar10"):
        assert word in out
