"""A custom attributor and model from a third-party package, found through its entry point."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).with_name("plugin")


@pytest.fixture
def installed_plugin(tmp_path):
    """``tests/plugin`` as an installed distribution: its module plus a dist-info declaring
    the ``manip_bench.plugins`` entry point (what pip writes for a package)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "manip_plugin_demo.py").write_text((PLUGIN / "manip_plugin_demo.py").read_text())
    info = site / "manip_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: manip-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[manip_bench.plugins]\ndemo = manip_plugin_demo\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return env


def manip_bench(env, *args, cwd):
    return subprocess.run([sys.executable, "-m", "manip_bench", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_plugin_attributor_and_model_run_and_bench(installed_plugin, tmp_path):
    listed = manip_bench(installed_plugin, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "demo.gradient_squared" in listed.stdout and "demo_tiny" in listed.stdout
    run = manip_bench(installed_plugin, "run", "--attributor", "demo.gradient_squared",
                      "--model", "demo_tiny", "--iterations", "3", "--out", "run-out",
                      cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "run-out" / "result.json").read_text())
    assert result["attributor"] == "demo.gradient_squared"
    bench = manip_bench(installed_plugin, "bench", "--attributors", "demo.gradient_squared",
                        "--models", "demo_tiny", "--n", "2", "--iterations", "2",
                        "--out", "bench-out", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    rows = [json.loads(line) for path in (tmp_path / "bench-out").glob("results*.jsonl")
            for line in path.read_text().splitlines()]
    assert {row["attributor"] for row in rows} == {"demo.gradient_squared"} and len(rows) == 2


@pytest.fixture
def registries_restored():
    """Undo in-process registrations afterwards, so other tests see the built-ins only."""
    from manip_bench import attributors, models
    saved = (dict(attributors.REGISTRY), {k: list(v) for k, v in attributors.GROUPS.items()},
             dict(models.REGISTERED_MODELS))
    yield
    attributors.REGISTRY.clear()
    attributors.REGISTRY.update(saved[0])
    attributors.GROUPS.update(saved[1])
    models.REGISTERED_MODELS.clear()
    models.REGISTERED_MODELS.update(saved[2])
    sys.modules.pop("manip_plugin_demo", None)


def test_register_adds_to_registries_and_groups(registries_restored):
    sys.path.insert(0, str(PLUGIN))
    try:
        import manip_plugin_demo  # noqa: F401 - registers on import
    finally:
        sys.path.remove(str(PLUGIN))
    from manip_bench import attributors, models
    assert "demo.gradient_squared" in attributors.available()
    assert "demo.gradient_squared" in attributors.GROUPS["all"]
    assert "demo.gradient_squared" in attributors.GROUPS["gradient"]
    assert "demo_tiny" in models.available() and models.input_size("demo_tiny") == 32
    model = models.load("demo_tiny")
    assert model(__import__("torch").rand(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(Exception, match="Attributor subclass"):
        attributors.register(object)
