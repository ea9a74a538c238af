"""Principal curvatures of level sets (manip_bench.geometry): against dense algebra, against
surfaces whose curvatures are known, the bound along paths, errors, and the CLI command."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from manip_bench import ManipBenchError, ManipulationAttack, cli, geometry
from manip_bench import defences
from conftest import tiny_net
from helpers import assert_cli_error, assert_unchanged, snapshot

BETA = 5.0


def softplus_twin(model, beta):
    """The same network written out with nn.Softplus(beta) in place of every nn.ReLU."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta))
    return twin


def dense_curvatures(g, x, k):
    """Top-k eigenvalues (by magnitude) of -(1/|grad g|) P H P, from the dense Hessian."""
    flat = x.detach().reshape(-1)
    f = lambda z: g(z.view_as(x))[0]  # noqa: E731
    grad = torch.autograd.functional.jacobian(f, flat)
    hessian = torch.autograd.functional.hessian(f, flat)
    normal = grad / grad.norm()
    projector = torch.eye(len(flat), dtype=flat.dtype) - torch.outer(normal, normal)
    values = torch.linalg.eigvalsh(-projector @ hessian @ projector / grad.norm()).numpy()
    return values[np.argsort(-np.abs(values), kind="stable")][:k]


def test_lanczos_matches_the_dense_projected_hessian_of_a_tiny_network():
    model = tiny_net()  # float64 ReLU CNN, input 3 x 6 x 6
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    result = geometry.principal_curvatures(model, x, k=5, beta=BETA, dtype=torch.float64)
    twin = softplus_twin(model, BETA)
    for i in range(2):
        target = result.target[i]
        expected = dense_curvatures(lambda z: twin(z)[:, target], x[i:i + 1], 5)
        np.testing.assert_allclose(result.values[i], expected, rtol=1e-6)
        assert result.products[i] < 108  # fewer products than a dense Hessian needs
    np.testing.assert_allclose(result.lambda_max, np.abs(result.values[:, 0]))


def test_float32_model_in_float64_leaves_the_callers_model_alone():
    model = tiny_net().float()
    before = snapshot(model)
    x = torch.rand(1, 3, 6, 6)
    result = geometry.principal_curvatures(model, x, k=3, beta=BETA, dtype="float64")
    twin = softplus_twin(model, BETA).double()
    expected = dense_curvatures(lambda z: twin(z)[:, result.target[0]], x.double(), 3)
    np.testing.assert_allclose(result.values[0], expected, rtol=1e-6)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_unchanged(model, before)  # also: every parameter still requires grad, no SmoothReLU


@pytest.mark.parametrize("dim, k", [(3, 2), (20, 4)])
def test_sphere_has_every_curvature_minus_one_over_r(dim, k):
    torch.manual_seed(dim)
    center = torch.randn(dim, dtype=torch.float64)
    radius = 2.5
    direction = torch.randn(dim, dtype=torch.float64)
    x = (center + radius * direction / direction.norm())[None]
    result = geometry.curvatures(lambda z: (z - center).norm(dim=1), x, k=k)
    np.testing.assert_allclose(result.values[0], np.full(k, -1 / radius), rtol=1e-8)
    np.testing.assert_allclose(result.grad_norm, [1.0])


def test_ellipsoid_vertex_curvatures():
    # x^2/a^2 + y^2/b^2 + z^2/c^2 = 1 at (a, 0, 0): curvatures a/b^2 and a/c^2 (outward: minus)
    axes = torch.tensor([1.5, 0.8, 2.0], dtype=torch.float64)
    g = lambda z: (z / axes).pow(2).sum(1)  # noqa: E731
    x = torch.tensor([[1.5, 0.0, 0.0]], dtype=torch.float64)
    result = geometry.curvatures(g, x, k=2)
    np.testing.assert_allclose(result.values[0], [-1.5 / 0.8 ** 2, -1.5 / 2.0 ** 2], rtol=1e-8)


def test_rotated_saddle_quadric_in_30_dimensions():
    # g(x) = 1/2 sum_i c_i y_i^2 - y_n with y = Q x: at 0 the normal is -y_n, curvatures -c_i
    torch.manual_seed(0)
    dim = 30
    c = torch.linspace(-3.0, 2.0, dim - 1, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))

    def g(z):
        y = z @ q.T
        return 0.5 * (c * y[:, :-1] ** 2).sum(1) - y[:, -1]

    result = geometry.curvatures(g, torch.zeros(1, dim, dtype=torch.float64), k=5)
    expected = sorted((-c).tolist(), key=lambda v: -abs(v))[:5]
    np.testing.assert_allclose(result.values[0], expected, rtol=1e-8)


def test_flat_level_sets_have_zero_curvature():
    result = geometry.curvatures(lambda z: z @ torch.arange(1.0, 6.0), torch.rand(2, 5), k=2)
    assert not result.values.any()


