"""moesim: replay MoE routing traces through expert caching, prefetch and offload strategies.

    python -m moesim run strategy=lru        # the command line: see README.md
    import moesim                            # the library: see moesim/api.py
    moesim.simulate("gpt-oss-like", strategy="lru", budget="25%").summary
"""
__version__ = "0.1.0"

# The submodules moesim/sweep.py and moesim/plan.py (commands) are imported first, so that the names
# `moesim.sweep` and `moesim.plan` below stay the library functions: Python sets a package attribute only when it
# first imports the submodule.
from . import sweep as _sweep_command  # noqa: F401,E402
from .api import Result, load_trace, simulate, sweep  # noqa: E402
from . import plan as _plan_command  # noqa: E402  (the submodule first, as sweep: `moesim.plan` is the function)

plan = _plan_command.plan  # which strategy and how much VRAM for experts: moesim/plan.py

__all__ = ["Result", "load_trace", "plan", "simulate", "sweep", "__version__"]
