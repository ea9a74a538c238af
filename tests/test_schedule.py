"""Step rules: the budget-tied schedule halves its step when progress stalls; Adam is Adam."""
import pytest
import torch

from manip_bench import ManipBenchError, schedule
from manip_bench.threat import Budget


def run(losses_fn, iterations, start=0.5, budget="linf:0.5", **options):
    """Drive a schedule by hand on x in R^(N,1,1,2), ``start`` per image (or one value).

    Returns the schedule, the final x, the per-step step sizes and the per-step losses."""
    rule = schedule.BudgetSchedule(**options)
    x = torch.as_tensor(start, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(2, 1, 1, 2).clone()
    x_adv = x.clone()
    budget = Budget.parse(budget)
    rule.start(x_adv, budget, iterations)
    best_x, best_loss = x.clone(), losses_fn(x)
    steps, losses = [], []
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
        steps.append(rule.step_size.clone())
        losses.append(loss.detach())
    return rule, x_adv, torch.stack(steps), torch.stack(losses)


def test_step_halves_on_a_stalled_problem_and_not_on_a_steady_one():
    """The same slope for both images; image 0 starts next to the [0, 1] box's edge and stalls
    there after 5 steps, image 1 starts in the middle and can keep descending for all 40."""
    def loss(x):
        return -x.sum((1, 2, 3))

    rule, x_adv, steps, losses = run(loss, iterations=40, start=[0.95, 0.5], decay=0.0,
                                     initial_step=0.02)
    assert rule.checkpoints == [8, 15, 21, 26, 30, 33, 35, 37, 39]
    assert steps[0].tolist() == pytest.approx([0.01, 0.01])
    # image 0: halved at every checkpoint from the first on, and it sits at the edge
    assert steps[-1, 0] == pytest.approx(0.01 / 2 ** 9)
    assert x_adv[0].min() == pytest.approx(1.0)
    # image 1: never halved, its loss fell at every step, it moved 40 full steps
    assert torch.all(steps[:, 1] == steps[0, 1])
    assert torch.all(losses[1:, 1] < losses[:-1, 1])
    assert x_adv[1].flatten().tolist() == pytest.approx([0.9, 0.9], abs=1e-5)


def test_halving_is_per_image():
    def loss(x):  # image 0 oscillates around its optimum, image 1 improves at every step
        return torch.stack([(x[0] - 0.52).abs().sum(), -x[1].sum()])

    rule, x_adv, steps, _ = run(loss, iterations=20, budget="linf:0.45", decay=0.0,
                                initial_step=0.05)
    first = rule.checkpoints[0] - 1
    assert steps[first - 1].tolist() == pytest.approx([0.0225, 0.0225])
    assert steps[first].tolist() == pytest.approx([0.01125, 0.0225])


def test_checkpoints_follow_apgd_rule():
    """Values derived by hand from APGD's rule (windows of 22 % of the run, then 3 % shorter
    each time, never under 6 %; lengths truncated, at least 1)."""
    # 100: windows 22, 19, 16, 13, 10, 7, 6, 6 (the next one, 6, would end at 105)
    assert schedule.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # 37: windows 8, 7, 6, 5, 4, 3, 2, 2 (shrink int(1.11) = 1, floor int(2.22) = 2)
    assert schedule.checkpoints(37) == [8, 15, 21, 26, 30, 33, 35, 37]
    # 500: windows 110, 95, 80, 65, 50, 35, 30, 30
    assert schedule.checkpoints(500) == [110, 205, 285, 350, 400, 435, 465, 495]
    # short runs: every window is 1 iteration long, as in APGD
    assert schedule.checkpoints(4) == [1, 2, 3, 4]
    assert schedule.checkpoints(0) == []


def test_decay_pulls_unneeded_pixels_back_to_the_original():
    def loss(x):  # only the first coordinate matters
        return -x[:, 0, 0, 0] * 1.0 + 0 * x.sum((1, 2, 3))

    _, with_decay, _, _ = run(loss, iterations=30, decay=0.3)
    assert with_decay[:, 0, 0, 0].min() == pytest.approx(1.0)
    assert torch.allclose(with_decay[:, 0, 0, 1], torch.full((2,), 0.5))


def test_schedules_by_name_and_errors():
    assert isinstance(schedule.create("auto"), schedule.BudgetSchedule)
    assert schedule.create("adam", lr=0.1).to_json() == {"name": "adam", "lr": 0.1}
    assert schedule.create("auto", initial_step=0.25).initial_step == 0.25
    for bad in (dict(name="sgd"), dict(name="adam"), dict(name="auto", initial_step=0)):
        with pytest.raises(ManipBenchError):
            schedule.create(**bad)
