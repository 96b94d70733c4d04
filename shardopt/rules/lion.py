"""Lion, "EvoLved Sign Momentum" (Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms", Algorithm 2), one of the chapter's modern variants.

::

    c_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t
    \\theta_{t+1} = (1 - \\eta\\lambda) \\theta_t - \\eta\\, \\mathrm{sign}(c_t)
    m_t = \\beta_2 m_{t-1} + (1 - \\beta_2) g_t

One state tensor (``exp_avg``), half of AdamW's. Because every coordinate
moves by exactly :math:`\\eta`, the paper recommends a learning rate 3-10x
smaller than AdamW's and a correspondingly larger :math:`\\lambda`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import StateSpec, UpdateRule, check_betas, check_bool, check_nonneg


class LionRule(UpdateRule):
    name = "lion"
    defaults = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False}

    def validate(self, hp: Mapping[str, Any]) -> None:
        check_nonneg("lr", hp["lr"])
        check_betas(hp["betas"])
        check_nonneg("weight_decay", hp["weight_decay"])
        check_bool("maximize", hp["maximize"])

    def state_specs(self, hp: Mapping[str, Any]) -> tuple[StateSpec, ...]:
        return (StateSpec("exp_avg"),)

    @torch.no_grad()
    def update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        hp: Mapping[str, Any],
    ) -> None:
        if not params:
            return
        lr, weight_decay = hp["lr"], hp["weight_decay"]
        beta1, beta2 = hp["betas"]
        exp_avgs = [state["exp_avg"] for state in states]
        if hp["maximize"]:
            grads = torch._foreach_neg(grads)
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        directions = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
        torch._foreach_sign_(directions)
        torch._foreach_add_(params, directions, alpha=-lr)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
