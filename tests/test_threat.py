"""Threat models: parsing, projection onto the ball and [0, 1], clear errors."""
import pytest
import torch

from manip_bench import ManipBenchError
from manip_bench.threat import Budget, format_value, parse_number


@pytest.mark.parametrize("text, norm, eps", [
    ("8/255", "linf", 8 / 255), ("linf:4/255", "linf", 4 / 255), ("0.03", "linf", 0.03),
    ("L2:0.5", "l2", 0.5), ("none", "none", None), (None, "none", None), (0.1, "linf", 0.1),
    ({"norm": "l2", "eps": 1.5}, "l2", 1.5),
])
def test_budgets_parse_from_text_numbers_and_dicts(text, norm, eps):
    budget = Budget.parse(text)
    assert budget.norm == norm and (budget.eps == pytest.approx(eps) if eps else budget.eps is None)
    assert Budget.parse(budget.to_json()) == budget


@pytest.mark.parametrize("text, message", [
    ("-1/255", ">= 0"), ("abc", "number or a fraction"), ("1/0", "number or a fraction"),
    ("0", "must be positive"), ("1.5", "exceeds the image range"), ("l1:0.3", "unknown budget"),
    ("nan", "number or a fraction"), ({"norm": "linf", "eps": float("inf")}, "finite"),
])
def test_bad_budgets_are_clear_errors(text, message):
    with pytest.raises(ManipBenchError, match=message):
        Budget.parse(text)


@pytest.mark.parametrize("spec", ["linf:8/255", "linf:0.3", "l2:0.5", "l2:3", "none"])
def test_projection_keeps_random_points_inside_the_ball_and_the_image_range(spec):
    torch.manual_seed(0)
    budget = Budget.parse(spec)
    x = torch.rand(16, 3, 8, 8)
    for scale in (0.01, 0.1, 1.0, 10.0):
        x_adv = budget.project(x + scale * torch.randn_like(x), x)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        delta = (x_adv - x).flatten(1)
        if budget.norm == "linf":
            assert delta.abs().max() <= budget.eps + 1e-7
        elif budget.norm == "l2":
            assert (delta.norm(dim=1) <= budget.eps + 1e-5).all()
    inside = (x + 0.5 * (budget.scale(x) if budget.bounded else 0.01) * torch.rand_like(x).sign()
              * (torch.rand_like(x) > 0.9)).clamp(0, 1)
    if budget.norm != "l2":  # a point already inside stays where it is
        assert torch.equal(budget.project(inside.clone(), x), inside)


def test_l2_projection_is_the_nearest_point_on_the_ball():
    x = torch.full((1, 1, 2, 2), 0.5)
    x_adv = budget_point = x + torch.tensor([0.3, 0.4, 0.0, 0.0]).view(1, 1, 2, 2)
    projected = Budget("l2", 0.25).project(x_adv.clone(), x)
    assert torch.allclose(projected - x, 0.5 * (budget_point - x))


def test_budget_sizes_labels_and_image_checks():
    assert Budget.parse("8/255").label() == "L∞ 8/255" and Budget("l2", 0.5).label() == "L2 0.5"
    assert format_value(16 / 255) == "16/255" and format_value(0.3) == "0.3"
    assert parse_number("2/255") == pytest.approx(2 / 255)
    delta = torch.zeros(2, 3, 4, 4)
    delta[0, 0, 0, 0], delta[1, 1, 1, 1] = 0.2, -0.1
    assert Budget("linf", 0.5).size(delta).tolist() == pytest.approx([0.2, 0.1])
    with pytest.raises(ManipBenchError, match="L2 budget"):
        Budget("l2", 10).check_image_size(torch.zeros(1, 3, 4, 4))  # sqrt(48) < 10
