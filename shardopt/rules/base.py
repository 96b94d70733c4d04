"""Update rules declared once: hyperparameters, per-parameter state, granularity.

An :class:`UpdateRule` is the single source of truth about an optimizer family.
The single-process optimizers, the ZeRO engine, checkpoints and the memory
planner all read the same declaration (habit 1 of the design: optax declares
``ScaleByAdamState`` right above ``scale_by_adam``), so the bytes the planner
predicts are the bytes the runtime allocates.

The math lives in :meth:`UpdateRule.update`, a function over tensors with
*explicit* gradients, apart from the bookkeeping that gathers them (the split
``torch/optim/adam.py`` makes between ``_init_group`` and ``_single_tensor_adam``).
Because the update never looks at ``param.grad``, the same code runs on whole
parameters (single process), on a flat slice of a bucket (ZeRO, elementwise
rules) and on whole matrices owned by one rank (ZeRO, Muon).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.profiler import record_function

from .checks import UnsupportedParamError, check_betas, check_bool, check_nonneg, check_unit_interval
from .local import split_local
from .scalars import step_values


class Granularity(enum.Enum):
    """How much of a parameter one application of the rule must see.

    ``ELEMENTWISE`` rules (SGD, Adagrad, RMSprop, Adam, AdamW, Lion) are exact on
    any slice of a flattened parameter, so ZeRO may cut parameters anywhere.
    ``MATRIX`` rules (Muon) need each weight matrix whole.
    """

    ELEMENTWISE = "elementwise"
    MATRIX = "matrix"


class StateShape(enum.Enum):
    """Shape of one piece of optimizer state: like the parameter, or a scalar."""

    PARAM = "param"
    SCALAR = "scalar"


@dataclass(frozen=True)
class StateSpec:
    """One tensor of optimizer state kept per parameter (or per shard region).

    Attributes:
        name: torch.optim's state name (``exp_avg``, ``momentum_buffer``, ...).
        shape: :attr:`StateShape.PARAM` (same number of elements as the
            parameter or region it belongs to) or :attr:`StateShape.SCALAR`.
        dtype: ``None`` means the dtype of the (master) parameter; scalars such
            as ``step`` are float32 as in torch.optim.
        init: initial fill value.
    """

    name: str
    shape: StateShape = StateShape.PARAM
    dtype: torch.dtype | None = None
    init: float = 0.0

    def numel(self, param_numel: int) -> int:
        return param_numel if self.shape is StateShape.PARAM else 1

    def resolved_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return param_dtype if self.dtype is None else self.dtype

    def nbytes(self, param_numel: int, param_dtype: torch.dtype) -> int:
        """Bytes this state occupies for a parameter of ``param_numel`` elements."""
        itemsize = torch.empty((), dtype=self.resolved_dtype(param_dtype)).element_size()
        return self.numel(param_numel) * itemsize


STEP = StateSpec("step", StateShape.SCALAR, torch.float32)


def allocate_state(
    specs: Sequence[StateSpec], like: Tensor, *, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Allocate the tensors ``specs`` declare for a parameter (or region) ``like``."""
    base_dtype = like.dtype if dtype is None else dtype
    state: dict[str, Tensor] = {}
    for spec in specs:
        spec_dtype = spec.resolved_dtype(base_dtype)
        if spec.shape is StateShape.SCALAR:
            state[spec.name] = torch.full((), spec.init, dtype=spec_dtype, device=like.device)
        else:
            state[spec.name] = torch.full_like(like, spec.init, dtype=spec_dtype)
    return state


# Validation helpers live in .checks; re-exported here for the rules that import them from .base.
__all__ = [
    "STEP", "Granularity", "MatrixRule", "StateShape", "StateSpec", "UpdateRule", "allocate_state",
    "apply_update", "check_betas", "check_bool", "check_nonneg", "check_unit_interval", "increment_steps",
    "region_views",
]


