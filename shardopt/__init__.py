"""shardopt: ZeRO-sharded optimizers for PyTorch that equal the unsharded ones."""

from .muon_optimizer import Muon, MuonParamGroups, muon_param_groups
from .optimizer_base import RuleOptimizer
from .optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop
from .rules import Granularity, StateShape, StateSpec, UpdateRule
from .zero import (
    BufferOwnershipError,
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
