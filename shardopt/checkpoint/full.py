"""Torch.optim's full state dict from the fqn-keyed optimizer entry of a ``dcp_to_torch_save`` file.

Apart from :mod:`shardopt.checkpoint.convert` so that ``python -m
shardopt.checkpoint.convert`` runs a module the package has not imported yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def full_state_dict_from_dcp(optim: Mapping[str, Any]) -> dict[str, Any]:
    """``{"state": {index: {name: tensor}}, "param_groups": [{..., "params": [index, ...]}]}`` from
    the fqn-keyed optimizer entry of a ``dcp_to_torch_save`` file (indices follow the saved param
    groups' order, which is the optimizer's)."""
    groups, index_of = [], {}
    for group in optim["param_groups"]:
        saved = {key: value for key, value in group.items() if key != "params"}
        saved["params"] = []
        for fqn in group["params"]:
            index_of[fqn] = len(index_of)
            saved["params"].append(index_of[fqn])
        groups.append(saved)
    state = {}
    for fqn, entry in optim["state"].items():
        if fqn not in index_of:
            raise ValueError(f"Invalid optimizer state: {fqn!r} has state but is in no param group")
        state[index_of[fqn]] = {name: torch.as_tensor(value) for name, value in entry.items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}
