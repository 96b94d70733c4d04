"""shardopt: ZeRO-sharded optimizers for PyTorch that equal the unsharded ones."""

from .muon_optimizer import Muon, MuonParamGroups, muon_param_groups
from .optimizer_base import RuleOptimizer
from .optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop
from .plan import ParamInfo, ShardPlan, plan_shards
from .rules import Granularity, StateShape, StateSpec, UpdateRule
from .zero_optimizer import PrecisionPolicy, ZeroOptimizer

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Granularity",
    "Lion",
    "Muon",
    "ParamInfo",
    "PrecisionPolicy",
    "ShardPlan",
    "ZeroOptimizer",
    "plan_shards",
    "MuonParamGroups",
    "RMSprop",
    "RuleOptimizer",
    "StateShape",
    "StateSpec",
    "UpdateRule",
    "muon_param_groups",
]
