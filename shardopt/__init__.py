"""shardopt: ZeRO-sharded optimizers for PyTorch that equal the unsharded ones."""

import importlib
from types import ModuleType

from .muon_grouping import MuonParamGroups, muon_param_groups
from .muon_optimizer import Muon
from .optimizer_base import RuleOptimizer
from .optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop
from .rules import Granularity, StateShape, StateSpec, UpdateRule
from .zero import (
    BufferOwnershipError,
    CollectiveFailure,
    CollectiveMismatchError,
    ParamInfo,
    PlanError,
    PrecisionPolicy,
    ShardPlan,
    ZeroOptimizer,
    plan_shards,
)

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "BufferOwnershipError",
    "CollectiveFailure",
    "CollectiveMismatchError",
    "Granularity",
    "Lion",
    "Muon",
    "MuonParamGroups",
    "ParamInfo",
    "PlanError",
    "PrecisionPolicy",
    "RMSprop",
    "RuleOptimizer",
    "ShardPlan",
    "StateShape",
    "StateSpec",
    "UpdateRule",
    "ZeroOptimizer",
    "muon_param_groups",
    "plan_shards",
]

# Subpackages reachable as attributes after a bare ``import shardopt``
# (``shardopt.dist.init_from_env()``), imported on first use: the planner and
# the deprecated alias stay out of ``import shardopt`` (the engine never loads
# the planner; ``shardopt.memory`` warns only when one of its names is used).
_SUBMODULES = frozenset({"checkpoint", "dist", "dtensor", "memory", "planner", "rules", "schedules", "zero"})


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
