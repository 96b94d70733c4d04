"""ParamInfo lists for plan tests, with the transform cost a matrix rule declares (Muon's defaults)."""

from __future__ import annotations

from shardopt import Granularity, ParamInfo
from shardopt.rules import MuonRule


def param_info(index: int, name: str, shape: tuple[int, ...], dtype: str, group: int,
               granularity: Granularity = Granularity.ELEMENTWISE) -> ParamInfo:
    rule = MuonRule()
    cost = rule.transform_cost(tuple(shape), rule.defaults) if granularity is Granularity.MATRIX else None
    return ParamInfo(index, name, tuple(shape), dtype, group, granularity, cost)
