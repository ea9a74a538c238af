"""manip-bench: manipulate image explanations, measure it, and defend against it.

Pipeline: model + images -> attributors -> attack -> metrics -> bench/report -> CLI.

``import manip_bench`` is cheap: the names below are imported on first use (PEP 562), so
a script (or ``manip-bench --help``) pays for torch, Captum, Zennit and torchvision only
when it touches them, and never for matplotlib or rich unless it draws something.
"""
import importlib

__version__ = "0.1.0"

#: public name -> module that defines it (relative to this package)
_LAZY = {
    "AttackConfig": ".attack", "AttackResult": ".attack", "ManipulationAttack": ".attack",
    "Budget": ".threat", "ManipBenchError": ".errors",
    "ManipulationRobustness": ".robustness", "RobustnessReport": ".robustness",
    "check_robustness": ".robustness",
}
#: subpackages/modules reachable as attributes (``manip_bench.attributors``...)
_SUBMODULES = ("attributors", "heatmaps", "losses", "metrics", "schedule", "threat")

__all__ = ["AttackConfig", "AttackResult", "Budget", "ManipBenchError", "ManipulationAttack",
           "ManipulationRobustness", "RobustnessReport", "attributors", "check_robustness",
           "heatmaps", "losses", "metrics", "schedule", "threat", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