class UpdateRule(abc.ABC):
    """Declaration and math of one optimizer family.

    Subclasses set :attr:`name`, :attr:`granularity` and :attr:`defaults`, and
    implement :meth:`validate`, :meth:`state_specs` and :meth:`update`.

    ``update`` receives lists of equally shaped ``params``/``grads`` and one
    state dict per parameter, and modifies params and states in place. It
    increments the ``step`` state itself, so a skipped step leaves every state
    untouched.
    """

    name: ClassVar[str]
    granularity: ClassVar[Granularity] = Granularity.ELEMENTWISE
    defaults: ClassVar[Mapping[str, Any]]
    #: ``update`` runs torch's fused kernel when a group says ``fused=True`` (:mod:`.fused`).
    fused_kernel: ClassVar[bool] = False

    @abc.abstractmethod
    def validate(self, hp: Mapping[str, Any]) -> None:
        """Raise ValueError/TypeError naming the first bad hyperparameter."""

    @abc.abstractmethod
    def state_specs(self, hp: Mapping[str, Any]) -> tuple[StateSpec, ...]:
        """The state this rule keeps per parameter under hyperparameters ``hp``."""

    @abc.abstractmethod
    def update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        hp: Mapping[str, Any],
    ) -> None:
        """Update ``params`` and ``states`` in place from explicit ``grads``."""

    def hidden_state(self, hp: Mapping[str, Any]) -> frozenset[str]:
        """State names this rule keeps that torch.optim's counterpart does not (SGD's
        ``step``): the single-process optimizers leave them out of ``state_dict()``, so
        their state dicts have torch's keys, and rebuild them on load."""
        return frozenset()

    def state_bytes(self, hp: Mapping[str, Any], numel: int, dtype: torch.dtype) -> int:
        """Bytes of state for one parameter (or region) of ``numel`` elements."""
        return sum(spec.nbytes(numel, dtype) for spec in self.state_specs(hp))

    def check_param(self, param: Tensor, label: str) -> None:
        """Reject parameters this rule cannot update; ``label`` names it."""
        if param.is_complex():
            raise UnsupportedParamError(
                f"{label}: {type(self).__name__.removesuffix('Rule')} does not support complex "
                "parameters (view them as real with torch.view_as_real)"
            )
        if not param.is_floating_point():
            raise UnsupportedParamError(f"{label}: expected a floating-point parameter, got {param.dtype}")


class MatrixRule(UpdateRule):
    """A rule that needs each matrix whole, split into three phases.

    The ZeRO engine keeps a matrix's elements (and its elementwise state) where
    the plan puts them, possibly across ranks, and calls the phases around the
    exchange that brings each matrix whole to the one rank transforming it:

    1. :meth:`prepare` (elementwise, in place): on any slice of the flattened
       parameters, e.g. a rank's whole area at once (Muon: momentum).
    2. :meth:`direction` (elementwise, new tensor): what the matrix transform
       takes, per slice (Muon: the Nesterov update).
    3. :meth:`transform` (whole matrices): directions of one batch from
       :meth:`batches` -> update directions (Muon: Newton-Schulz).
    4. :meth:`finish` (elementwise given the matrix's shape): apply a slice of
       the transformed direction to the same slice of the parameter.

    :meth:`update` composes the phases for whole parameters (single process).
    """

    granularity: ClassVar[Granularity] = Granularity.MATRIX

    @abc.abstractmethod
    def prepare(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                hp: Mapping[str, Any]) -> None:
        """Elementwise state update before the transform."""

    @abc.abstractmethod
    def direction(self, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        """The transform's input for a slice (a new tensor or a state view not changed later)."""

    @abc.abstractmethod
    def batches(self, shapes: Sequence[tuple[int, ...]], hp: Mapping[str, Any]) -> list[list[int]]:
        """Indices of ``shapes`` that :meth:`transform` may process together."""

    @abc.abstractmethod
    def transform(self, directions: list[Tensor], hp: Mapping[str, Any]) -> list[Tensor]:
        """Whole-matrix transform of one batch of equally shaped directions."""

    @abc.abstractmethod
    def finish(self, param: Tensor, update: Tensor, shape: tuple[int, ...], hp: Mapping[str, Any]) -> None:
        """Apply ``update`` (same slice as ``param``) of a matrix of ``shape`` in place."""

    @abc.abstractmethod
    def transform_cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> int:
        """Multiply-adds of :meth:`transform` per step for one parameter of ``shape``.

        The matrix layouts balance it over ranks (``ParamInfo.transform_cost``).
        Elementwise rules have no transform, hence no such method.
        """

    @abc.abstractmethod
    def workspace_bytes(self, shapes: Sequence[tuple[int, ...]], hp: Mapping[str, Any],
                        master_dtype: torch.dtype) -> int:
        """Peak bytes that :meth:`direction`, :meth:`transform` and :meth:`finish` allocate
        beyond the states and the master weights while ``MatrixStep`` (or :meth:`update`)
        runs the batches of :meth:`batches` over parameters of ``shapes``, in that order.

        ``master_dtype`` is the dtype of the master weights, states and gradients.
        The memory planner adds it to a rank's bytes; each rule derives it from its
        own code, next to that code, and a test measures it
        (``tests/test_matrix_workspace.py``).
        """

    def exchange_dtype(self, hp: Mapping[str, Any], master_dtype: torch.dtype) -> torch.dtype:
        """The dtype in which slices of directions travel to a matrix's owner and slices
        of the transformed update travel back.

        It must depend on ``hp`` and the master dtype only, never on a rank's
        local tensors: every rank of an exchange must agree on it, including
        ranks with nothing to send. Converting a direction to it before the
        exchange must not change :meth:`transform`'s result. The default is the
        master dtype (exact for any rule).
        """
        return master_dtype

    def update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        hp: Mapping[str, Any],
    ) -> None:
        if not params:
            return
        self.prepare(params, grads, states, hp)
        for batch in self.batches([tuple(p.shape) for p in params], hp):
            # Directions per batch, not for all matrices at once: each is a
            # temporary as large as the matrices it covers.
            directions = [self.direction(grads[i], states[i], hp) for i in batch]
            with record_function("shardopt.matrix_transform"):
                updates = self.transform(directions, hp)
            for i, update in zip(batch, updates):
                self.finish(params[i], update, tuple(params[i].shape), hp)
            # As MatrixStep: the directions die with their batch (workspace_bytes counts so).
            del directions


