"""Drop-in single-process optimizers: SGD, Adagrad, RMSprop, Adam, AdamW, Lion.

Each takes torch.optim's arguments (names, order, keyword-only ones, defaults,
1-element Tensor ``lr`` and Tensor ``betas`` where torch takes them) and keeps
torch's state names and param-group keys, so state dicts move between
``shardopt.X`` and ``torch.optim.X`` unchanged, both ways. The implementation
flags ``foreach``, ``fused``, ``differentiable`` and ``capturable`` are accepted
and checked as torch checks them; what shardopt does with them is in
:mod:`shardopt.optimizer_base`. Muon lives in :mod:`shardopt.muon_optimizer`.

Example::

    opt = shardopt.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .optimizer_base import ParamsT, RuleOptimizer
from .rules import AdagradRule, AdamRule, AdamWRule, LionRule, RMSpropRule, SGDRule

Betas = tuple[float, float] | tuple[Tensor, Tensor]


class SGD(RuleOptimizer):
    """SGD with optional momentum, dampening, Nesterov and weight decay (chapter 7);
    torch.optim.SGD's arguments (``lr`` and ``weight_decay`` may be 1-element Tensors)."""

    rule = SGDRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | Tensor = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused,
        ))


class Adagrad(RuleOptimizer):
    """AdaGrad (chapter 8.1); torch.optim.Adagrad's arguments (``foreach`` positional
    after ``eps``, as there; ``lr`` may be a 1-element Tensor)."""

    rule = AdagradRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, foreach=foreach,
            maximize=maximize, differentiable=differentiable, fused=fused,
        ))


class RMSprop(RuleOptimizer):
    """RMSProp, optionally centered and with momentum (chapter 8.2); torch.optim.RMSprop's
    arguments (``lr`` may be a 1-element Tensor)."""

    rule = RMSpropRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, capturable=capturable, foreach=foreach, maximize=maximize,
            differentiable=differentiable,
        ))


class Adam(RuleOptimizer):
    """Adam with L2 weight decay through the gradient, optional AMSGrad (chapter 9);
    torch.optim.Adam's arguments. ``decoupled_weight_decay=True`` decays the weights
    directly, which makes it AdamW (torch.optim.Adam's argument of that name); a
    torch.optim.Adam checkpoint saved with it continues with decoupled decay."""

    rule = AdamRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
            fused=fused, decoupled_weight_decay=decoupled_weight_decay,
        ))


class AdamW(RuleOptimizer):
    """AdamW: Adam with decoupled weight decay (chapter 10); torch.optim.AdamW's arguments.
    As torch.optim.AdamW, its groups always say ``decoupled_weight_decay=True``, also
    after loading a checkpoint of Adam."""

    rule = AdamWRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
            fused=fused, decoupled_weight_decay=True,
        ))

    def checkpoint_group(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().checkpoint_group(saved), "decoupled_weight_decay": True}


def _betas(betas: Any) -> Any:
    # torch.optim.Adam stores 1-element Tensor betas as 0-d Tensors (_to_scalar);
    # anything else is left for the rule's validation to name.
    if isinstance(betas, (tuple, list)):
        return tuple(b.reshape(()) if isinstance(b, Tensor) and b.numel() == 1 else b for b in betas)
    return betas


class Lion(RuleOptimizer):
    """Lion: sign of an interpolated momentum (Chen et al. 2023)."""

    rule = LionRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize))
