"""Muon for hidden matrices and AdamW for everything else, in one optimizer.

Groups with ``use_muon=True`` (the default) follow :class:`~shardopt.rules.MuonRule`;
groups with ``use_muon=False`` follow :class:`~shardopt.rules.AdamWRule` with
AdamW's own hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``), as in
Keller Jordan's ``MuonWithAuxAdam``. :func:`muon_param_groups` builds the
groups from a model, by module type and shape first, names as an override.

Example::

    groups = shardopt.muon_param_groups(model, lr=3e-4)   # lr, betas...: the AdamW group's
    print(groups.summary())            # what went where, and why
    opt = shardopt.Muon(groups, lr=0.02)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from .muon_grouping import muon_param_groups
from .optimizer_base import ParamsT, RuleOptimizer
from .rules import AdamWRule, MuonRule, UpdateRule
from .rules.newton_schulz import resolve_matrix_view


class Muon(RuleOptimizer):
    """Muon (matrix groups) with an AdamW remainder (``use_muon=False`` groups).

    The keyword arguments are torch.optim.Muon's (``lr`` may be a 1-element Tensor), and
    apply to Muon groups. The ``adamw_*`` keywords are the defaults of ``use_muon=False``
    groups; any key set in a group wins. ``ns_dtype`` and ``use_muon`` are shardopt's own
    group keys: a torch.optim.Muon checkpoint lacks them and loads with torch's semantics,
    ``ns_dtype="bfloat16"`` and ``use_muon=True`` (:meth:`checkpoint_group`), whatever
    this optimizer was constructed with; ``ns_method`` likewise (``"standard"``). A
    group has the ``ns_method`` key only when it is not ``"standard"`` (set here or in
    the group), so default groups keep torch.optim.Muon's keys.

    ``ns_method``: ``"standard"`` (default: torch.optim.Muon's iteration, bitwise with
    bfloat16), ``"gram"`` (Gram Newton-Schulz, :mod:`shardopt.rules.newton_schulz`;
    measured 0.6-0.7x the time of the standard iteration on CPU for matrices four times
    as wide as tall, 1.2x for square ones) or ``"auto"`` (Gram where it takes fewer
    multiply-adds, per shape).

    Beyond torch.optim.Muon, which refuses every parameter that is not 2-D, Muon
    groups take conv kernels of any dimensionality (as ``(out, rest)``) and stacks of
    matrices (3-D, one matrix per slice); the group key ``matrix_view`` says which
    (``"flatten"`` or ``"stack"``; without it, the shape rule: 3-D stacks, more
    flattened); :func:`muon_param_groups` gives 3-D conv kernels (Conv1d) a group with
    ``matrix_view="flatten"``. 0-D and 1-D parameters are refused with torch's ValueError.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Any = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: str = "bfloat16",
        ns_method: str = "standard",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.1,
    ) -> None:
        self.muon_rule = MuonRule()
        self.adamw_rule = AdamWRule()
        self._adamw_defaults = {
            **AdamWRule.defaults,
            "lr": adamw_lr,
            "betas": adamw_betas,
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
        }
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, use_muon=True,
        )
        if ns_method != "standard":
            # Only when asked, as matrix_view: default groups keep torch.optim.Muon's keys.
            defaults["ns_method"] = ns_method
        super().__init__(params, defaults)

    def rule_for_group(self, group: Mapping[str, Any]) -> UpdateRule:
        return self.muon_rule if group.get("use_muon", True) else self.adamw_rule

    @classmethod
    def default_groups(cls, named: Iterable[tuple[str, Tensor]]) -> list[tuple[list[Tensor], UpdateRule, bool]]:
        """:func:`muon_param_groups`' groups; the AdamW group's hyperparameters come from
        the ``adamw_*`` keywords, not the main ones."""
        return [(group["params"], MuonRule() if group["use_muon"] else AdamWRule(), group["use_muon"])
                for group in muon_param_groups(named)]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group.get("use_muon", True):
            return
        # A "stack" view of a 4-D kernel would only fail at the first step (or inside
        # ZeroOptimizer's plan): refuse it here, naming the parameter.
        for param in group["params"]:
            try:
                resolve_matrix_view(group.get("matrix_view"), tuple(param.shape))
            except ValueError as error:
                self.param_groups.pop()
                raise ValueError(f"{self.param_label(param)}: {error}") from error

    def checkpoint_group(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        group = super().checkpoint_group(saved)
        if "ns_method" not in saved:
            group.pop("ns_method", None)  # a group without the key: the standard iteration
        return group

    def fill_group_defaults(self, param_group: dict[str, Any]) -> None:
        if not param_group.get("use_muon", True):
            for key, value in self._adamw_defaults.items():
                param_group.setdefault(key, value)
            # Muon-only keys would be meaningless in an AdamW group.
            for key in self.defaults:
                if key not in self._adamw_defaults and key != "use_muon":
                    param_group.setdefault(key, None)
