"""manip-bench: manipulate image explanations, measure it, and defend against it."""
from . import attributors
from .errors import ManipBenchError

__version__ = "0.1.0"
__all__ = ["ManipBenchError", "attributors", "__version__"]
