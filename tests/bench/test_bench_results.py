"""JSONL results: durable appends, tolerant reading, repair before appending, merging."""
import json
import math

import pytest

from manip_bench import ManipBenchError
from manip_bench.bench.results import (ResultsWriter, read_results, read_rows, repair,
                                       results_name, row_key)


def row(pair, attributor="captum.saliency", **extra):
    return {"attributor": attributor, "model": "cifar_vgg", "pair": pair, "defence": None,
            "options": {}, "metrics": {"expl_target_pcc": 0.5}, **extra}


def test_append_and_read_back(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(path) as writer:
        writer.append([row(0), row(1)])
        writer.append([row(2, metrics={"expl_target_pcc": math.nan})])
    rows = read_rows(path)
    assert [r["pair"] for r in rows] == [0, 1, 2]
    assert rows[2]["metrics"]["expl_target_pcc"] is None  # strict JSON: NaN -> null
    assert all(line.startswith("{") for line in path.read_text().splitlines())


def test_truncated_last_line_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(path) as writer:
        writer.append([row(0), row(1)])
    text = path.read_text()
    path.write_text(text[:-25])  # killed in the middle of writing row 1
    assert [r["pair"] for r in read_rows(path)] == [0]
    with ResultsWriter(path) as writer:  # reopening cuts the partial line off
        assert writer.dropped > 0
        writer.append([row(1)])
    assert [r["pair"] for r in read_rows(path)] == [0, 1]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row(0)) + "\n" + json.dumps(row(1)))
    assert len(read_rows(path)) == 2
    assert repair(path) == 0 and path.read_text().endswith("\n")
    assert len(read_rows(path)) == 2


def test_damage_in_the_middle_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row(0)) + "\n{not json\n" + json.dumps(row(1)) + "\n")
    with pytest.raises(ManipBenchError, match=r"results\.jsonl: line 2"):
        read_rows(path)


def test_shards_merge_sorted_without_duplicates(tmp_path):
    with ResultsWriter(tmp_path / results_name((1, 2))) as writer:
        writer.append([row(1), row(3), row(1, attributor="zennit.epsilon")])
    with ResultsWriter(tmp_path / results_name((0, 2))) as writer:
        writer.append([row(0), row(2), row(1)])  # a duplicate of rank 1's row
    (tmp_path / "other.jsonl").write_text("ignored: not a results file\n")
    rows = read_results(tmp_path)
    assert [(r["attributor"], r["pair"]) for r in rows] == [
        ("captum.saliency", 0), ("captum.saliency", 1), ("captum.saliency", 2),
        ("captum.saliency", 3), ("zennit.epsilon", 1)]
    assert len({row_key(r) for r in rows}) == len(rows)
    assert results_name() == "results.jsonl" and results_name((0, 1)) == "results.jsonl"
    assert results_name((3, 8)) == "results-rank3-of-8.jsonl"
