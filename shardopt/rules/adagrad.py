"""AdaGrad (Duchi, Hazan & Singer 2011), chapter section 8.1.

::

    G_t = G_{t-1} + g_t \\odot g_t                    (G_0 = initial_accumulator_value)
    \\eta_t = \\eta / (1 + (t - 1) \\cdot lr\\_decay)
    \\theta_{t+1} = \\theta_t - \\eta_t g_t / (\\sqrt{G_t} + \\epsilon)

The chapter writes :math:`\\sqrt{G_t + \\epsilon}`; torch.optim.Adagrad (and
this rule) add :math:`\\epsilon` outside the root. Because :math:`G_t` only
grows, each coordinate's effective rate :math:`\\eta_t/(\\sqrt{G_t}+\\epsilon)`
never increases: the chapter's "learning rate monotonically decreases".

With ``fused=True`` in a group the update is torch's one-pass kernel
(``torch._fused_adagrad_``, :mod:`.fused`), bitwise equal to torch.optim.Adagrad
with ``fused=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import STEP, StateSpec, UpdateRule, increment_steps
from .checks import IMPL_FLAGS, check_bool, check_impl_flags, check_nonneg
from .fused import advance_steps, amp_tensors, by_device_and_dtype, kernel_lr, undo_skipped_steps
from .scalars import as_scalar, host_floats, per_distinct


class AdagradRule(UpdateRule):
    name = "adagrad"
    fused_kernel = True
    defaults = {
        "lr": 1e-2,
        "lr_decay": 0.0,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "eps": 1e-10,
        "maximize": False,
        **IMPL_FLAGS,
    }

    def validate(self, hp: Mapping[str, Any]) -> None:
        check_nonneg("lr", hp["lr"], allow_tensor=True)
        check_nonneg("lr_decay", hp["lr_decay"])
        check_nonneg("weight_decay", hp["weight_decay"])
        check_nonneg("initial_accumulator_value", hp["initial_accumulator_value"])
        check_nonneg("eps", hp["eps"])
        check_bool("maximize", hp["maximize"])
        check_impl_flags(hp)

    def state_specs(self, hp: Mapping[str, Any]) -> tuple[StateSpec, ...]:
        return (STEP, StateSpec("sum", init=float(hp["initial_accumulator_value"])))

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
        lr, lr_decay, weight_decay = as_scalar(hp["lr"]), hp["lr_decay"], hp["weight_decay"]
        steps = increment_steps(states)
        sums = [state["sum"] for state in states]
        if hp["maximize"]:
            grads = torch._foreach_neg(grads)
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_addcmul_(sums, grads, grads, value=1)
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, hp["eps"])
        # torch's expression on torch's types (a Tensor lr divides in its own dtype),
        # once per distinct step, read to the host at once.
        neg_rates = host_floats(per_distinct(steps, lambda step: -(lr / (1 + (step - 1) * lr_decay))))
        torch._foreach_addcdiv_(params, grads, std, neg_rates)

    def fused_update(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                     hp: Mapping[str, Any]) -> None:
        """torch.optim.Adagrad's ``_fused_adagrad``: one kernel call per (device, dtype)."""
        columns = [params, grads, [s["sum"] for s in states], [s["step"] for s in states]]
        for device, (p, g, sums, steps) in by_device_and_dtype(columns):
            grad_scale, found_inf = amp_tensors(hp, device)
            advance_steps(steps)
            torch._fused_adagrad_(p, g, sums, steps, lr=kernel_lr(hp["lr"], device), lr_decay=hp["lr_decay"],
                                  weight_decay=hp["weight_decay"], eps=hp["eps"], maximize=hp["maximize"],
                                  grad_scale=grad_scale, found_inf=found_inf)
            undo_skipped_steps(steps, found_inf)
