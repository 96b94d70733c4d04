"""Hyperparameter validation shared by every rule, in torch.optim's words.

Each check raises the exception type torch.optim raises for the same input, and
its message starts with torch's own phrase (``Invalid learning rate: -0.1``,
``Invalid beta parameter at index 0: 1.0``, ``Tensor lr must be 1-element``)
followed by the argument's name and what was expected, so code written against
torch's errors keeps working and the message still names the argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

# torch.optim's phrase for an argument where it is not "Invalid <name> value".
_TORCH_PHRASES = {"lr": "learning rate", "eps": "epsilon value"}


def _phrase(name: str) -> str:
    return _TORCH_PHRASES.get(name, f"{name} value")


def _as_number(name: str, value: Any, *, allow_tensor: bool, expected: str) -> float:
    """``value`` as a Python float for range checks; a Tensor must hold one element."""
    if isinstance(value, Tensor):
        if not allow_tensor:
            raise TypeError(f"Invalid {_phrase(name)}: a Tensor ({name}: expected {expected})")
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element ({name}: got shape {tuple(value.shape)})")
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"Invalid {_phrase(name)}: Tensor of dtype {value.dtype} "
                            f"({name}: expected a floating-point Tensor)")
        # Validation happens at construction or load, never inside step(): one read is fine.
        return float(value.detach().reshape(()).cpu())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {_phrase(name)}: {value!r} ({name}: expected {expected})")
    return float(value)


def check_nonneg(name: str, value: Any, *, allow_tensor: bool = False) -> None:
    """``value`` a finite number >= 0 (a 1-element Tensor where ``allow_tensor``)."""
    number = _as_number(name, value, allow_tensor=allow_tensor, expected="a float >= 0")
    if not math.isfinite(number) or number < 0.0:
        raise ValueError(f"Invalid {_phrase(name)}: {value} ({name}: expected a finite value >= 0)")


def check_unit_interval(name: str, value: Any, *, closed_low: bool = True, allow_tensor: bool = False) -> None:
    """``value`` in [0, 1) (or (0, 1) when ``closed_low`` is False)."""
    interval = "[0, 1)" if closed_low else "(0, 1)"
    number = _as_number(name, value, allow_tensor=allow_tensor, expected=f"a float in {interval}")
    low_ok = number >= 0.0 if closed_low else number > 0.0
    if not (math.isfinite(number) and low_ok and number < 1.0):
        raise ValueError(f"Invalid {_phrase(name)}: {value} ({name}: expected a value in {interval})")


def check_betas(value: Any, count: int = 2, *, allow_tensor: bool = False) -> None:
    """A tuple of ``count`` coefficients in [0, 1); as torch.optim.Adam, either all
    numbers or all 1-element Tensors (where ``allow_tensor``)."""
    if not isinstance(value, (tuple, list)) or len(value) != count:
        raise TypeError(f"Invalid betas: {value!r} (expected a tuple of {count} floats)")
    for index, beta in enumerate(value):
        if isinstance(beta, Tensor) and allow_tensor and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element (got shape {tuple(beta.shape)})")
        number = _as_number(f"betas[{index}]", beta, allow_tensor=allow_tensor, expected="a float in [0, 1)")
        if not (math.isfinite(number) and 0.0 <= number < 1.0):
            raise ValueError(f"Invalid beta parameter at index {index}: {beta} "
                             "(betas: expected values in [0, 1))")
    kinds = {isinstance(beta, Tensor) for beta in value}
    if len(kinds) > 1:
        raise ValueError(f"betas must be either both floats or both Tensors (betas: got {value!r})")


class UnsupportedParamError(TypeError, RuntimeError):
    """A parameter a rule cannot update (complex, integer). A TypeError, as shardopt has
    always raised, and a RuntimeError, as torch.optim raises for the same parameter
    (``Muon does not support complex parameters``), so either ``except`` catches it."""


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (expected True or False)")


def check_optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (expected True, False or None)")


def check_impl_flags(hp: Mapping[str, Any], tensor_names: tuple[str, ...] = ()) -> None:
    """torch.optim's implementation flags (``foreach``, ``fused``, ``differentiable``,
    ``capturable``) where ``hp`` has them: their types, and the combinations torch
    refuses, with torch's messages. ``tensor_names``: hyperparameters that torch
    refuses as Tensors under ``foreach=True`` without ``capturable``
    (torch.optim.Adam: ``lr``, ``betas``).
    """
    for name in ("foreach", "fused"):
        if name in hp:
            check_optional_bool(name, hp[name])
    for name in ("differentiable", "capturable"):
        if name in hp:
            check_bool(name, hp[name])
    if hp.get("foreach") and not hp.get("capturable", False):
        for name in tensor_names:
            value = hp.get(name)
            if isinstance(value, Tensor):
                raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
            if isinstance(value, (tuple, list)):
                for index, item in enumerate(value):
                    if isinstance(item, Tensor):
                        raise ValueError(f"{name}[{index}] as a Tensor is not supported for "
                                         "capturable=False and foreach=True")
    if hp.get("fused"):
        if hp.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable` (fused=True, differentiable=True)")
        if hp.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together. (fused=True, foreach=True)")


# The implementation flags every torch.optim optimizer with a foreach path takes,
# with torch's defaults. shardopt runs one implementation whatever they say (see
# RuleOptimizer's docstring); they are kept in the group so state dicts carry torch's keys.
IMPL_FLAGS: dict[str, Any] = {"foreach": None, "differentiable": False, "fused": None}

