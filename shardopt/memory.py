"""Deprecated: the memory planner moved to :mod:`shardopt.planner` (0.2.0); this alias goes in 0.3.0."""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    from . import planner
    from .planner import accounting, report

    for module in (planner, report, accounting):
        if hasattr(module, name):
            warnings.warn(
                f"shardopt.memory.{name} is deprecated; use shardopt.planner.{name}",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(module, name)
    raise AttributeError(f"module 'shardopt.memory' has no attribute {name!r}")
