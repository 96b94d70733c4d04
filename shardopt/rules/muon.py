"""Muon: momentum orthogonalized by Newton-Schulz (chapter section 11).

For a weight matrix with gradient :math:`G_t` (Keller Jordan 2024, "Muon: An
optimizer for hidden layers in neural networks"; torch.optim.Muon)::

    B_t = \\mu B_{t-1} + (1 - \\mu) G_t                    (the chapter's m_t)
    U_t = (1 - \\mu) G_t + \\mu B_t   if nesterov   else   B_t
    O_t = NS_k(U_t) \\approx U V^T    where U_t = U \\Sigma V^T
    \\theta_{t+1} = (1 - \\eta\\lambda) \\theta_t - \\eta\\, s(rows, cols)\\, O_t

The chapter's "project away high-curvature directions" is, in practice, the
replacement of every singular value by (about) one; see
:mod:`shardopt.rules.newton_schulz`. The scale ``s`` (``adjust_lr_fn``) is

* ``"original"`` (default, Jordan): :math:`\\sqrt{\\max(1, rows/cols)}`;
* ``"match_rms_adamw"`` (Liu et al. 2025, "Muon is Scalable for LLM Training",
  section 2.2): :math:`0.2\\sqrt{\\max(rows, cols)}`, which gives the update
  AdamW's RMS so AdamW's lr and weight decay transfer.

Only matrices take this rule; embeddings, the output head, norms and biases go
to AdamW through their param group (:func:`shardopt.muon_param_groups`).
The rule needs each matrix whole (:attr:`Granularity.MATRIX`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import (
    Granularity,
    MatrixRule,
    StateSpec,
    check_bool,
    check_nonneg,
    check_unit_interval,
)
from .newton_schulz import as_matrices, matrix_shape, orthogonalize, resolve_coefficients

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_ns_dtype(value: object) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in NS_DTYPES.values():
        return value
    if isinstance(value, str) and value in NS_DTYPES:
        return NS_DTYPES[value]
    raise ValueError(f"Invalid ns_dtype: {value!r} (expected one of {sorted(NS_DTYPES)})")


def lr_scale(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class MuonRule(MatrixRule):
    name = "muon"
    granularity = Granularity.MATRIX
    defaults = {
        "lr": 1e-3,
        "weight_decay": 0.1,
        "momentum": 0.95,
        "nesterov": True,
        "ns_coefficients": (3.4445, -4.7750, 2.0315),
        "eps": 1e-7,
        "ns_steps": 5,
        "adjust_lr_fn": None,
        "ns_dtype": "bfloat16",
    }

    def __init__(self) -> None:
        # Matrices orthogonalized by this rule object since it was made; the
        # distributed tests count it to prove each matrix is done exactly once.
        self.num_orthogonalized = 0

    def validate(self, hp: Mapping[str, Any]) -> None:
        check_nonneg("lr", hp["lr"])
        check_nonneg("weight_decay", hp["weight_decay"])
        check_unit_interval("momentum", hp["momentum"])
        check_bool("nesterov", hp["nesterov"])
        check_nonneg("eps", hp["eps"])
        steps = hp["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"Invalid ns_steps: {steps!r} (expected an int >= 1)")
        if steps < 1:
            raise ValueError(f"Invalid ns_steps: {steps} (expected an int >= 1)")
        resolve_coefficients(hp["ns_coefficients"])
        if hp["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"Invalid adjust_lr_fn: {hp['adjust_lr_fn']!r} (expected one of {ADJUST_LR_FNS})"
            )
        resolve_ns_dtype(hp["ns_dtype"])

    def check_param(self, param: Tensor, label: str) -> None:
        super().check_param(param, label)
        if param.ndim < 2:
            raise ValueError(
                f"{label}: Muon updates matrices, got a {param.ndim}-D parameter of shape "
                f"{tuple(param.shape)}; put it in a param group with use_muon=False "
                "(shardopt.muon_param_groups does this)"
            )

    def state_specs(self, hp: Mapping[str, Any]) -> tuple[StateSpec, ...]:
        return (StateSpec("momentum_buffer"),)

    @torch.no_grad()
    def prepare(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                hp: Mapping[str, Any]) -> None:
        torch._foreach_lerp_([state["momentum_buffer"] for state in states], grads, 1 - hp["momentum"])

    @torch.no_grad()
    def direction(self, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        buf = state["momentum_buffer"]
        return grad.lerp(buf, hp["momentum"]) if hp["nesterov"] else buf

    def batches(self, shapes: Sequence[tuple[int, ...]], hp: Mapping[str, Any]) -> list[list[int]]:
        # Same-shape matrices are orthogonalized in one batched matmul where that
        # cannot change the result: in fp32. CPU bf16 batched matmuls round
        # differently from one-at-a-time ones (measured: 7 of 200 stacks of four
        # 16x16 matrices differed), which would make a matrix's update depend on
        # which other matrices share its rank, and a sharded run differ from an
        # unsharded one.
        if resolve_ns_dtype(hp["ns_dtype"]) != torch.float32:
            return [[index] for index in range(len(shapes))]
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, shape in enumerate(shapes):
            by_shape[tuple(shape)].append(index)
        return list(by_shape.values())

    @torch.no_grad()
    def transform(self, directions: list[Tensor], hp: Mapping[str, Any]) -> list[Tensor]:
        coefficients = resolve_coefficients(hp["ns_coefficients"])
        dtype = resolve_ns_dtype(hp["ns_dtype"])
        shape = tuple(directions[0].shape)
        if len(directions) == 1:
            outputs = [orthogonalize(as_matrices(directions[0]), coefficients, hp["ns_steps"],
                                     eps=hp["eps"], dtype=dtype)]
        else:
            stack = torch.cat([as_matrices(d).reshape(-1, *matrix_shape(shape)) for d in directions])
            ortho = orthogonalize(stack, coefficients, hp["ns_steps"], eps=hp["eps"], dtype=dtype)
            outputs = list(ortho.split(stack.shape[0] // len(directions)))
        self.num_orthogonalized += len(directions) * (shape[0] if len(shape) == 3 else 1)
        return outputs

    def exchange_dtype(self, hp: Mapping[str, Any], master_dtype: torch.dtype) -> torch.dtype:
        # Newton-Schulz first casts its input to ns_dtype (orthogonalize) and returns
        # ns_dtype, so slices travel in it at no change of result: bf16 halves the bytes.
        return resolve_ns_dtype(hp["ns_dtype"])

    @torch.no_grad()
    def finish(self, param: Tensor, update: Tensor, shape: tuple[int, ...], hp: Mapping[str, Any]) -> None:
        lr, weight_decay = hp["lr"], hp["weight_decay"]
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(update.reshape(param.shape), alpha=-lr * lr_scale(hp["adjust_lr_fn"], *matrix_shape(shape)))
