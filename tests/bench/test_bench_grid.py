"""The grid runner: expected rows, resume after an interruption or a kill -9, sharding, config."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, requires_shared_data
from bench_fixtures import TINY, image_folder, interrupt_after, tiny_grid  # noqa: F401
from manip_bench import ManipBenchError, attributors, bench, data
from manip_bench.bench.results import ROW_FIELDS, read_rows, row_key
from manip_bench.experiment import CONTRACT_METRICS

ROW_KEYS = {"attributor", "model", "pair", "original", "target", "defence", "options",
            "preset", "iterations", "seconds", "explain_seconds", "metrics",  # the list
            "budget", "losses", "schedule"}  # how each result was made


def keys(rows):
    return [row_key(row) for row in rows]


def test_tiny_grid_writes_the_expected_rows(tiny_grid, tmp_path):
    out = tmp_path / "run"
    summary = bench.run_grid(tiny_grid, out, batch_size=2, device="cpu")
    assert (summary.written, summary.skipped, summary.total) == (6, 0, 6)
    rows = bench.read_results(out)
    assert len(rows) == 6 and len(set(keys(rows))) == 6
    assert {(r["attributor"], r["pair"]) for r in rows} == {
        (a, i) for a in ("captum.saliency", "zennit.epsilon") for i in range(3)}
    for row in rows:
        assert ROW_KEYS <= set(row) and set(row) == set(ROW_FIELDS)
        assert row["model"] == "cifar_vgg" and row["iterations"] == 3 and row["defence"] is None
        assert (row["original"], row["target"]) == tiny_grid.pairs[row["pair"]]
        assert set(CONTRACT_METRICS) <= set(row["metrics"])
        assert isinstance(row["metrics"]["class_kept"], bool)
    assert {r["preset"] for r in rows} == {"auto"}  # the default: no per-method tuning
    assert all(r["budget"] == {"norm": "linf", "eps": 8 / 255} for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["grid"] == tiny_grid.to_json() and config["seed"] == 0
    assert config["device"] == "cpu" and {"torch", "captum", "zennit"} <= set(config["versions"])
    examples = sorted(p.name for p in (out / "examples").iterdir())
    assert examples == ["captum.saliency__cifar_vgg__linf8.pt", "zennit.epsilon__cifar_vgg__linf8.pt"]
    example = bench.load_examples(out)[0]
    assert example["x_adv"].shape == (3, 32, 32) and example["target_map"].shape == (32, 32)
    # the same command again: nothing to do
    again = bench.run_grid(tiny_grid, out, batch_size=2, device="cpu")
    assert (again.written, again.skipped) == (0, 6)
    assert len(read_rows(out / "results.jsonl")) == 6


def test_the_callers_random_streams_are_left_alone(tiny_grid, tmp_path):
    import numpy as np
    import torch

    torch.manual_seed(123)
    np.random.seed(123)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    bench.run_grid(tiny_grid, tmp_path / "run", batch_size=3, device="cpu")
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_exception_after_k_rows_loses_nothing_on_resume(tiny_grid, tmp_path):
    out = tmp_path / "run"
    seen = []
    with pytest.raises(KeyboardInterrupt):
        bench.run_grid(tiny_grid, out, batch_size=1, device="cpu", on_rows=interrupt_after(2, seen))
    assert keys(bench.read_results(out)) == keys(seen)
    summary = bench.run_grid(tiny_grid, out, batch_size=1, device="cpu")
    assert (summary.written, summary.skipped) == (4, 2)
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 6 and len(set(keys(rows))) == 6


@pytest.mark.slow
def test_kill_9_midway_then_rerun_completes_the_grid(image_folder, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from manip_bench import bench
        grid = bench.make_grid(pairs={str(image_folder)!r}, **{dict(TINY, iterations=10)!r})
        bench.run_grid(grid, {str(out)!r}, batch_size=1, device="cpu", threads=1)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while not (results.exists() and results.read_bytes().count(b"\n") >= 1):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no result row appeared"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    kept = bench.read_results(out)
    assert 1 <= len(kept) < 6, "the kill should land midway"
    grid = bench.make_grid(pairs=image_folder, **dict(TINY, iterations=10))
    summary = bench.run_grid(grid, out, batch_size=1, device="cpu")
    rows = read_rows(results)
    assert summary.written == 6 - len(kept) and len(rows) == 6
    assert len(set(keys(rows))) == 6
    assert all(row in rows for row in kept)  # finished results kept as they were


def test_truncated_last_line_is_recomputed_on_resume(tiny_grid, tmp_path):
    out = tmp_path / "run"
    bench.run_grid(tiny_grid, out, batch_size=3, device="cpu")
    path = out / "results.jsonl"
    text = path.read_text()
    path.write_text(text[:len(text) - 40])  # the last row was being written when killed
    assert len(bench.read_results(out)) == 5
    summary = bench.run_grid(tiny_grid, out, batch_size=3, device="cpu")
    assert summary.written == 1
    rows = read_rows(path)
    assert len(rows) == 6 and len(set(keys(rows))) == 6
    assert all(json.loads(line) for line in path.read_text().splitlines())


def _comparable(rows):
    return [(row_key(r), r["original"], r["target"], r["iterations"], r["metrics"]) for r in rows]


def test_two_shards_merged_equal_the_unsharded_run(tiny_grid, tmp_path):
    bench.run_grid(tiny_grid, tmp_path / "whole", batch_size=3, device="cpu")
    for rank in range(2):
        summary = bench.run_grid(tiny_grid, tmp_path / "sharded", batch_size=3, device="cpu",
                                 shard=f"{rank}/2")
        assert summary.results_file.name == f"results-rank{rank}-of-2.jsonl"
        assert {r["pair"] for r in read_rows(summary.results_file)} == set(range(rank, 3, 2))
    whole = _comparable(bench.read_results(tmp_path / "whole"))
    merged = _comparable(bench.read_results(tmp_path / "sharded"))
    assert [w[:4] for w in whole] == [m[:4] for m in merged]
    for (*_, a), (*_, b) in zip(whole, merged):
        assert a.keys() == b.keys()
        for key in a:  # batched convolutions round differently per batch composition, and the
            # default schedule's per-pixel normalised steps carry that to ~2e-4 relative
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key


def test_shard_arguments_and_torchrun_environment():
    assert bench.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1", "-1/2"):
        with pytest.raises(ManipBenchError, match="shard"):
            bench.parse_shard(bad)
    assert bench.shard_from_env({}) is None
    assert bench.shard_from_env({"RANK": "2", "WORLD_SIZE": "3"}) == (2, 3)
    assert bench.shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert bench.shard_pairs(5, (1, 2)) == [1, 3] and bench.shard_pairs(3) == [0, 1, 2]
    with pytest.raises(ManipBenchError, match="--out"):
        bench.default_out_dir(shard=(0, 2))


def test_a_different_configuration_is_refused(tiny_grid, image_folder, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    bench.run_grid(tiny_grid, out, batch_size=3, device="cpu")
    other = bench.make_grid(pairs=image_folder, **dict(TINY, iterations=4))
    with pytest.raises(ManipBenchError, match=r"different configuration \(differs in: overrides\)"):
        bench.run_grid(other, out, device="cpu")
    fewer = bench.make_grid(pairs=image_folder, **dict(TINY, attributors="captum.saliency"))
    with pytest.raises(ManipBenchError, match="differs in: methods"):
        bench.run_grid(fewer, out, device="cpu")
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(ManipBenchError, match="not empty and has no config.json"):
        bench.run_grid(tiny_grid, tmp_path / "stranger", device="cpu")


def test_csv_pairs_and_a_missing_file_names_the_row(image_folder, tmp_path):  # noqa: F811
    table = tmp_path / "pairs.csv"
    table.write_text(f"original,target\n{image_folder}/chelsea.png,{image_folder}/coffee.png\n"
                     f"{image_folder}/rocket.png,{image_folder}/nope.png\n")
    with pytest.raises(ManipBenchError, match=r"row 2 .*target file .*nope\.png"):
        bench.make_grid("captum.saliency", pairs=table, n=2)
    grid = bench.make_grid("captum.saliency", pairs=table, n=1)
    assert grid.pairs == [(f"{image_folder}/chelsea.png", f"{image_folder}/coffee.png")]


def test_attributor_groups_models_and_bundled_pairs():
    assert bench.resolve_attributors("gradient,captum.saliency") == attributors.GROUPS["gradient"]
    assert bench.resolve_attributors(["all"]) == attributors.GROUPS["all"]
    with pytest.raises(ManipBenchError, match="cannot be attacked"):
        bench.resolve_attributors("captum.deconvolution")
    with pytest.raises(ManipBenchError, match="Did you mean 'zennit.epsilon'"):
        bench.resolve_attributors("zennit.epsilom")
    with pytest.raises(ManipBenchError, match="unknown model"):
        bench.make_grid("captum.saliency", models="vgg17")
    with pytest.raises(ManipBenchError, match="no such weights file"):
        bench.make_grid("captum.saliency", models="cifar_vgg:/no/such.pt")
    with pytest.raises(ManipBenchError, match="unknown attack option"):
        bench.make_grid("captum.saliency", iteration=3)
    pairs = bench.sample_pairs(bench.BUNDLED, n=20, seed=1)
    assert len(set(pairs)) == 20 and all(a != b and a in data.BUNDLED_IMAGES for a, b in pairs)
    assert pairs == bench.sample_pairs(bench.BUNDLED, n=20, seed=1)
    with pytest.raises(ManipBenchError, match="bundled images give"):
        bench.sample_pairs(bench.BUNDLED, n=1000)


def test_random_methods_get_the_same_noise_when_rerun(image_folder, tmp_path):  # noqa: F811
    grid = bench.make_grid("captum.smoothgrad", pairs=image_folder, n=2, iterations=1,
                           attributor_options={"captum.smoothgrad": {"samples": 2}})
    torch.manual_seed(123)
    bench.run_grid(grid, tmp_path / "a", device="cpu")
    torch.manual_seed(456)
    bench.run_grid(grid, tmp_path / "b", device="cpu")
    a, b = bench.read_results(tmp_path / "a"), bench.read_results(tmp_path / "b")
    assert [r["metrics"] for r in a] == [r["metrics"] for r in b]
    assert a[0]["options"] == {"samples": 2}


@requires_shared_data("cifar10", "test")
def test_pairs_from_the_cifar10_image_folder_tree(tmp_path):
    grid = bench.make_grid("zennit.epsilon", pairs=SHARED_DATA / "cifar10" / "test", n=2,
                           iterations=1)
    assert all(Path(a).parent != Path(b).parent for a, b in grid.pairs)  # different classes
    bench.run_grid(grid, tmp_path / "run", device="cpu")
    assert [r["pair"] for r in bench.read_results(tmp_path / "run")] == [0, 1]
