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

The default operation order follows torch.optim.Adam's single-tensor path, so
results match it bitwise on the same inputs. With ``fused=True`` in a group the
update is torch's one-pass kernel (``torch._fused_adam_``/``_fused_adamw_``,
:mod:`.fused`), bitwise equal to torch.optim.Adam(W) with ``fused=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import STEP, StateSpec, UpdateRule, increment_steps
from .checks import IMPL_FLAGS, check_betas, check_bool, check_impl_flags, check_nonneg
from .fused import advance_steps, amp_tensors, by_device_and_dtype, kernel_lr, undo_skipped_steps
from .scalars import as_scalar, host_floats, per_distinct


class AdamRule(UpdateRule):
    """Adam; ``decoupled_weight_decay=True`` in a group gives AdamW's decay, as
    torch.optim.Adam's argument of that name does."""

    name = "adam"
    decoupled_weight_decay = False
    fused_kernel = True
    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "capturable": False,
        "decoupled_weight_decay": False,
        **IMPL_FLAGS,
    }

    def validate(self, hp: Mapping[str, Any]) -> None:
        # torch.optim.Adam takes a 1-element Tensor lr and Tensor betas (both or neither).
        check_nonneg("lr", hp["lr"], allow_tensor=True)
        check_nonneg("eps", hp["eps"])
        check_betas(hp["betas"], allow_tensor=True)
        check_nonneg("weight_decay", hp["weight_decay"])
        check_bool("amsgrad", hp["amsgrad"])
        check_bool("maximize", hp["maximize"])
        check_bool("decoupled_weight_decay", hp.get("decoupled_weight_decay", False))
        check_impl_flags(hp, ("lr", "betas"))

    def decoupled(self, hp: Mapping[str, Any]) -> bool:
        """Whether weight decay is decoupled: always for AdamW (torch.optim.AdamW forces
        the flag on load too), per group for Adam."""
        return self.decoupled_weight_decay or bool(hp.get("decoupled_weight_decay", False))

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
        if hp.get("fused"):
            self.fused_update(params, grads, states, hp)
            return
        lr, eps, weight_decay = as_scalar(hp["lr"]), hp["eps"], hp["weight_decay"]
        beta1, beta2 = (as_scalar(beta) for beta in hp["betas"])
        steps = increment_steps(states)
        # torch's scalar expressions on torch's types: a Tensor lr or beta keeps the
        # arithmetic in its dtype (rounding as torch.optim.Adam's default path does),
        # once per distinct step; every Tensor among them is read in one transfer.
        per_step = per_distinct(steps, lambda step: (
            (1 - beta2**step) ** 0.5, -(lr / (1 - beta1**step))))
        count = len(per_step)
        fixed = [1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay]
        values = host_floats([v for pair in per_step for v in pair] + fixed)
        bias2_sqrt, neg_step_sizes = values[0 : 2 * count : 2], values[1 : 2 * count : 2]
        weight1, beta2_value, weight2, decay = values[2 * count :]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        if hp["maximize"]:
            grads = torch._foreach_neg(grads)
        if weight_decay != 0:
            if self.decoupled(hp):
                torch._foreach_mul_(params, decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, weight1)
        torch._foreach_mul_(exp_avg_sqs, beta2_value)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=weight2)
        if hp["amsgrad"]:
            max_sqs = [state["max_exp_avg_sq"] for state in states]
            torch._foreach_maximum_(max_sqs, exp_avg_sqs)
            denom = torch._foreach_sqrt(max_sqs)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, neg_step_sizes)


    def fused_update(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                     hp: Mapping[str, Any]) -> None:
        """torch.optim.Adam's ``_fused_adam``: one kernel call per (device, dtype)."""
        # torch turns Tensor betas into numbers for the kernel's float arguments
        # (_to_scalar, then float()); one read for both.
        beta1, beta2 = host_floats([as_scalar(beta) for beta in hp["betas"]])
        amsgrad = hp["amsgrad"]
        kernel = torch._fused_adamw_ if self.decoupled(hp) else torch._fused_adam_
        columns = [params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                   [s["max_exp_avg_sq"] for s in states] if amsgrad else [None] * len(params),
                   [s["step"] for s in states]]
        for device, (p, g, m, v, vmax, steps) in by_device_and_dtype(columns):
            grad_scale, found_inf = amp_tensors(hp, device)
            advance_steps(steps)
            kernel(p, g, m, v, vmax if amsgrad else [], steps, amsgrad=amsgrad, lr=kernel_lr(hp["lr"], device),
                   beta1=beta1, beta2=beta2, weight_decay=hp["weight_decay"], eps=hp["eps"],
                   maximize=hp["maximize"], grad_scale=grad_scale, found_inf=found_inf)
            undo_skipped_steps(steps, found_inf)


class AdamWRule(AdamRule):
    name = "adamw"
    decoupled_weight_decay = True
    defaults = {**AdamRule.defaults, "weight_decay": 1e-2, "decoupled_weight_decay": True}
