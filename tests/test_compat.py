"""manip_bench._compat: the one place that touches Captum, Zennit and torch internals (issue 15)."""
import ast
import configparser
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from manip_bench import _compat
from manip_bench.errors import ManipBenchError

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "manip_bench"


@pytest.mark.parametrize("name", _compat.names())
def test_every_accessor_resolves_on_the_installed_versions(name):
    assert _compat.probe(name) is not None
    assert getattr(_compat, name) is not None  # the cached look-up the package uses


def test_accessors_cover_what_the_package_relies_on():
    assert {"run_forward", "compute_gradients", "set_gradient_func", "has_default_gradient_func",
            "InputBaselineXGradient", "approximation_parameters", "SUPPORTED_LAYERS_WITH_RULES",
            "EpsilonRule", "draw_noise", "draw_baseline_rows", "draw_path_points",
            "rule_stabilizer", "rule_gamma", "rule_box_bounds", "is_stock_rule",
            "branch_layouts", "composite_hooks", "conv_forward", "tensor_version",
            "autograd_node_names"} <= set(_compat.names())


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_internal"):
        _compat.no_such_internal  # noqa: B018


def _assert_names_release(error, distribution, private):
    message = str(error.value)
    assert message.startswith(f"{distribution} {importlib.metadata.version(distribution)} "
                              f"is not supported: ")
    assert private in message
    assert f"manip-bench is tested with {distribution} {_compat.tested_range(distribution)}" \
        in message


def test_missing_captum_name_names_the_release_and_the_tested_range(monkeypatch):
    import captum.attr._core.lrp as lrp
    monkeypatch.delattr(lrp, "SUPPORTED_LAYERS_WITH_RULES")
    with pytest.raises(ManipBenchError) as error:
        _compat.probe("SUPPORTED_LAYERS_WITH_RULES")
    _assert_names_release(error, "captum", "captum.attr._core.lrp.SUPPORTED_LAYERS_WITH_RULES "
                                           "is missing")


def test_missing_private_function_is_reported(monkeypatch):
    import captum._utils.common as common
    monkeypatch.delattr(common, "_run_forward")
    with pytest.raises(ManipBenchError) as error:
        _compat.probe("run_forward")
    _assert_names_release(error, "captum", "captum._utils.common._run_forward is missing")


def test_missing_torch_name_is_reported(monkeypatch):
    # Conv2d's own method gone: what is left is torch's abstract stub, which returns None
    monkeypatch.delattr(torch.nn.Conv2d, "_conv_forward")
    with pytest.raises(ManipBenchError) as error:
        _compat.probe("conv_forward")
    _assert_names_release(error, "torch", "torch.nn.Conv2d._conv_forward ")


def test_changed_zennit_rule_is_reported(monkeypatch):
    """A Zennit whose Epsilon keeps its stabiliser elsewhere fails the probe, not an attack."""
    import zennit.rules

    original = zennit.rules.Epsilon.__init__

    def moved(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mapper = self.gradient_mapper
        self.gradient_mapper = lambda out_grad, outputs: mapper(out_grad, outputs)

    monkeypatch.setattr(zennit.rules.Epsilon, "__init__", moved)
    with pytest.raises(ManipBenchError) as error:
        _compat.probe("rule_stabilizer")
    _assert_names_release(error, "zennit", "stabilizer_fn")


def test_changed_behaviour_is_reported(monkeypatch):
    """compute_gradients present but no longer Captum's default gradient_func."""
    import captum._utils.gradient as gradient
    original = gradient.compute_gradients
    monkeypatch.setattr(gradient, "compute_gradients", lambda *args: original(*args))
    with pytest.raises(ManipBenchError) as error:
        _compat.probe("compute_gradients")
    _assert_names_release(error, "captum", "is no longer the gradient_func")


def test_probes_leave_the_random_streams_alone():
    torch.manual_seed(7)
    np.random.seed(7)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(7)
    np.random.seed(7)
    for name in _compat.names():
        _compat.probe(name)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])


def _install_requires():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    requirements = [Requirement(line.strip()) for line in lines
                    if line.strip() and not line.strip().startswith("#")]
    return {requirement.name: requirement for requirement in requirements}


@pytest.mark.parametrize("distribution", sorted(_compat.TESTED))
def test_tested_ranges_agree_with_setup_cfg(distribution):
    """setup.cfg allows exactly the tested releases: >=lowest, <next minor after highest."""
    low, high = (Version(v) for v in _compat.TESTED[distribution])
    requirement = _install_requires()[distribution]
    bounds = {spec.operator: Version(spec.version) for spec in requirement.specifier}
    assert set(bounds) == {">=", "<"}, f"{requirement}: want >=lowest,<next minor"
    assert bounds[">="] == low, f"{requirement}: lower bound differs from tested {low}"
    next_minor = Version(f"{high.major}.{high.minor + 1}")
    assert bounds["<"] == next_minor, f"{requirement}: upper bound is not {next_minor}"
    assert low <= high


def test_tox_runs_the_lowest_and_highest_tested_releases():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    envlist = tox["tox"]["envlist"]
    for distribution in ("torch", "captum", "zennit"):
        for release in _compat.TESTED[distribution]:
            tag = distribution + release.replace(".", "")[:3]
            section = next((s for s in tox.sections() if s.startswith("testenv:")
                            and s.endswith(tag)), None)
            assert section, f"tox.ini has no environment for {distribution} {release}"
            assert f"{distribution}=={release}" in tox[section]["deps"]
            assert section.split(":", 1)[1] in re.split(r"[\s,]+", envlist)


def test_import_manip_bench_imports_neither_captum_nor_zennit():
    code = ("import sys, manip_bench, manip_bench._compat; "
            "print(*(m in sys.modules for m in ('captum', 'zennit', 'torch')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False", "False", "False"], done.stdout


def test_compat_is_a_leaf():
    """_compat imports the standard library and manip_bench.errors at import time; its
    resolvers import only torch, NumPy, Captum and Zennit besides."""
    tree = ast.parse((PACKAGE / "_compat.py").read_text())
    allowed_any = {"captum", "zennit", "torch", "numpy"} | set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module in ("errors", "runtime"), f"line {node.lineno}: .{node.module}"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                assert name.split(".")[0] in allowed_any, f"line {node.lineno}: {name}"
    for node in tree.body:  # at import time: the standard library only
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] in sys.stdlib_module_names for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            assert node.module.split(".")[0] in sys.stdlib_module_names, node.module


#: private names of the libraries, and the Python internals used to read Zennit's rules
PRIVATE = re.compile(r"\b(captum|zennit|torch)(\.\w+)*\._(?!_)\w|__closure__|__code__|co_freevars"
                     r"|cell_contents|\._conv_forward\b|\._version\b|\.gradient_func\b"
                     r"|\bnp\.random\.(choice|uniform)\b")


def test_no_other_module_uses_an_internal():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code) and not code.strip().startswith(('"', "'", "``")):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "internals outside manip_bench._compat:\n" + "\n".join(found)
