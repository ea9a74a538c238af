"""manip-bench: manipulate image explanations, measure it, and defend against it.

Pipeline: model + images -> attributors -> attack -> metrics -> bench/report -> CLI.
"""
__version__ = "0.1.0"

from . import attributors, heatmaps, metrics  # noqa: E402
from .attack import AttackConfig, AttackResult, ManipulationAttack  # noqa: E402
from .errors import ManipBenchError  # noqa: E402
from .robustness import ManipulationRobustness, RobustnessReport, check_robustness  # noqa: E402

__all__ = ["AttackConfig", "AttackResult", "ManipBenchError", "ManipulationAttack",
           "ManipulationRobustness", "RobustnessReport", "attributors", "check_robustness",
           "heatmaps", "metrics", "__version__"]
