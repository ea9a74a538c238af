"""Import layering: ``import manip_bench`` stays light, and the package's imports form layers.

Two graphs: the imports that run at import time (module body, its if/try/with blocks) must
form no cycle; and *every* import, inside functions and ``if __name__ == "__main__"``
included, must point down the pipeline -- nothing below the command line imports ``cli``
or the ``run`` experiment, lazily or not.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import manip_bench

PACKAGE = "manip_bench"
ENTRY_POINTS = {"manip_bench.cli", "manip_bench.__main__"}


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split()


def test_import_manip_bench_imports_neither_matplotlib_nor_rich():
    loaded = _python("import manip_bench, sys; "
                     "print('matplotlib' in sys.modules, 'rich' in sys.modules)")
    assert loaded == ["False", "False"], "import manip_bench imported (matplotlib, rich): " + \
        ", ".join(loaded)


def test_the_command_line_parser_imports_neither_torch_nor_rich():
    """``manip-bench --help`` and argument errors answer without loading torch (issue 15)."""
    loaded = _python("import manip_bench.cli, sys; "
                     "print('torch' in sys.modules, 'rich' in sys.modules); "
                     "manip_bench.cli.build_parser().format_help(); "
                     "print('torch' in sys.modules)")
    assert loaded == ["False", "False", "False"], "import manip_bench.cli / its --help imported " \
        "(torch, rich, torch): " + ", ".join(loaded)


def test_attack_engine_does_not_import_rich():
    """The engine reports progress through a callback; rich is the CLI's (or progress=True's)."""
    loaded = _python("from manip_bench import ManipulationAttack, check_robustness, bench; "
                     "import sys; print('rich' in sys.modules)")
    assert loaded == ["False"]


def _modules(root=Path(manip_bench.__file__).parent):
    """name -> source path of every module of the package whose folder is ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((PACKAGE, *parts))] = path
    return found


def _is_main_guard(node):
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _every_import(tree):
    """Every import statement, also inside functions, classes and the ``__main__`` guard."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _module_level_imports(tree):
    """Import statements run at import time: the module body, its if/try/with blocks."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)) and not _is_main_guard(node):
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)


def _import_targets(node, package):
    """The dotted names an Import/ImportFrom node inside ``package`` may refer to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = package.split(".")
        base = ".".join(base[:len(base) - node.level + 1])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module
    # ``from . import x`` may name a submodule x; else it names something in source
    return [f"{source}.{alias.name}" for alias in node.names] + [source]


def _package_of(name, path):
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(name, package, modules):
    """The package module ``name`` refers to (a submodule if it is one), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules=None, lazy=False):
    """module -> set of package modules it imports: at module level, or anywhere (``lazy``)."""
    modules = _modules() if modules is None else modules
    imports = _every_import if lazy else _module_level_imports
    graph = {}
    for name, path in modules.items():
        package = _package_of(name, path)
        edges = set()
        for node in imports(ast.parse(path.read_text(), str(path))):
            for target in _import_targets(node, package):
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    resolved = _resolve(target, package, modules)
                    while resolved and resolved != name:  # a.b.c runs a.b's and a's __init__
                        edges.add(resolved)
                        resolved = resolved.rpartition(".")[0]
        # A module's own enclosing packages are being imported already when it runs (a
        # package's __init__ importing its plugins, which import names the __init__ defined
        # first, is the registry pattern, not a layering cycle): those edges do not count.
        edges -= {p for p in edges if name.startswith(p + ".")}
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.fixture(scope="module")
def graph():
    return import_graph()


@pytest.fixture(scope="module")
def lazy_graph():
    return import_graph(lazy=True)


def test_graph_sees_the_package(graph):
    assert {"manip_bench.attack", "manip_bench.runtime", "manip_bench.attributors.zennit",
            "manip_bench.bench.grid"} <= set(graph)
    assert "manip_bench.runtime" in graph["manip_bench.bench.grid"]
    assert "manip_bench.attributors" in graph["manip_bench.attack"]


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_defaults_import_nothing():
    """The command line builds its parser from them: any import would slow ``--help``."""
    path = _modules()["manip_bench.defaults"]
    imports = [node for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not imports, f"manip_bench.defaults imports at line(s) {[n.lineno for n in imports]}"


def test_attributors_know_no_model_zoo():
    """No attributor imports ``manip_bench.models``, at module level or inside a function:
    a model that ships something for an attributor (patterns) offers it itself."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        if not (name == "manip_bench.attributors" or name.startswith("manip_bench.attributors.")):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _import_targets(node, _package_of(name, path)):
                    if target == "manip_bench.models" or target.startswith("manip_bench.models."):
                        found.append(f"{name} line {node.lineno}: {target}")
    assert not found, "attributors import the model zoo: " + "; ".join(found)


def test_runtime_is_a_leaf(graph):
    assert graph["manip_bench.runtime"] == set(), (
        f"manip_bench.runtime must import nothing from the package at module level, "
        f"imports {sorted(graph['manip_bench.runtime'])}")


TOP_LAYERS = sorted(ENTRY_POINTS | {"manip_bench.experiment"})


def upward_imports(graph, top):
    """The modules below the command line that import ``top``."""
    allowed = ENTRY_POINTS | {top}
    return sorted(name for name, edges in graph.items() if top in edges and name not in allowed)


@pytest.mark.parametrize("top", TOP_LAYERS)
def test_only_the_command_line_imports_the_top_layers(lazy_graph, top):
    """Lazy imports count: one inside a function still makes ``top`` a lower layer's utility."""
    users = upward_imports(lazy_graph, top)
    assert not users, f"{top} is the command line's layer, but {users} import it"


@pytest.mark.parametrize("planted, top", [
    ("def _planted():\n    from .experiment import run_experiment\n", "manip_bench.experiment"),
    ('if __name__ == "__main__":\n    from .cli import main\n', "manip_bench.cli"),
    ("def _planted():\n    import manip_bench.cli\n", "manip_bench.cli"),
])
def test_a_planted_lazy_upward_import_is_found(tmp_path, planted, top):
    """The check above fails on a copy of the package with one lazy upward import added."""
    source = Path(manip_bench.__file__).parent
    copy = tmp_path / PACKAGE
    for path in source.rglob("*.py"):
        (copy / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(source)).write_text(path.read_text())
    metrics = copy / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n\n" + planted)
    modules = _modules(copy)
    assert upward_imports(import_graph(modules, lazy=True), top) == ["manip_bench.metrics"]
    assert upward_imports(import_graph(modules), top) == [], "a lazy import is not module-level"
