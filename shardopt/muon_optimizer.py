"""Muon for hidden matrices and AdamW for everything else, in one optimizer.

Groups with ``use_muon=True`` (the default) follow :class:`~shardopt.rules.MuonRule`;
groups with ``use_muon=False`` follow :class:`~shardopt.rules.AdamWRule` with
AdamW's own hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``), as in
Keller Jordan's ``MuonWithAuxAdam``. :func:`muon_param_groups` builds the two
groups from a model.

Example::

    groups = shardopt.muon_param_groups(model, adamw_lr=3e-4)
    print(groups.summary())            # what went where, and why
    opt = shardopt.Muon(groups, lr=0.02)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .optimizer_base import ParamsT, RuleOptimizer
from .rules import AdamWRule, MuonRule, UpdateRule

DEFAULT_ADAMW_EXCLUDE = ("embed", "wte", "wpe", "lm_head", "output", "head")


class Muon(RuleOptimizer):
    """Muon (matrix groups) with an AdamW remainder (``use_muon=False`` groups).

    The keyword arguments are torch.optim.Muon's (``lr`` may be a 1-element Tensor), and
    apply to Muon groups. The ``adamw_*`` keywords are the defaults of ``use_muon=False``
    groups; any key set in a group wins. ``ns_dtype`` and ``use_muon`` are shardopt's own
    group keys: a torch.optim.Muon checkpoint lacks them and loads with torch's semantics,
    ``ns_dtype="bfloat16"`` and ``use_muon=True`` (:meth:`checkpoint_group`), whatever
    this optimizer was constructed with.

    Beyond torch.optim.Muon, which refuses every parameter that is not 2-D, Muon
    groups take stacks of matrices (3-D, one matrix per slice) and conv kernels
    (as ``(out, rest)``); 0-D and 1-D parameters are refused with torch's ValueError.
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
        super().__init__(params, dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, use_muon=True,
        ))

    def rule_for_group(self, group: Mapping[str, Any]) -> UpdateRule:
        return self.muon_rule if group.get("use_muon", True) else self.adamw_rule

    @classmethod
    def default_groups(cls, named: Iterable[tuple[str, Tensor]]) -> list[tuple[list[Tensor], UpdateRule, bool]]:
        """:func:`muon_param_groups`' groups; the AdamW group's hyperparameters come from
        the ``adamw_*`` keywords, not the main ones."""
        return [(group["params"], MuonRule() if group["use_muon"] else AdamWRule(), group["use_muon"])
                for group in muon_param_groups(named)]

    def fill_group_defaults(self, param_group: dict[str, Any]) -> None:
        if not param_group.get("use_muon", True):
            for key, value in self._adamw_defaults.items():
                param_group.setdefault(key, value)
            # Muon-only keys would be meaningless in an AdamW group.
            for key in self.defaults:
                if key not in self._adamw_defaults and key != "use_muon":
                    param_group.setdefault(key, None)


@dataclass
class MuonParamGroups(Sequence):
    """The two param groups for :class:`Muon`, with the reason for each placement.

    Behaves as the list of groups (pass it to ``Muon`` or ``ZeroOptimizer``).
    """

    groups: list[dict[str, Any]]
    placement: list[tuple[str, str, tuple[int, ...], str]] = field(default_factory=list)

    def __getitem__(self, index):  # type: ignore[override]
        return self.groups[index]

    def __len__(self) -> int:
        return len(self.groups)

    def summary(self) -> str:
        """One line per parameter: where it went, its shape, and why."""
        lines = []
        for name, kind, shape, reason in self.placement:
            lines.append(f"{kind:5s} {name:40s} {shape!s:20s} {reason}")
        counts = {
            kind: sum(int(torch.Size(s).numel()) for _, k, s, _ in self.placement if k == kind)
            for kind in ("muon", "adamw")
        }
        lines.append(f"muon: {counts['muon']:,} elements; adamw: {counts['adamw']:,} elements")
        return "\n".join(lines)


def muon_param_groups(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    *,
    adamw_patterns: Sequence[str] = DEFAULT_ADAMW_EXCLUDE,
    min_ndim: int = 2,
    **adamw_group_options: Any,
) -> MuonParamGroups:
    """Split parameters into a Muon group (hidden matrices) and an AdamW group.

    A parameter goes to Muon when it has at least ``min_ndim`` dimensions and its
    name matches none of ``adamw_patterns`` (regular expressions, searched in the
    name): embeddings and the output head are matrices, but Muon's authors
    update them with AdamW (Jordan 2024, "Muon", section "Empirical
    considerations"). Frozen parameters are left out. Options such as
    ``lr=3e-4`` given here go into the AdamW group (prefixless), e.g.
    ``muon_param_groups(model, lr=3e-4, betas=(0.9, 0.95))``.
    """
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    compiled = [re.compile(pattern) for pattern in adamw_patterns]
    muon: list[Tensor] = []
    adamw: list[Tensor] = []
    placement = []
    for name, param in named:
        if not param.requires_grad:
            continue
        shape = tuple(param.shape)
        hit = next((p.pattern for p in compiled if p.search(name)), None)
        if param.ndim < min_ndim:
            adamw.append(param)
            placement.append((name, "adamw", shape, f"{param.ndim}-D"))
        elif hit is not None:
            adamw.append(param)
            placement.append((name, "adamw", shape, f"name matches {hit!r}"))
        else:
            muon.append(param)
            placement.append((name, "muon", shape, "hidden matrix"))
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True})
    if adamw:
        groups.append({"params": adamw, "use_muon": False, **adamw_group_options})
    if not groups:
        raise ValueError("Invalid model: no trainable parameters to split")
    return MuonParamGroups(groups, placement)
