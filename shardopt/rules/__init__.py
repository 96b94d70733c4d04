"""Update rules: one declaration per optimizer family (see :mod:`.base`)."""

from .adagrad import AdagradRule
from .adam import AdamRule, AdamWRule
from .base import Granularity, MatrixRule, StateShape, StateSpec, UpdateRule
from .lion import LionRule
from .muon import MuonRule
from .rmsprop import RMSpropRule
from .sgd import SGDRule

__all__ = [
    "AdagradRule",
    "AdamRule",
    "AdamWRule",
    "Granularity",
    "LionRule",
    "MatrixRule",
    "MuonRule",
    "RMSpropRule",
    "SGDRule",
    "StateShape",
    "StateSpec",
    "UpdateRule",
]
