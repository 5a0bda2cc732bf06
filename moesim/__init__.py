"""moesim: replay MoE routing traces through expert caching, prefetch and offload strategies.

    python -m moesim run strategy=lru        # the command line: see README.md
    import moesim                            # the library: see moesim/api.py
    moesim.simulate("gpt-oss-like", strategy="lru", budget="25%").summary
"""
__version__ = "0.1.0"

# The submodule moesim/sweep.py (the sweep command) is imported first, so that the name `moesim.sweep` below
# stays the library function: Python sets a package attribute only when it first imports the submodule.
from . import sweep as _sweep_command  # noqa: F401,E402
from .api import Result, load_trace, simulate, sweep  # noqa: E402

__all__ = ["Result", "load_trace", "simulate", "sweep", "__version__"]
