"""Step rules: the budget-tied schedule halves its step when progress stalls; Adam is Adam."""
import pytest
import torch

from manip_bench import ManipBenchError, schedule
from manip_bench.threat import Budget


def run(steps, losses_fn, iterations, budget="linf:0.5", **options):
    """Drive a schedule by hand on x in R^(N,1,1,2); returns the schedule and x."""
    rule = schedule.BudgetSchedule(**options)
    x = torch.full((2, 1, 1, 2), 0.5)
    x_adv = x.clone()
    budget = Budget.parse(budget)
    rule.start(x_adv, budget, iterations)
    best_x, best_loss = x.clone(), losses_fn(x)
    history = []
    for step in range(1, iterations + 1):
        x_adv.requires_grad_(True)
        loss = losses_fn(x_adv)
        (gradient,) = torch.autograd.grad(loss.sum(), x_adv)
        x_adv = x_adv.detach()
        better = loss.detach() < best_loss
        best_x[better], best_loss[better] = x_adv[better], loss.detach()[better]
        rule.update(x_adv, gradient, loss)
        budget.project(x_adv, x)
        rule.checkpoint(step, x_adv, best_x, best_loss)
        history.append(rule.step_size.clone())
    return rule, x_adv, history


def test_step_halves_on_a_stalled_problem_and_not_on_a_steady_one():
    """Image 0: a loss the budget cuts off (it stalls at the edge); image 1: a slope it can
    keep descending within the iterations."""
    def loss(x):
        stalled = (x[0] - 2.0).square().sum()        # optimum far outside the ball
        steady = -x[1].sum() * 1e-3                    # falls at every step...
        return torch.stack([stalled, steady])

    rule, x_adv, history = run(None, loss, iterations=40, budget="linf:0.5", decay=0.0)
    assert rule.checkpoints and history[0][0] == pytest.approx(0.25)
    assert history[-1][0] < history[0][0] / 4     # image 0 was halved repeatedly
    assert x_adv[0].max() == pytest.approx(1.0)    # and sits at the budget's edge


def test_halving_is_per_image():
    def loss(x):  # image 0 oscillates around its optimum, image 1 improves at every step
        return torch.stack([(x[0] - 0.52).abs().sum(), -x[1].sum()])

    rule, x_adv, history = run(None, loss, iterations=20, budget="linf:0.45", decay=0.0,
                               initial_step=0.05)
    first = rule.checkpoints[0] - 1
    assert history[first - 1].tolist() == pytest.approx([0.0225, 0.0225])
    assert history[first].tolist() == pytest.approx([0.01125, 0.0225])


def test_checkpoints_follow_apgd_and_keep_a_minimum_gap():
    assert schedule.checkpoints(100) == [22, 41, 56, 65, 73, 79, 84, 91]
    assert schedule.checkpoints(4) == []
    gaps = [b - a for a, b in zip(schedule.checkpoints(37), schedule.checkpoints(37)[1:])]
    assert min(gaps) >= 5


def test_decay_pulls_unneeded_pixels_back_to_the_original():
    def loss(x):  # only the first coordinate matters
        return -x[:, 0, 0, 0] * 1.0 + 0 * x.sum((1, 2, 3))

    _, with_decay, _ = run(None, loss, iterations=30, decay=0.3)
    assert with_decay[:, 0, 0, 0].min() == pytest.approx(1.0)
    assert torch.allclose(with_decay[:, 0, 0, 1], torch.full((2,), 0.5))


def test_schedules_by_name_and_errors():
    assert isinstance(schedule.create("auto"), schedule.BudgetSchedule)
    assert schedule.create("adam", lr=0.1).to_json() == {"name": "adam", "lr": 0.1}
    assert schedule.create("auto", initial_step=0.25).initial_step == 0.25
    for bad in (dict(name="sgd"), dict(name="adam"), dict(name="auto", initial_step=0)):
        with pytest.raises(ManipBenchError):
            schedule.create(**bad)
