"""Single-process optimizers that execute an :class:`~shardopt.rules.UpdateRule`.

:class:`RuleOptimizer` is a real ``torch.optim.Optimizer``: param groups,
``state_dict``/``load_state_dict`` in torch.optim's format and state names,
``zero_grad``, closures and torch LR schedulers all behave as in torch.optim.
Its only job is bookkeeping: gather parameters with gradients, allocate state
from the rule's declaration, and hand explicit tensors to the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .rules.base import STEP, UpdateRule, allocate_state, apply_update

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


def normalize_params(params: ParamsT) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Param groups as dicts, and a readable label per parameter id.

    Accepts an iterable of tensors, of param-group dicts, or of ``(name, tensor)``
    pairs (``model.named_parameters()``), also inside a group's ``params``.
    """
    if isinstance(params, Tensor):
        raise TypeError(
            "Invalid params: expected an iterable of Tensors, dicts or (name, Tensor) pairs, "
            f"got a single Tensor of shape {tuple(params.shape)}"
        )
    items = list(params)
    if not items:
        raise ValueError("Invalid params: optimizer got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    labels: dict[int, str] = {}
    normalized = []
    for group_index, group in enumerate(groups):
        if not isinstance(group, dict):
            raise TypeError(
                f"Invalid params: param_groups[{group_index}] is a {type(group).__name__}; "
                "mixing dicts and tensors is not supported"
            )
        group = dict(group)
        raw = group["params"]
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        tensors = []
        for index, item in enumerate(raw):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
                name, tensor = item
            else:
                name, tensor = f"param_groups[{group_index}]['params'][{index}]", item
            if not isinstance(tensor, Tensor):
                raise TypeError(
                    f"Invalid params: param_groups[{group_index}]['params'][{index}] is a "
                    f"{type(tensor).__name__}, expected a Tensor"
                )
            labels.setdefault(id(tensor), str(name))
            tensors.append(tensor)
        group["params"] = tensors
        normalized.append(group)
    return normalized, labels


class RuleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose math is an :class:`UpdateRule`.

    Subclasses set :attr:`rule` (or override :meth:`rule_for_group` when
    different param groups follow different rules, as Muon's AdamW group does).
    """

    rule: UpdateRule

    def __init__(self, params: ParamsT, defaults: Mapping[str, Any]) -> None:
        groups, self._param_labels = normalize_params(params)
        super().__init__(groups, dict(defaults))

    def rule_for_group(self, group: Mapping[str, Any]) -> UpdateRule:
        return self.rule

    @classmethod
    def default_groups(cls, named: Iterable[tuple[str, Tensor]]) -> list[tuple[list[Tensor], UpdateRule, bool]]:
        """The param groups this optimizer's documented usage forms from a model's named
        parameters, without constructing one: ``(params, rule, configured)`` per group,
        ``configured`` when the constructor's main keyword arguments set that group's
        hyperparameters. The memory planner reads it (constructing a
        ``torch.optim.Optimizer`` first imports torch._dynamo, which takes seconds).
        """
        return [([p for _, p in named], cls.rule, True)]

    def param_label(self, param: Tensor) -> str:
        labels = getattr(self, "_param_labels", {})
        return labels.get(id(param), f"parameter of shape {tuple(param.shape)}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        labels = getattr(self, "_param_labels", None)
        if labels is None:
            self._param_labels = {}
        if isinstance(param_group.get("params"), (list, tuple)) and any(
            isinstance(p, tuple) for p in param_group["params"]
        ):
            (param_group,), new_labels = normalize_params([param_group])
            self._param_labels.update(new_labels)
        self.fill_group_defaults(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        rule = self.rule_for_group(group)
        try:
            rule.validate(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for param in group["params"]:
            try:
                rule.check_param(param, self.param_label(param))
            except (TypeError, ValueError):
                self.param_groups.pop()
                raise

    def fill_group_defaults(self, param_group: dict[str, Any]) -> None:
        """Hook for optimizers whose defaults depend on the group (Muon)."""

    def init_state(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        """The state of ``param``, allocating what its rule declares and it lacks."""
        specs = self.rule_for_group(group).state_specs(group)
        if not specs and param not in self.state:
            return {}  # keep no entry at all, as torch.optim.SGD without momentum does
        state = self.state[param]
        loaded = bool(state)
        for spec in specs:
            if spec.name not in state:
                (tensor,) = allocate_state((spec,), param).values()
                if spec is STEP and loaded:
                    # A torch.optim checkpoint without "step" (SGD keeps none) whose
                    # buffers are already filled: the next step is not the first.
                    tensor.fill_(1.0)
                state[spec.name] = tensor
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise TypeError(
                        f"{self.param_label(param)}: sparse gradients are not supported "
                        f"by {type(self).__name__}"
                    )
                params.append(param)
                grads.append(param.grad)
                states.append(self.init_state(param, group))
            apply_update(self.rule_for_group(group), params, grads, states, group)
        return loss
