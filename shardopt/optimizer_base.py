"""Single-process optimizers that execute an :class:`~shardopt.rules.UpdateRule`.

:class:`RuleOptimizer` is a real ``torch.optim.Optimizer``: param groups (named
ones too, with torch's ``param_names``), ``state_dict``/``load_state_dict`` in
torch.optim's format and state names, ``zero_grad``, closures and torch LR
schedulers all behave as in torch.optim. Its only job is bookkeeping: gather
parameters with gradients, allocate state from the rule's declaration, and hand
explicit tensors to the rule.

Implementation flags. torch.optim's ``foreach``, ``fused``, ``differentiable``
and ``capturable`` are accepted, kept in the param groups (state dicts keep
torch's keys) and checked as torch checks them (the same errors for the same
combinations). Two implementations run:

* ``fused=True`` (Adam, AdamW, SGD, Adagrad): torch's own one-pass kernels
  (``torch._fused_adam_`` and siblings, :mod:`shardopt.rules.fused`), called with
  the arguments torch.optim prepares, so results are bitwise those of torch.optim
  with ``fused=True``; ``step`` lives on the parameter's device and is never read
  to the host (SGD with dampening reads it once per group and step). This is the
  fast choice on CPU and CUDA: one read and one write per element and state.
  ``torch.amp.GradScaler`` works with it as with torch's fused optimizers
  (``_step_supports_amp_scaling``; its ``grad_scale``/``found_inf`` go to the kernel).
* anything else, including the default ``fused=None``: the operation order of
  torch.optim's default single-tensor path, run as foreach ops over cache-sized
  lists, so results are bitwise those of torch with the flags off (torch's own
  default on CPU). ``foreach=True`` selects the same code: torch's foreach path
  computes the same update in another order, so it may differ in the last bits.

The default stays torch's default (``fused=None``, the single-tensor order):
the drop-in promise is that ``shardopt.X(...)`` gives what ``torch.optim.X(...)``
gives with the same arguments; ``fused=True`` gives what torch's ``fused=True``
gives, and is faster in both. torch's fused Adam rounds differently from its
default path (last bits), so making it the default would break that promise.
With ``capturable=True``, ``step`` lives on the parameter's device, as torch
keeps it (and as torch moves it on load); the step is not captured in a CUDA
graph: per-step scalars are read to the host once per param group and step.
``differentiable=True`` does not make the step differentiable (it runs under
``torch.no_grad``); torch's capturable and differentiable paths compute the same
update in another order, so they may differ from shardopt (and from torch's
default path) in the last bits.

Host synchronisation. ``step`` is kept on the CPU, as torch.optim does without
``capturable``/``fused``, and every per-step scalar (step counts, bias
corrections, a Tensor ``lr``) is read in one transfer per group, never once per
parameter (:mod:`shardopt.rules.scalars`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .rules.base import MatrixRule, StateShape, UpdateRule, apply_update
from .rules.fused import FOUND_INF, GRAD_SCALE
from .rules.state_check import check_loaded_state

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


class RuleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose math is an :class:`UpdateRule`.

    Subclasses set :attr:`rule` (or override :meth:`rule_for_group` when
    different param groups follow different rules, as Muon's AdamW group does).
    """

    rule: UpdateRule

    def __init__(self, params: ParamsT, defaults: Mapping[str, Any]) -> None:
        defaults = dict(defaults)
        # Hyperparameters before parameters, as torch.optim checks them: a bad lr is
        # named even when params is None or empty.
        self.rule_for_group(defaults).validate(defaults)
        if isinstance(params, Tensor):
            raise TypeError(
                "Invalid params: params argument given to the optimizer should be an iterable of "
                f"Tensors or dicts, but got a single Tensor of shape {tuple(params.shape)}"
            )
        items = list(params)
        if not items:
            raise ValueError("Invalid params: optimizer got an empty parameter list")
        if isinstance(items[0], dict):
            for index, group in enumerate(items):
                if not isinstance(group, dict):
                    raise TypeError(f"Invalid params: param_groups[{index}] is a {type(group).__name__}; "
                                    "mixing dicts and tensors is not supported")
        self._param_labels: dict[int, str] = {}
        # torch.optim.Optimizer takes tensors, dicts and (name, tensor) pairs, and keeps
        # the names as each group's "param_names" (and refuses named and unnamed mixed).
        super().__init__(items, defaults)
        if defaults.get("fused") and self.rule_for_group(defaults).fused_kernel:
            # As torch.optim's Adam, AdamW, SGD and Adagrad with fused=True: GradScaler then sets grad_scale and
            # found_inf on the optimizer instead of unscaling the gradients itself.
            self._step_supports_amp_scaling = True

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
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        if not hasattr(self, "_param_labels"):
            self._param_labels = {}
        index = len(self.param_groups)
        raw = param_group.get("params")
        if raw is not None and not isinstance(raw, (Tensor, set)):
            raw = param_group["params"] = list(raw)
            for position, item in enumerate(raw):
                tensor = item[1] if isinstance(item, tuple) and len(item) == 2 else item
                if not isinstance(tensor, Tensor):
                    raise TypeError(
                        f"Invalid params: param_groups[{index}]['params'][{position}] is a "
                        f"{type(tensor).__name__}, expected a Tensor (optimizer can only optimize Tensors)")
        self.fill_group_defaults(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names")
        labels = [str(names[i]) if names else f"param_groups[{index}]['params'][{i}]"
                  for i in range(len(group["params"]))]
        try:
            rule = self.rule_for_group(group)
            rule.validate(group)
            for param, label in zip(group["params"], labels):
                rule.check_param(param, label)
        except (TypeError, ValueError, RuntimeError):
            self.param_groups.pop()
            raise
        for param, label in zip(group["params"], labels):
            self._param_labels.setdefault(id(param), label)

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
            if spec.name in state:
                continue
            dtype = spec.resolved_dtype(param.dtype)
            if spec.shape is StateShape.SCALAR:
                # torch.optim keeps step on the CPU unless capturable or fused
                # (note [special device hosting for step] in torch/optim/optimizer.py).
                device = param.device if group.get("capturable") or group.get("fused") else torch.device("cpu")
                tensor = torch.full((), spec.init, dtype=dtype, device=device)
                if spec.name == "step" and loaded:
                    # A checkpoint without "step" (torch.optim.SGD keeps none) whose
                    # buffers are already filled: the next step is not the first.
                    tensor.fill_(1.0)
            else:
                tensor = torch.full_like(param, spec.init, dtype=dtype, memory_format=torch.preserve_format)
            state[spec.name] = tensor
        return state

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, with torch's state names only (a rule's
        :meth:`~shardopt.rules.UpdateRule.hidden_state` is left out and rebuilt on load)."""
        packed = super().state_dict()
        for group in packed["param_groups"]:
            hidden = self.rule_for_group(group).hidden_state(group)
            for index in group["params"] if hidden else ():
                if index in packed["state"]:
                    entry = packed["state"][index]
                    packed["state"][index] = {k: v for k, v in entry.items() if k not in hidden}
        return packed

    def checkpoint_group(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """A saved param group with the keys it lacks filled so that it continues as the
        optimizer that saved it would: a torch.optim checkpoint lacks shardopt-only keys
        (Muon's ``ns_dtype``) and an older torch's lacks newer flags; each gets its rule's
        default, the value that reproduces torch's behaviour, not this optimizer's
        constructor arguments."""
        group = dict(saved)
        rule = self.rule_for_group(group)
        for key, value in {**self.defaults, **rule.defaults}.items():
            group.setdefault(key, value)
        return group

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict of this optimizer or of its torch.optim counterpart.

        Everything is checked before anything changes: the group sizes, every group's
        hyperparameters (after :meth:`checkpoint_group` fills what it lacks), and every
        parameter's state against its rule (names, sizes). A checkpoint this optimizer
        cannot continue exactly as its saver would is refused with the first problem named.
        """
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("Invalid state_dict: expected a dict with 'state' and 'param_groups', "
                             "as Optimizer.state_dict() returns")
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has a different number of parameter groups "
                             f"({len(saved_groups)}, this optimizer has {len(self.param_groups)})")
        if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's "
                f"group (sizes {[len(s['params']) for s in saved_groups]}, this optimizer's "
                f"{[len(g['params']) for g in self.param_groups]})")
        groups, states = [], dict(state_dict["state"])
        for index, (saved, current) in enumerate(zip(saved_groups, self.param_groups)):
            group = self.checkpoint_group(saved)
            rule = self.rule_for_group(group)
            try:
                rule.validate(group)
            except (TypeError, ValueError) as error:
                raise type(error)(f"Invalid state_dict: param_groups[{index}]: {error}") from error
            for key, param in zip(saved["params"], current["params"]):
                entry = states.get(key)
                if entry is None:
                    continue
                where = f"state[{key!r}] ({self.param_label(param)})"
                check_loaded_state(rule, group, param, entry, where)
                if not isinstance(entry.get("step", torch.zeros(())), Tensor):
                    # Checkpoints of old torch versions keep step as a number.
                    states[key] = {**entry, "step": torch.tensor(float(entry["step"]), dtype=torch.float32)}
            groups.append(group)
        super().load_state_dict({**state_dict, "state": states, "param_groups": groups})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = {GRAD_SCALE: getattr(self, "grad_scale", None), FOUND_INF: getattr(self, "found_inf", None)}
        scaled = any(value is not None for value in amp.values())
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
            rule = self.rule_for_group(group)
            if scaled:
                if not (rule.fused_kernel and group.get("fused")):
                    # torch's non-fused paths refuse them too (an assert in _single_tensor_adam).
                    raise RuntimeError(f"{type(self).__name__}: grad_scale/found_inf (torch.amp.GradScaler) "
                                       "are only supported with fused=True")
                group = {**group, **amp}
            if isinstance(rule, MatrixRule) and any(_is_dtensor(p) for p in params):
                # FSDP2/TP matrices: each transformed once, by one owner rank (docs/design/dtensor.md).
                from .dtensor.muon import dtensor_matrix_update

                dtensor_matrix_update(rule, params, grads, states, group)
                continue
            apply_update(rule, params, grads, states, group)
        return loss


def _is_dtensor(tensor: Tensor) -> bool:
    # No DTensor exists before torch.distributed.tensor is imported; importing it here
    # would only slow down single-process use.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)
