"""Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019), chapter sections 9-10.

With gradient :math:`g_t`, moments :math:`m, v`, and step :math:`t`::

    m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t
    v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2
    \\hat m_t = m_t / (1 - \\beta_1^t),   \\hat v_t = v_t / (1 - \\beta_2^t)
    \\theta_{t+1} = \\theta_t - \\eta \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)

Adam applies weight decay as L2 regularisation, :math:`g_t \\leftarrow g_t +
\\lambda\\theta_t`, so the decay passes through the adaptive scaling (chapter
10.1). AdamW decouples it, :math:`\\theta_{t+1} = (1 - \\eta\\lambda)\\theta_t -
\\eta \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)` (chapter 10.2; Loshchilov &
Hutter, "Decoupled Weight Decay Regularization", Algorithm 2). ``amsgrad``
normalises by the running maximum of :math:`v_t` (Reddi et al. 2018).

The operation order follows torch.optim.Adam's single-tensor path, so results
match it bitwise on the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import (
    STEP,
    StateSpec,
    UpdateRule,
    check_betas,
    check_bool,
    check_nonneg,
    increment_steps,
)


class AdamRule(UpdateRule):
    name = "adam"
    decoupled_weight_decay = False
    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
    }

    def validate(self, hp: Mapping[str, Any]) -> None:
        check_nonneg("lr", hp["lr"])
        check_betas(hp["betas"])
        check_nonneg("eps", hp["eps"])
        check_nonneg("weight_decay", hp["weight_decay"])
        check_bool("amsgrad", hp["amsgrad"])
        check_bool("maximize", hp["maximize"])

    def state_specs(self, hp: Mapping[str, Any]) -> tuple[StateSpec, ...]:
        specs = (STEP, StateSpec("exp_avg"), StateSpec("exp_avg_sq"))
        if hp["amsgrad"]:
            specs += (StateSpec("max_exp_avg_sq"),)
        return specs

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
        lr, eps, weight_decay = hp["lr"], hp["eps"], hp["weight_decay"]
        beta1, beta2 = hp["betas"]
        steps = increment_steps(states)
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        if hp["maximize"]:
            grads = torch._foreach_neg(grads)
        if weight_decay != 0:
            if self.decoupled_weight_decay:
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        if hp["amsgrad"]:
            max_sqs = [state["max_exp_avg_sq"] for state in states]
            torch._foreach_maximum_(max_sqs, exp_avg_sqs)
            denom = torch._foreach_sqrt(max_sqs)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2**step) ** 0.5 for step in steps])
        torch._foreach_add_(denom, eps)
        neg_step_sizes = [-(lr / (1 - beta1**step)) for step in steps]
        torch._foreach_addcdiv_(params, exp_avgs, denom, neg_step_sizes)


class AdamWRule(AdamRule):
    name = "adamw"
    decoupled_weight_decay = True
    defaults = {**AdamRule.defaults, "weight_decay": 1e-2}
