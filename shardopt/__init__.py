"""shardopt: ZeRO-sharded optimizers for PyTorch that equal the unsharded ones."""

from .comm import BufferOwnershipError, CollectiveMismatchError
from .layout import plan_shards
from .muon_optimizer import Muon, MuonParamGroups, muon_param_groups
from .optimizer_base import RuleOptimizer
from .optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop
from .plan import ParamInfo, PlanError, ShardPlan
from .policy import PrecisionPolicy
from .rules import Granularity, StateShape, StateSpec, UpdateRule
from .zero_optimizer import ZeroOptimizer

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
