"""Drop-in single-process optimizers: SGD, Adagrad, RMSprop, Adam, AdamW, Lion.

Each has torch.optim's argument names, defaults and state names, so state
dicts move between ``shardopt.X`` and ``torch.optim.X`` unchanged. Muon lives
in :mod:`shardopt.muon_optimizer`.

Example::

    opt = shardopt.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from .optimizer_base import ParamsT, RuleOptimizer
from .rules import AdagradRule, AdamRule, AdamWRule, LionRule, RMSpropRule, SGDRule


class SGD(RuleOptimizer):
    """SGD with optional momentum, dampening, Nesterov and weight decay (chapter 7)."""

    rule = SGDRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize,
        ))


class Adagrad(RuleOptimizer):
    """AdaGrad (chapter 8.1)."""

    rule = AdagradRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
        ))


class RMSprop(RuleOptimizer):
    """RMSProp, optionally centered and with momentum (chapter 8.2)."""

    rule = RMSpropRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, maximize=maximize,
        ))


class Adam(RuleOptimizer):
    """Adam with L2 weight decay through the gradient, optional AMSGrad (chapter 9)."""

    rule = AdamRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize,
        ))


class AdamW(RuleOptimizer):
    """AdamW: Adam with decoupled weight decay (chapter 10)."""

    rule = AdamWRule()

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize,
        ))


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
