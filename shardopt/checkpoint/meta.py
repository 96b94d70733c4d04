"""The integrity record of a shardopt checkpoint: format, rules, parameter names, shapes, groups.

Written under ``"shardopt"."meta"`` (JSON) by every ``get_optimizer_state_dict`` of
shardopt and checked before a load changes anything, so that loading into another
model or rule is an error naming the first difference, never a partial load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

FORMAT = "shardopt-dcp-v1"


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified names of the optimizer's parameters, in its order over the param groups,
    matched by identity to ``model.named_parameters()``."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(f"Invalid model: parameter #{len(names)} of the optimizer (group {g}, shape "
                                 f"{tuple(p.shape)}) is not one of model.named_parameters()")
            names.append(by_id[id(p)])
    return names


def describe(param_groups: Sequence[Mapping[str, Any]], rule_name: Callable[[int], str], names: list[str],
             masters: bool, world_size: int) -> dict[str, Any]:
    """The record of optimizer ``param_groups`` whose parameters are named ``names`` (in order)."""
    params, index = [], 0
    for g, group in enumerate(param_groups):
        for p in group["params"]:
            params.append([names[index], list(p.shape), g])
            index += 1
    return {"format": FORMAT, "rules": [rule_name(g) for g in range(len(param_groups))],
            "params": params, "master_weights": masters, "world_size": world_size}


def read_meta(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """The integrity record of a state dict from :func:`get_optimizer_state_dict` (``None`` if absent)."""
    extra = state_dict.get("shardopt")
    if not isinstance(extra, Mapping) or "meta" not in extra:
        return None
    meta = extra["meta"]
    return json.loads(meta) if isinstance(meta, str) else dict(meta)


def check_described(meta: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first difference between a checkpoint's record ``meta``
    and this optimizer's ``mine``: format, parameter names (by position), shapes, groups, rules."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"Invalid checkpoint: format {meta.get('format')!r}, expected {FORMAT!r}")
    for position, (saved, ours) in enumerate(zip(meta["params"], mine["params"])):
        if saved[0] != ours[0]:
            raise ValueError(f"Invalid checkpoint: parameter #{position} is {saved[0]!r} in the checkpoint and "
                             f"{ours[0]!r} in this model (a different model or parameter order)")
        if list(saved[1]) != list(ours[1]):
            raise ValueError(f"Invalid checkpoint: parameter {ours[0]} has shape {tuple(saved[1])} in the "
                             f"checkpoint, {tuple(ours[1])} in this model")
        if saved[2] != ours[2]:
            raise ValueError(f"Invalid checkpoint: parameter {ours[0]} is in param group {saved[2]} in the "
                             f"checkpoint, group {ours[2]} in this optimizer")
    if len(meta["params"]) != len(mine["params"]):
        longer, which = (meta, "checkpoint") if len(meta["params"]) > len(mine["params"]) else (mine, "model")
        extra = longer["params"][min(len(meta["params"]), len(mine["params"]))][0]
        raise ValueError(f"Invalid checkpoint: parameter {extra} is only in the {which} "
                         f"({len(meta['params'])} parameters saved, {len(mine['params'])} here)")
    for group, (saved, ours) in enumerate(zip(meta["rules"], mine["rules"])):
        if saved != ours:
            first = next((p[0] for p in mine["params"] if p[2] == group), "none")
            raise ValueError(f"Invalid checkpoint: param group {group} (first parameter {first}) was saved "
                             f"by rule {saved!r}, this optimizer runs {ours!r}")
