"""The memory planner: per-GPU bytes of ZeRO training, computed from the runtime's own plan.

It imports :mod:`shardopt.zero`'s plan data model, placement and policy, and
the rules' declarations, never the engine's runtime modules
(``tests/test_structure.py`` checks the direction). ``shardopt plan`` is its
command line (:mod:`shardopt.planner.cli`).
"""

from .accounting import (
    OPTIMIZERS,
    PRECISIONS,
    STAGES,
    Precision,
    RankBytes,
    param_infos,
    plan_rank_bytes,
    used_by_rank,
)
from .report import GPUS, MemoryReport, estimate

__all__ = [
    "GPUS",
    "OPTIMIZERS",
    "PRECISIONS",
    "STAGES",
    "MemoryReport",
    "Precision",
    "RankBytes",
    "estimate",
    "param_infos",
    "plan_rank_bytes",
    "used_by_rank",
]
