"""SGD, heavy-ball momentum and Nesterov momentum (chapter sections 7.1-7.3).

With weight decay :math:`\\lambda`, momentum :math:`\\mu` and dampening :math:`d`
(Sutskever et al. 2013, "On the importance of initialization and momentum in
deep learning", in the form torch.optim.SGD uses)::

    g_t = \\nabla L(\\theta_t) + \\lambda \\theta_t
    b_t = \\mu b_{t-1} + (1 - d) g_t          (b_1 = g_1)
    u_t = g_t + \\mu b_t   if nesterov else   b_t
    \\theta_{t+1} = \\theta_t - \\eta u_t

The chapter's Nesterov form evaluates the gradient at the look-ahead point
:math:`\\theta_t - \\eta\\mu v_t`; the form above is the standard
reformulation that needs only the current gradient (Bengio et al. 2012,
"Advances in optimizing recurrent networks", eq. 7), as torch.optim.SGD does.

With ``fused=True`` in a group the update is torch's one-pass kernel
(``torch._fused_sgd_``, :mod:`.fused`), bitwise equal to torch.optim.SGD with
``fused=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import STEP, StateSpec, UpdateRule
from .checks import IMPL_FLAGS, check_bool, check_impl_flags, check_nonneg
from .fused import amp_tensors, by_device_and_dtype, kernel_lr, undo_skipped_steps
from .scalars import as_scalar, host_floats, step_values


class SGDRule(UpdateRule):
    name = "sgd"
    fused_kernel = True
    defaults = {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
        **IMPL_FLAGS,
    }

    def validate(self, hp: Mapping[str, Any]) -> None:
        # torch.optim.SGD takes a 1-element Tensor lr or weight_decay.
        check_nonneg("lr", hp["lr"], allow_tensor=True)
        check_nonneg("momentum", hp["momentum"])
        check_nonneg("dampening", hp["dampening"])
        check_nonneg("weight_decay", hp["weight_decay"], allow_tensor=True)
        check_bool("nesterov", hp["nesterov"])
        check_bool("maximize", hp["maximize"])
        if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
            raise ValueError(
                "Invalid nesterov: Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={hp['momentum']}, dampening={hp['dampening']})"
            )
        check_impl_flags(hp)

    def hidden_state(self, hp: Mapping[str, Any]) -> frozenset[str]:
        # torch.optim.SGD marks the first step by the buffer's absence, not by a count.
        return frozenset({"step"})

    def state_specs(self, hp: Mapping[str, Any]) -> tuple[StateSpec, ...]:
        if hp["momentum"] == 0:
            return ()
        # A zero-initialised buffer gives b_1 = mu * 0 + g_1 = g_1 exactly when
        # there is no dampening, so only dampened momentum needs to know that
        # this is the first step (torch.optim.SGD copies g_1 into the buffer).
        if hp["dampening"] == 0:
            return (StateSpec("momentum_buffer"),)
        return (StateSpec("momentum_buffer"), STEP)

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
        momentum, dampening = hp["momentum"], hp["dampening"]
        # torch passes -lr and weight_decay as Python scalars: a Tensor's value is
        # converted exactly (float32 -> float64), one read per step.
        lr, weight_decay = host_floats([as_scalar(hp["lr"]), as_scalar(hp["weight_decay"])])
        if hp["maximize"]:
            grads = torch._foreach_neg(grads)
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum != 0:
            bufs = [state["momentum_buffer"] for state in states]
            if dampening != 0:
                fresh = [step == 0 for step in step_values([state["step"] for state in states])]
                for is_fresh, buf, grad in zip(fresh, bufs, grads):
                    if is_fresh:
                        buf.copy_(grad)
                seen = [i for i, is_fresh in enumerate(fresh) if not is_fresh]
                if seen:
                    seen_bufs = [bufs[i] for i in seen]
                    torch._foreach_mul_(seen_bufs, momentum)
                    torch._foreach_add_(seen_bufs, [grads[i] for i in seen], alpha=1 - dampening)
                torch._foreach_add_([state["step"] for state in states], 1.0)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
            if hp["nesterov"]:
                grads = torch._foreach_add(grads, bufs, alpha=momentum)
            else:
                grads = bufs
        torch._foreach_add_(params, grads, alpha=-lr)

    def fused_update(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                     hp: Mapping[str, Any]) -> None:
        """torch.optim.SGD's ``_fused_sgd``.

        torch marks the first step by absent buffers and the kernel then copies the
        gradient into them. Without dampening the zero-initialised buffer gives the
        same ``b_1 = mu * 0 + 1 * g_1 = g_1`` on the kernel's later-step branch, so no
        step count is needed; with dampening the hidden ``step`` state splits the
        parameters into first-step and later ones (one host read per group and step).
        """
        momentum, dampening = hp["momentum"], hp["dampening"]
        # The kernel takes weight_decay as a float; torch converts a 0-d Tensor the same way.
        (weight_decay,) = host_floats([as_scalar(hp["weight_decay"])])
        fresh = [False] * len(params)
        if momentum != 0 and dampening != 0:
            fresh = [step == 0 for step in step_values([state["step"] for state in states])]
        bufs = [state["momentum_buffer"] for state in states] if momentum != 0 else [None] * len(params)
        steps = [state["step"] for state in states] if momentum != 0 and dampening != 0 else [None] * len(params)
        for first in (True, False):
            chosen = [i for i, is_fresh in enumerate(fresh) if is_fresh == first]
            if not chosen:
                continue
            columns = [[column[i] for i in chosen] for column in (params, grads, bufs, steps)]
            for device, (p, g, b, s) in by_device_and_dtype(columns):
                grad_scale, found_inf = amp_tensors(hp, device)
                torch._fused_sgd_(p, g, b if momentum != 0 else [], weight_decay=weight_decay,
                                  momentum=momentum, lr=kernel_lr(hp["lr"], device), dampening=dampening,
                                  nesterov=hp["nesterov"], maximize=hp["maximize"], is_first_step=first,
                                  grad_scale=grad_scale, found_inf=found_inf)
                if s[0] is not None:
                    torch._foreach_add_(s, 1.0)
                    undo_skipped_steps(s, found_inf)
