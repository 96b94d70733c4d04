"""shardopt: ZeRO-sharded optimizers for PyTorch that equal the unsharded ones."""

from .muon_optimizer import Muon, MuonParamGroups, muon_param_groups
from .optimizer_base import RuleOptimizer
from .optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop
from .rules import Granularity, StateShape, StateSpec, UpdateRule

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Granularity",
    "Lion",
    "Muon",
    "MuonParamGroups",
    "RMSprop",
    "RuleOptimizer",
    "StateShape",
    "StateSpec",
    "UpdateRule",
    "muon_param_groups",
]