def test_batched_hvp_equals_one_point_at_a_time():
    model = tiny_net()
    torch.manual_seed(1)
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    explain = geometry.prepare(model, BETA)
    target = torch.tensor([0, 2, 1])
    batch = geometry.LevelSet(geometry.logit(explain.model, target), x)
    v = torch.randn_like(x)
    together = batch.shape_operator(v)
    for i in range(3):
        alone = geometry.LevelSet(geometry.logit(explain.model, target[i:i + 1]), x[i:i + 1])
        torch.testing.assert_close(alone.shape_operator(v[i:i + 1])[0], together[i])
        torch.testing.assert_close(alone.normal_turning(), batch.normal_turning()[i:i + 1])
    # L is symmetric and maps into the tangent space
    w = torch.randn_like(x)
    torch.testing.assert_close((batch.shape_operator(v) * w).sum(),
                               (v * batch.shape_operator(w)).sum())
    torch.testing.assert_close((batch.normal * together).flatten(1).sum(1),
                               torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_seeded_and_reproducible(plain_cnn, images):
    a = geometry.principal_curvatures(plain_cnn, images[:1], k=3, beta=10.0, seed=3, tol=1e-3)
    b = geometry.principal_curvatures(plain_cnn, images[:1], k=3, beta=10.0, seed=3, tol=1e-3)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.beta == 10.0 and a.target == plain_cnn(images[:1]).argmax(1).tolist()


def test_curvature_vs_beta_keeps_the_relu_class(plain_cnn, images):
    sweep = geometry.curvature_vs_beta(plain_cnn, images[:1], betas="2,20", k=2, tol=1e-3)
    assert [r.beta for r in sweep] == [2.0, 20.0]
    assert sweep[0].target == sweep[1].target == plain_cnn(images[:1]).argmax(1).tolist()


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_clear_errors(plain_cnn, images):
    with pytest.raises(ManipBenchError, match="zero curvature even at Softplus"):
        geometry.principal_curvatures(Linear(), images[:1], k=2, beta=5.0)
    with pytest.raises(ManipBenchError, match="zero curvature.*pass beta"):
        geometry.principal_curvatures(plain_cnn, images[:1], k=2)
    with pytest.raises(ManipBenchError, match="k must be a whole number from 1 to 767"):
        geometry.principal_curvatures(plain_cnn, images[:1], k=768, beta=5.0)
    with pytest.raises(ManipBenchError, match="k must be"):
        geometry.principal_curvatures(plain_cnn, images[:1], k=0, beta=5.0)
    with pytest.raises(ManipBenchError, match=r"shape \(N, C, H, W\)"):
        geometry.principal_curvatures(plain_cnn, images[0], k=2, beta=5.0)
    with pytest.raises(ManipBenchError, match="input of shape"):
        geometry.principal_curvatures(plain_cnn, torch.rand(1, 3, 8, 8), k=2, beta=5.0)
    with pytest.raises(ManipBenchError, match="class index"):
        geometry.principal_curvatures(plain_cnn, images[:1], target=7, k=2, beta=5.0)
    with pytest.raises(ManipBenchError, match="beta must be positive"):
        geometry.principal_curvatures(plain_cnn, images[:1], k=2, beta=-1.0)
    with pytest.raises(ManipBenchError, match="float32 or float64"):
        geometry.principal_curvatures(plain_cnn, images[:1], k=2, beta=5.0, dtype="half")
    with pytest.raises(ManipBenchError, match="betas must be"):
        geometry.parse_betas("1,x")
    with pytest.raises(ManipBenchError, match="gradient is zero"):
        geometry.curvatures(lambda z: z.pow(2).sum(1), torch.zeros(1, 4), k=2)


def random_walk(x, steps=30, size=0.01, seed=0):
    generator = torch.Generator().manual_seed(seed)
    moves = torch.randn((steps,) + tuple(x.shape), generator=generator, dtype=x.dtype)
    moves = size * moves / moves.flatten(2).norm(dim=2).view(steps, -1, *[1] * (x.dim() - 1))
    return torch.cat([x[None], x[None] + moves.cumsum(0)])


def smooth_tiny_net():
    """A float64 ReLU CNN without max-pooling: twice differentiable once softplus is set."""
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()


def test_bound_holds_on_the_level_set_and_the_general_bound_off_it():
    model = smooth_tiny_net()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 1])
    path = random_walk(x)
    free = geometry.trajectory_bound(model, path, target, BETA, sample_every=1)
    np.testing.assert_allclose(free["length"], [0.3, 0.3], rtol=1e-9)
    assert all(a <= b for a, b in zip(free["normal_length"], free["length"]))
    assert all(a <= b + 1e-12 for a, b in zip(free["normal_change"], free["turning"]))
    assert all(r <= 1 for r in free["general_ratio"]), free["general_ratio"]
    assert free["pool_switch_steps"] == [0, 0]
    assert free["steps_over_1"] == [0, 0]
    on, residual = geometry.level_set_path(model, path, target, BETA)
    assert residual.max() < 1e-9
    bound = geometry.trajectory_bound(model, on, target, BETA, sample_every=1)
    assert all(r <= 1 for r in bound["ratio"]), bound["ratio"]
    assert max(np.abs(bound["output_change"])) < 1e-9
    assert max(np.divide(bound["normal_length"], bound["length"])) < 0.05


