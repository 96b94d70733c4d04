"""DCP state dicts of shardopt's single-process optimizers, e.g. on FSDP2 / TP DTensor parameters.

``shardopt.AdamW`` ... ``shardopt.Muon`` keep torch.optim's state layout: on a
``fully_shard``-ed (and/or ``parallelize_module``-d) model each state is a DTensor
with its parameter's mesh and placements (``RuleOptimizer.init_state``
allocates it with ``torch.full_like``). That is already what
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` gives for
FSDP2 + torch.optim, and what a ZeroOptimizer checkpoint holds (per parameter,
keyed by fully qualified name), so one checkpoint moves between the three.

What shardopt adds to torch's functions:

* no ``step()``: torch's ``get_optimizer_state_dict`` runs a step with zero
  gradients and ``lr=0`` when the optimizer has no state yet, to allocate it
  (``_init_optim_state``). That is a full distributed step for Muon on DTensors
  (the owner exchange), and for AdamW a step count of 1 before the load. Here
  every state is allocated with its initial value instead (no collective);
* the ``"shardopt"`` integrity record (format, rule per group, parameter names,
  shapes and groups: :func:`shardopt.checkpoint.check_meta`), checked before
  anything is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..optimizer_base import RuleOptimizer
from .meta import describe, param_names


def describe_rule_optimizer(model: nn.Module, optimizer: RuleOptimizer) -> dict[str, Any]:
    """The integrity record of ``optimizer`` over ``model``'s parameters."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return describe(optimizer.param_groups, lambda g: optimizer.rule_for_group(optimizer.param_groups[g]).name,
                    param_names(model, optimizer), False, world)


def ensure_states(optimizer: RuleOptimizer) -> None:
    """Allocate every parameter's state with its initial value, as the first ``step()`` would."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.init_state(param, group)


def get_rule_state_dict(model: nn.Module, optimizer: RuleOptimizer) -> dict[str, Any]:
    """torch's ``get_optimizer_state_dict`` of ``optimizer`` plus the ``"shardopt"`` record; no step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    ensure_states(optimizer)
    out = get_optimizer_state_dict(model, optimizer)
    out["shardopt"] = {"meta": json.dumps(describe_rule_optimizer(model, optimizer)), "num_skipped_steps": 0}
    return out


def set_rule_state_dict(model: nn.Module, optimizer: RuleOptimizer, state_dict: Mapping[str, Any]) -> None:
    """Check ``state_dict``'s integrity record (when it has one), then torch's
    ``set_optimizer_state_dict``, which reshards DTensor states to this optimizer's
    placements; ``optimizer.load_state_dict`` checks every state's name and shape."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from .meta import check_described, read_meta

    meta = read_meta(state_dict)
    if meta is not None:
        check_described(meta, describe_rule_optimizer(model, optimizer))
    ensure_states(optimizer)
    plain = {key: value for key, value in state_dict.items() if key != "shardopt"}
    set_optimizer_state_dict(model, optimizer, plain)
