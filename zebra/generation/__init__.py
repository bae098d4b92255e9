"""Fast generation: a preallocated static hybrid cache and CUDA-graph decode (engine.py), reachable from
`model.generate(..., cache_implementation="static")` (fast.py), `zebra generate` and `zebra chat`."""

from .engine import StaticEngine

__all__ = ["StaticEngine"]