def increment_steps(states: list[dict[str, Tensor]]) -> list[float]:
    """Add one to each ``step`` state and return the new values as Python floats,
    read in one transfer per device (:func:`~.scalars.step_values`), not one per parameter."""
    steps = [state["step"] for state in states]
    if not steps:
        return []
    torch._foreach_add_(steps, 1.0)
    return step_values(steps)


# Elementwise rules run torch._foreach_* ops, whose out-of-place results (Adam's
# denominator, RMSprop's average) are as large as the whole list they cover. On
# CPU a model-sized temporary is re-mapped by the kernel every step (page
# faults) and never stays in cache; torch.optim's default per-parameter loop
# avoids that. Feeding the rule lists of at most this many elements restores the
# cache reuse and keeps results bitwise equal (the ops and their order are
# unchanged: the rules are elementwise). Measured in benchmarks/bench_rules.py.
CPU_CHUNK_NUMEL = 1 << 20


def apply_update(
    rule: UpdateRule,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    hp: Mapping[str, Any],
) -> None:
    """``rule.update`` over cache-sized lists on CPU; one call elsewhere, for matrix rules
    and for fused kernels (one pass, no temporaries: nothing to keep in cache).

    An elementwise rule on DTensor parameters runs on their local shards, without
    communication, where gradient and states share the parameter's layout
    (:mod:`.local`); other DTensors go to the rule as they are.
    """
    if rule.granularity is Granularity.ELEMENTWISE and params:
        (params, grads, states), distributed = split_local(params, grads, states)
        if distributed[0]:
            rule.update(*distributed, hp)
    if (
        rule.granularity is not Granularity.ELEMENTWISE
        or not params
        or params[0].device.type != "cpu"
        or (rule.fused_kernel and hp.get("fused"))
        or sum(p.numel() for p in params) <= CPU_CHUNK_NUMEL
    ):
        rule.update(params, grads, states, hp)
        return
    batch: tuple[list[Tensor], list[Tensor], list[dict[str, Tensor]]] = ([], [], [])
    batch_numel = 0
    for param, grad, state in zip(params, grads, states):
        for piece in _pieces(param, grad, state):
            if batch_numel + piece[0].numel() > CPU_CHUNK_NUMEL and batch[0]:
                rule.update(*batch, hp)
                batch, batch_numel = ([], [], []), 0
            for target, item in zip(batch, piece):
                target.append(item)  # type: ignore[attr-defined]
            batch_numel += piece[0].numel()
    if batch[0]:
        rule.update(*batch, hp)


def _pieces(param: Tensor, grad: Tensor, state: dict[str, Tensor]):
    """Views of ``param``, its gradient and its state in chunks of CPU_CHUNK_NUMEL elements."""
    numel = param.numel()
    if numel <= CPU_CHUNK_NUMEL or not (param.is_contiguous() and grad.is_contiguous()):
        yield param, grad, state
        return
    yield from region_views(param, grad, state, [(start, min(start + CPU_CHUNK_NUMEL, numel))
                                                 for start in range(0, numel, CPU_CHUNK_NUMEL)])


def region_views(param: Tensor, grad: Tensor, state: Mapping[str, Tensor],
                 bounds: Sequence[tuple[int, int]]) -> list[tuple[Tensor, Tensor, dict[str, Tensor]]]:
    """``(param, grad, state)`` views of the flattened (contiguous) tensors over each
    ``[start, stop)`` of ``bounds``, for an elementwise rule to update region by region.

    Scalar states (``step``) are shared by every region: the first region holds the
    real tensor, the others a copy taken before the update, so the step advances
    once and every region sees the same value.
    """
    flat = {name: t.view(-1) for name, t in state.items() if t.dim() > 0}
    scalars = {name: t for name, t in state.items() if t.dim() == 0}
    copies = {name: t.clone() for name, t in scalars.items()}
    param, grad = param.view(-1), grad.view(-1)
    out = []
    for index, (start, stop) in enumerate(bounds):
        piece_state = {name: t[start:stop] for name, t in flat.items()}
        for name in scalars:
            piece_state[name] = scalars[name] if index == 0 else copies[name].clone()
        out.append((param[start:stop], grad[start:stop], piece_state))
    return out
