"""RMSProp (Tieleman & Hinton 2012, lecture 6.5), chapter section 8.2.

::

    v_t = \\alpha v_{t-1} + (1 - \\alpha) g_t^2
    \\bar g_t = \\alpha \\bar g_{t-1} + (1 - \\alpha) g_t          (centered only)
    d_t = \\sqrt{v_t - \\bar g_t^2} + \\epsilon   (centered)   or   \\sqrt{v_t} + \\epsilon
    b_t = \\mu b_{t-1} + g_t / d_t;  \\theta_{t+1} = \\theta_t - \\eta b_t   (momentum > 0)
    \\theta_{t+1} = \\theta_t - \\eta g_t / d_t                              (otherwise)

The chapter's decay rate :math:`\\beta` is torch's ``alpha``. The centered
variant is Graves 2013, "Generating Sequences With Recurrent Neural Networks",
eq. 38-45. The operation order is torch.optim.RMSprop's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import STEP, StateSpec, UpdateRule
from .checks import check_bool, check_impl_flags, check_nonneg, check_unit_interval
from .scalars import as_scalar, host_floats


class RMSpropRule(UpdateRule):
    name = "rmsprop"
    defaults = {
        "lr": 1e-2,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
        "maximize": False,
        "capturable": False,
        "foreach": None,
        "differentiable": False,
    }

    def validate(self, hp: Mapping[str, Any]) -> None:
        check_nonneg("lr", hp["lr"], allow_tensor=True)
        check_unit_interval("alpha", hp["alpha"])
        check_nonneg("eps", hp["eps"])
        check_nonneg("weight_decay", hp["weight_decay"])
        check_nonneg("momentum", hp["momentum"])
        check_bool("centered", hp["centered"])
        check_bool("maximize", hp["maximize"])
        check_impl_flags(hp)

    def state_specs(self, hp: Mapping[str, Any]) -> tuple[StateSpec, ...]:
        specs: tuple[StateSpec, ...] = (STEP, StateSpec("square_avg"))
        if hp["momentum"] > 0:
            specs += (StateSpec("momentum_buffer"),)
        if hp["centered"]:
            specs += (StateSpec("grad_avg"),)
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
        # torch passes -lr as a Python scalar: a Tensor lr converts exactly, one read per step.
        (lr,) = host_floats([as_scalar(hp["lr"])])
        alpha, momentum = hp["alpha"], hp["momentum"]
        # RMSprop never reads step (torch keeps it for checkpoints): advance it without
        # the host read increment_steps does.
        torch._foreach_add_([state["step"] for state in states], 1.0)
        square_avgs = [state["square_avg"] for state in states]
        if hp["maximize"]:
            grads = torch._foreach_neg(grads)
        if hp["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=hp["weight_decay"])
        torch._foreach_mul_(square_avgs, alpha)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
        if hp["centered"]:
            grad_avgs = [state["grad_avg"] for state in states]
            torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
            avg = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(square_avgs)
        torch._foreach_add_(avg, hp["eps"])
        if momentum > 0:
            bufs = [state["momentum_buffer"] for state in states]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_addcdiv_(bufs, grads, avg)
            torch._foreach_add_(params, bufs, alpha=-lr)
        else:
            torch._foreach_addcdiv_(params, grads, avg, value=-lr)
