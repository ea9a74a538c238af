"""manip-bench: manipulate image explanations, measure it, and defend against it.

Pipeline: model + images -> attributors -> attack -> metrics -> bench/report -> CLI.
"""
__version__ = "0.1.0"

from . import attributors, heatmaps, losses, metrics, schedule, threat  # noqa: E402
from .attack import AttackConfig, AttackResult, ManipulationAttack  # noqa: E402
from .errors import ManipBenchError  # noqa: E402
from .threat import Budget  # noqa: E402
from .robustness import ManipulationRobustness, RobustnessReport, check_robustness  # noqa: E402

__all__ = ["AttackConfig", "AttackResult", "Budget", "ManipBenchError", "ManipulationAttack",
           "ManipulationRobustness", "RobustnessReport", "attributors", "check_robustness",
           "heatmaps", "losses", "metrics", "schedule", "threat", "__version__"]
