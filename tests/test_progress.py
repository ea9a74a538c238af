"""``progress.reporter``: silent, callback, someone else's Progress, or its own rich bar."""
import io
import math

import pytest
import torch

from conftest import PlainCNN
from manip_bench import progress
from manip_bench.attack import ManipulationAttack


class NotATerminal(io.StringIO):
    def isatty(self):
        return False


class FakeProgress:
    """Records what a ``rich.progress.Progress`` would be asked to do."""

    def __init__(self):
        self.calls = []

    def add_task(self, description, total=None, **fields):
        self.calls.append(("add_task", description, total, fields))
        return 7

    def update(self, task, **kwargs):
        self.calls.append(("update", task, kwargs))

    def remove_task(self, task):
        self.calls.append(("remove_task", task))


def test_none_is_silent_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    stream = NotATerminal()
    monkeypatch.setattr("sys.stderr", stream)
    assert not progress.interactive()
    with progress.reporter(None, "attack", 3) as advance:
        for step in range(3):
            advance(loss=1.0 / (step + 1))
    assert stream.getvalue() == ""
    assert capsys.readouterr().out == ""


def test_false_is_silent(capsys):
    with progress.reporter(False, "attack", 2) as advance:
        advance(loss=0.5)
        advance(loss=0.25)
    assert capsys.readouterr() == ("", "")


def test_a_callable_gets_one_based_steps_the_total_and_the_stats():
    seen = []
    with progress.reporter(lambda *args: seen.append(args), "attack", 3) as advance:
        advance(loss=0.5)
        advance(loss=0.25, beta=10.0)
        advance()
    assert seen == [(1, 3, {"loss": 0.5}), (2, 3, {"loss": 0.25, "beta": 10.0}), (3, 3, {})]


def test_a_progress_display_gets_a_task_that_is_removed_after():
    display = FakeProgress()
    with progress.reporter(display, "attack", 2, loss=math.inf) as advance:
        advance(loss=0.5)
        advance(loss=0.25)
    assert display.calls == [
        ("add_task", "attack", 2, {"loss": math.inf}),
        ("update", 7, {"advance": 1, "loss": 0.5}),
        ("update", 7, {"advance": 1, "loss": 0.25}),
        ("remove_task", 7),
    ]


def test_the_task_is_removed_when_the_loop_raises():
    display = FakeProgress()
    with pytest.raises(RuntimeError, match="boom"):
        with progress.reporter(display, "attack", 5) as advance:
            advance(loss=1.0)
            raise RuntimeError("boom")
    assert display.calls[0][:3] == ("add_task", "attack", 5)
    assert display.calls[0][3] == {"loss": pytest.approx(math.nan, nan_ok=True)}  # the default
    assert display.calls[-1] == ("remove_task", 7)


@pytest.mark.parametrize("value", ["yes", 3, 2.5, object()])
def test_other_values_are_a_type_error(value):
    with pytest.raises(TypeError, match="progress must be None, a bool, a callable"):
        with progress.reporter(value, "attack", 1):
            pass


def test_true_draws_a_rich_bar(monkeypatch):
    from rich.console import Console

    screen = io.StringIO()
    draw = progress.rich_bar
    monkeypatch.setattr(progress, "rich_bar", lambda console=None, fields=("loss",): draw(
        Console(file=screen, force_terminal=True, width=100), fields))
    with progress.reporter(True, "attack", 3) as advance:
        for step in range(3):
            advance(loss=0.5 / (step + 1))
    drawn = screen.getvalue()
    assert "attack" in drawn and "3/3" in drawn and "loss 0.167" in drawn


def test_the_attack_calls_its_progress_callback_once_per_iteration():
    torch.manual_seed(0)
    model = PlainCNN().eval()
    x, x_target = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    seen = []
    attack = ManipulationAttack(model, "captum.saliency", iterations=3,
                                progress=lambda *args: seen.append(args))
    result = attack(x, attack.target_maps(x_target))
    assert [(step, total) for step, total, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [stats["loss"] for _, _, stats in seen] == pytest.approx(result.history["loss"])


# --- progress where a person waits (issue 29) ---------------------------------------------------

_CHECK_IN_A_TERMINAL = """
import torch
from torch import nn
from manip_bench import check_robustness
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 8 * 8, 3)).eval()
report = check_robustness("captum.saliency", torch.rand(2, 3, 8, 8), model=model, iterations=40)
print("score", report.score)
"""


def _run_in_a_pseudo_terminal(code):
    """Output (stdout and stderr on one pseudo-terminal) of ``python -c code``, not under pytest."""
    import os
    import pty
    import subprocess
    import sys
    from pathlib import Path

    leader, follower = pty.openpty()
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}
    env.update(OMP_NUM_THREADS="1", COLUMNS="120", TERM="xterm",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    child = subprocess.Popen([sys.executable, "-c", code], stdin=follower, stdout=follower,
                             stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert child.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_check_robustness_shows_a_bar_in_a_terminal():
    shown = _run_in_a_pseudo_terminal(_CHECK_IN_A_TERMINAL)
    assert "captum.saliency" in shown and "40/40" in shown and "━" in shown, shown
    assert "score" in shown


def test_check_robustness_prints_nothing_under_pytest(capfd):
    torch.manual_seed(0)
    model = PlainCNN().eval()
    from manip_bench import check_robustness
    check_robustness("captum.saliency", torch.rand(2, 3, 16, 16), model=model, iterations=3)
    assert capfd.readouterr() == ("", "")


def test_a_slow_first_step_warns_with_what_shortens_the_run(monkeypatch):
    import warnings
    torch.manual_seed(0)
    model = PlainCNN().eval()
    x, x_target = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    attack = ManipulationAttack(model, "captum.saliency", iterations=3, progress=False)
    target = attack.target_maps(x_target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a quick run: no warning
        attack(x, target)
    monkeypatch.setattr(progress, "LONG_RUN_SECONDS", 1e-6)
    with pytest.warns(progress.LongRunWarning, match=r"first of 3 steps took .* --iterations N"):
        attack(x, target)
