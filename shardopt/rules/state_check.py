"""Checks of a checkpoint's per-parameter state against a rule's declaration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .base import StateShape, UpdateRule


def check_loaded_state(
    rule: UpdateRule, hp: Mapping[str, Any], param: Tensor, entry: Mapping[str, Any], where: str
) -> None:
    """Refuse a checkpoint's state for ``param`` that ``rule`` cannot continue from
    exactly: a name the rule does not keep under ``hp`` (another optimizer's or
    configuration's state), a missing one (torch.optim would fail at the next step
    with a KeyError), or a size that is not the parameter's. ``where`` names the entry.

    Names in ``rule.hidden_state(hp)`` may be absent (the optimizer rebuilds them).
    """
    if not entry:
        return
    specs = {spec.name: spec for spec in rule.state_specs(hp)}
    stray = sorted(set(entry) - set(specs))
    if stray:
        raise ValueError(
            f"Invalid state_dict: {where} has {stray}, which {type(rule).__name__} does not keep with "
            f"these hyperparameters (it keeps {sorted(specs)}); the checkpoint comes from another "
            "optimizer or configuration"
        )
    missing = sorted(set(specs) - set(entry) - rule.hidden_state(hp))
    if missing:
        raise ValueError(
            f"Invalid state_dict: {where} lacks {missing}, which {type(rule).__name__} needs to "
            f"continue (it has {sorted(entry)})"
        )
    for name, value in entry.items():
        spec = specs[name]
        if spec.shape is StateShape.SCALAR:
            if isinstance(value, Tensor) and value.numel() != 1:
                raise ValueError(f"Invalid state_dict: {where}[{name!r}] has shape {tuple(value.shape)}, "
                                 "expected a single number")
            if not isinstance(value, (Tensor, int, float)) or isinstance(value, bool):
                raise TypeError(f"Invalid state_dict: {where}[{name!r}] is a {type(value).__name__}, "
                                "expected a number or a Tensor")
        elif not isinstance(value, Tensor) or value.shape != param.shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"Invalid state_dict: {where}[{name!r}] is {got}, expected a Tensor of "
                             f"the parameter's shape {tuple(param.shape)}")
