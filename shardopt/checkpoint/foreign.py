"""Loading a torch.optim checkpoint (FSDP2 + torch.optim, or any DCP checkpoint of
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``) into a ZeroOptimizer.

Such a checkpoint has the same layout as shardopt's (states keyed by fully
qualified parameter names, param groups listing names) but no ``"shardopt"``
entry: no integrity record, no skipped-step counter, no fp32 master weights.
DCP refuses to load a key the checkpoint lacks ("Missing key in checkpoint
state_dict"), and it reads in place, before :func:`set_optimizer_state_dict`
could check anything. So the checks happen here first, from the checkpoint's
metadata (every key with its tensor size, read without loading a tensor; DCP
flattens nested keys with dots: ``optim.state.<fqn>.<state>``,
``optim.param_groups.<g>.<hyperparameter>``,
https://pytorch.org/docs/stable/distributed.checkpoint.html) and one small read
of the param groups' name lists, and the request is cut down to what the
checkpoint holds:

* every parameter with saved state must be this optimizer's, with the states
  this rule keeps (same names) and the parameter's shape;
* the param groups must list the same names in the same groups;
* parameters without saved state (torch.optim skips those that never had a
  gradient) are not requested and start from the rule's initial values;
* hyperparameters the checkpoint lacks (an older torch) keep this optimizer's.

The rule itself is not recorded: a torch Adam checkpoint has AdamW's state
names; its ``decoupled_weight_decay`` hyperparameter, when saved, is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn

from ..zero.optimizer import ZeroOptimizer
from .state_dict import get_optimizer_state_dict


def saved_keys(path: str | os.PathLike) -> Mapping[str, Any]:
    """The checkpoint's flattened keys and their metadata (``TensorStorageMetadata`` with ``.size``,
    or ``BytesStorageMetadata``), read from its ``.metadata`` file alone."""
    return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata


def foreign_request(key: str, model: nn.Module, optimizer: ZeroOptimizer, path: str | os.PathLike,
                    saved: Mapping[str, Any], process_group: Any | None = None) -> dict[str, Any]:
    """What to ``dcp.load`` under ``key`` from the torch.optim checkpoint at ``path`` (whose keys are
    ``saved``), after checking it against ``model`` and ``optimizer`` (module doc). A collective
    (one small read). Raises ``ValueError`` naming the first difference, before any tensor is read."""
    request = get_optimizer_state_dict(model, optimizer)
    del request["shardopt"]
    where = f"Invalid checkpoint {path}"
    states: dict[str, dict[str, Any]] = {}
    prefix = f"{key}.state."
    for name, meta in saved.items():
        if name.startswith(prefix):
            fqn, state = name[len(prefix):].rsplit(".", 1)
            states.setdefault(fqn, {})[state] = meta
    groups = 0
    while f"{key}.param_groups.{groups}.params" in saved:
        groups += 1
    if not states and not groups:
        raise ValueError(f"{where}: no optimizer state under {key!r} (expected {key}.state.<parameter>.<state> "
                         f"and {key}.param_groups.<g>.params keys)")
    for fqn, found in states.items():
        ours = request["state"].get(fqn)
        if ours is None:
            raise ValueError(f"{where}: parameter {fqn} has optimizer state in the checkpoint and is not a "
                             "parameter of this optimizer")
        if set(found) != set(ours):
            raise ValueError(f"{where}: parameter {fqn} has states {sorted(found)} in the checkpoint, this "
                             f"optimizer's rule keeps {sorted(ours)} (another optimizer?)")
        for state, meta in found.items():
            size = tuple(getattr(meta, "size", ()))
            if ours[state].dim() and size != tuple(ours[state].shape):
                raise ValueError(f"{where}: parameter {fqn} has shape {size} in the checkpoint (state "
                                 f"{state!r}), {tuple(ours[state].shape)} in this model")
    if groups != len(request["param_groups"]):
        raise ValueError(f"{where}: {groups} param groups in the checkpoint, this optimizer has "
                         f"{len(request['param_groups'])}")
    probe: dict[str, Any] = {key: {"param_groups": [{"params": []} for _ in range(groups)]}}
    dcp.load(probe, checkpoint_id=str(path), process_group=process_group)
    for g, (theirs, ours) in enumerate(zip(probe[key]["param_groups"], request["param_groups"])):
        for position, (a, b) in enumerate(zip(list(theirs["params"]) + [None] * len(ours["params"]),
                                              ours["params"])):
            if a != b:
                raise ValueError(f"{where}: param group {g} lists {a!r} at position {position} in the "
                                 f"checkpoint where this optimizer has {b!r}")
        if len(theirs["params"]) != len(ours["params"]):
            raise ValueError(f"{where}: param group {g} has {len(theirs['params'])} parameters in the "
                             f"checkpoint, {len(ours['params'])} in this optimizer")
    request["state"] = {fqn: entry for fqn, entry in request["state"].items() if fqn in states}
    request["param_groups"] = [
        {name: value for name, value in group.items() if f"{key}.param_groups.{g}.{name}" in saved}
        for g, group in enumerate(request["param_groups"])]
    return request
