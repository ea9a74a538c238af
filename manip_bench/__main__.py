"""``python -m manip_bench``: the same command line as ``manip-bench``."""
import sys

from .cli import main

sys.exit(main())
