"""Per-step scalars (step counts, bias corrections, Tensor hyperparameters) read at once.

torch.optim's default (non-capturable) path keeps ``step`` on the CPU and turns
per-parameter scalars into Python numbers one parameter at a time. The rules
compute the same expressions on the same types (a Tensor ``lr`` or ``betas``
stays a Tensor, so the arithmetic rounds as torch's does) and then read every
Tensor among them to the host in one transfer per device and step
(:func:`host_floats`), never one per parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def as_scalar(value: Any) -> Any:
    """A 1-element Tensor hyperparameter as a 0-d Tensor (torch.optim's ``_to_scalar``);
    anything else unchanged."""
    if isinstance(value, Tensor) and value.dim() != 0:
        return value.reshape(())
    return value


def host_floats(values: Sequence[Any]) -> list[float]:
    """``values`` (Python numbers or 0-d Tensors) as Python floats.

    Tensors are read in one transfer per device: they are widened to float64
    (exact for every floating dtype torch has) and stacked first.
    """
    out: list[Any] = list(values)
    by_device: dict[torch.device, list[int]] = {}
    for index, value in enumerate(out):
        if isinstance(value, Tensor):
            by_device.setdefault(value.device, []).append(index)
    for indices in by_device.values():
        stacked = torch.stack([out[i].detach().reshape(()).to(torch.float64) for i in indices])
        for i, number in zip(indices, stacked.tolist()):
            out[i] = number
    return [float(value) for value in out]


def step_values(steps: Sequence[Tensor]) -> list[float]:
    """The values of ``step`` tensors, in one read per device."""
    return host_floats(list(steps))


def per_distinct(keys: Sequence[Any], compute) -> list[Any]:
    """``[compute(key) for key in keys]``, calling ``compute`` once per distinct key:
    the parameters of a group nearly always share one step count, so bias corrections
    are computed once per group rather than once per parameter."""
    cache: dict[Any, Any] = {}
    out = []
    for key in keys:
        if key not in cache:
            cache[key] = compute(key)
        out.append(cache[key])
    return out
