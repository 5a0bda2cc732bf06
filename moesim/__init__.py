"""moesim: replay MoE routing traces through expert caching, prefetch and offload strategies.

    python -m moesim run strategy=lru        # see README.md
"""
__version__ = "0.1.0"
