"""Between the DCP format and torch.optim's single-file format.

``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(dcp_dir, file)``
assembles a DCP checkpoint into one ``torch.save`` file of full tensors, keyed
like the saved dict; its optimizer entry is :func:`get_optimizer_state_dict`'s
layout with whole tensors. :func:`full_state_dict_from_dcp` turns that entry
into what ``ZeroOptimizer.full_state_dict()`` gives (and torch.optim's
``state_dict()``): state keyed by parameter index over the param groups. The
way back: ``ZeroOptimizer.load_state_dict`` takes that dict at any world size,
and :func:`set_optimizer_state_dict` takes the file's entry as it is (fqn keys,
full tensors, fp32 master weights included).
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