def test_max_pool_switches_are_where_the_normal_jumps():
    model = tiny_net()  # max-pooling: softplus leaves its kinks in place
    torch.manual_seed(2)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    path = random_walk(x)
    bound = geometry.trajectory_bound(model, path, torch.tensor([0, 1]), BETA, sample_every=5)
    switches = geometry.pool_switches(geometry.prepare(model, BETA).model, path)
    assert switches.shape == (30, 2)
    assert bound["pool_switch_steps"] == (switches > 0).sum(0).tolist()
    assert bound["ratio"][0] <= 1 < bound["ratio"][1]  # path 1 crosses max-pool kinks
    for i in range(2):  # the steps that break the bound are exactly the max-pool switches
        over = [t for t, r in enumerate(bound["step_ratio"][i]) if r > 1]
        assert over == (switches[:, i] > 0).nonzero().flatten().tolist()
    assert bound["steps_over_1"] == [0, 2]
    jump, smooth = geometry.step_diagnostics(model, path, torch.tensor([0, 1]), BETA,
                                             [(29, 1), (5, 1)], substeps=8)
    assert jump["pool_switches"] > 0 and jump["largest_substep"] > 0.8
    assert jump["hessian_share"] < 0.1 and jump["local_ratio"] > 1
    assert smooth["pool_switches"] == 0 and smooth["local_ratio"] < 1
    assert smooth["hessian_share"] == pytest.approx(1, abs=0.01)
    assert smooth["largest_substep"] < 0.3


def test_record_trajectory_follows_the_attack(plain_cnn, images):
    attack = ManipulationAttack(defences.beta_smooth(plain_cnn, 5.0), "captum.saliency", iterations=3)
    target_map = attack.target_maps(images[1:])
    trajectory = geometry.record_trajectory(attack, images[:2], target_map)
    assert trajectory.points.shape == (4, 2, 3, 16, 16)
    torch.testing.assert_close(trajectory.points[0], images[:2])
    assert (trajectory.points[1:] != trajectory.points[:-1]).any()
    assert (trajectory.points - images[:2]).abs().max() <= 8 / 255 + 1e-6
    assert len(trajectory.target_pcc) == 2 and trajectory.beta == 5.0
    assert trajectory.target.tolist() == attack.evaluate(images[:2])[0].argmax(1).tolist()


def test_toy_normal_field_is_unit_and_smooth_for_softplus():
    net = geometry.toy_network()
    xs, ys, g, h = geometry.normal_field(net, 3.0, resolution=9)
    assert g.shape == (9, 9) and h.shape == (9, 9, 2)
    np.testing.assert_allclose(np.linalg.norm(h, axis=2), 1.0, rtol=1e-5)
    twin = softplus_twin(net, 3.0)
    point = torch.tensor([[xs[4], ys[2]]], requires_grad=True)
    (grad,) = torch.autograd.grad(twin(point).sum(), point)
    np.testing.assert_allclose(h[2, 4], (grad / grad.norm())[0].numpy(), rtol=1e-5)
    assert type(net[1]) is nn.ReLU  # the caller's toy network keeps its ReLU


def test_cli_geometry_writes_json_and_figures(tmp_path, capsys):
    out = tmp_path / "geometry"
    assert cli.main(["geometry", "--betas", "5,50", "--k", "2", "--tol", "1e-3",
                     "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    record = json.loads((out / "geometry.json").read_text())
    assert {p.name for p in out.iterdir()} == {"geometry.json", "curvature_vs_beta.png",
                                             "toy_level_sets.png"}
    assert record["betas"] == [5.0, 50.0] and record["k"] == 2
    assert record["image"] == "chelsea" and record["model"] == "cifar_vgg"
    curvatures = [row["curvatures"] for row in record["results"]]
    assert len(curvatures) == 2 and all(len(c) == 2 for c in curvatures)
    assert abs(curvatures[1][0]) > abs(curvatures[0][0])  # sharper at beta 50 than at 5
    assert "lambda_max" in printed and record["target_class"] in printed


def test_cli_geometry_errors(tmp_path, capsys):
    assert_cli_error(capsys, ["geometry", "--k", "5000", "--betas", "5", "--out", tmp_path / "a"],
                     "k must be a whole number from 1 to 3071")
    assert not (tmp_path / "a").exists()
    assert_cli_error(capsys, ["geometry", "--betas", "0", "--out", tmp_path / "b"],
                     "betas must be positive")
