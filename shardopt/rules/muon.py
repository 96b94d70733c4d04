"""Muon: momentum orthogonalized by Newton-Schulz (chapter section 11).

For a weight matrix with gradient :math:`G_t` (Keller Jordan 2024, "Muon: An
optimizer for hidden layers in neural networks"; torch.optim.Muon)::

    B_t = \\mu B_{t-1} + (1 - \\mu) G_t                    (the chapter's m_t)
    U_t = (1 - \\mu) G_t + \\mu B_t   if nesterov   else   B_t
    O_t = NS_k(U_t) \\approx U V^T    where U_t = U \\Sigma V^T
    \\theta_{t+1} = (1 - \\eta\\lambda) \\theta_t - \\eta\\, s(rows, cols)\\, O_t

``ns_method`` (a shardopt group key; a group without it, torch.optim.Muon's
keys only, runs the standard iteration, as torch.optim.Muon) may be
``"gram"``, the same polynomials iterated through the Gram matrix
(:func:`~shardopt.rules.newton_schulz.gram_orthogonalize`; fewer multiply-adds
for rectangular matrices, equal in exact arithmetic, not bitwise), or
``"auto"``: Gram where it needs fewer multiply-adds, per shape.

The chapter's "project away high-curvature directions" is, in practice, the
replacement of every singular value by (about) one; see
:mod:`shardopt.rules.newton_schulz`. The scale ``s`` (``adjust_lr_fn``) is

* ``"original"`` (default, Jordan): :math:`\\sqrt{\\max(1, rows/cols)}`;
* ``"match_rms_adamw"`` (Liu et al. 2025, "Muon is Scalable for LLM Training",
  section 2.2): :math:`0.2\\sqrt{\\max(rows, cols)}`, which gives the update
  AdamW's RMS so AdamW's lr and weight decay transfer.

Only matrices take this rule; embeddings, the output head, norms and biases go
to AdamW through their param group (:func:`shardopt.muon_param_groups`).
The rule needs each matrix whole (:attr:`Granularity.MATRIX`).

How a parameter of more than two dimensions becomes matrices is the group's
``matrix_view`` (:func:`~shardopt.rules.newton_schulz.resolve_matrix_view`):
``"flatten"`` (conv kernels, ``(shape[0], rest)``) or ``"stack"`` (3-D expert
stacks, one matrix per slice); a group without the key keeps the shape rule (3-D
stacks, 4-D and more flattened). It is a group key, not a per-parameter flag,
because everything the ZeRO engine asks the rule (:meth:`MuonRule.transform_cost`,
:meth:`~MuonRule.batches`, :meth:`~MuonRule.transform`,
:meth:`~MuonRule.workspace_bytes`) sees a parameter's shape and its group's
hyperparameters only. It is not in :attr:`MuonRule.defaults`, so a group of 2-D
matrices has exactly torch.optim.Muon's keys.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import record_function

from .base import Granularity, MatrixRule, StateSpec
from .checks import check_bool, check_nonneg, check_unit_interval
from .newton_schulz import (
    MATRIX_VIEWS,
    as_matrices,
    check_ns_method,
    gram_workspace_numel,
    matrix_count,
    matrix_shape,
    newton_schulz_flops,
    orthogonalize,
    resolve_coefficients,
    resolve_matrix_view,
    resolve_ns_method,
)
from .scalars import as_scalar, host_floats

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# The profiler range around each Newton-Schulz call of MuonRule.transform, named with
# what it orthogonalizes: "shardopt.newton_schulz 3x16x8" is three 16x8 matrices.
NEWTON_SCHULZ_RANGE = "shardopt.newton_schulz"

# torch's CPU copy_ of a transposed matrix of at least this many elements into a
# contiguous one goes through a 60 x 60 block buffer (aten/src/ATen/native/Copy.cpp,
# copy_same_type_transpose_); see MuonRule.workspace_bytes.
TRANSPOSE_BLOCK_NUMEL = 60 * 60


def resolve_ns_dtype(value: object) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in NS_DTYPES.values():
        return value
    if isinstance(value, str) and value in NS_DTYPES:
        return NS_DTYPES[value]
    raise ValueError(f"Invalid ns_dtype: {value!r} (expected one of {sorted(NS_DTYPES)})")


def lr_scale(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def newton_schulz_range(count: int, rows: int, cols: int) -> str:
    """The range name of one Newton-Schulz call over ``count`` matrices of ``rows x cols``."""
    return f"{NEWTON_SCHULZ_RANGE} {count}x{rows}x{cols}"


def count_orthogonalized(events: Iterable[Any]) -> int:
    """Matrices Newton-Schulz orthogonalized in a ``torch.profiler`` trace.

    ``events``: ``prof.events()`` of a ``torch.profiler.profile`` (CPU activity
    suffices); read from the names of :data:`NEWTON_SCHULZ_RANGE` ranges, each
    counted once (a 3-D parameter counts one matrix per slice).
    """
    seen = set()
    for event in events:
        name = event.name
        if name.startswith(NEWTON_SCHULZ_RANGE + " ") and event.device_type == DeviceType.CPU:
            seen.add((event.thread, event.time_range.start, event.time_range.end, name))
    return sum(int(name.split()[-1].split("x")[0]) for *_, name in seen)


def _view(hp: Mapping[str, Any]) -> str | None:
    """The group's ``matrix_view``; None (the shape rule) when the group has no such key."""
    return hp.get("matrix_view")


def _method(hp: Mapping[str, Any], shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """``"standard"`` or ``"gram"`` for the matrices of a parameter of ``shape`` (the group's
    ``ns_method``; a group without the key, a torch.optim.Muon checkpoint's, is standard)."""
    rows, cols = matrix_shape(shape, _view(hp))
    return resolve_ns_method(hp.get("ns_method", "standard"), rows, cols, hp["ns_steps"], dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class MuonRule(MatrixRule):
    name = "muon"
    granularity = Granularity.MATRIX
    defaults = {
        "lr": 1e-3,
        "weight_decay": 0.1,
        "momentum": 0.95,
        "nesterov": True,
        "ns_coefficients": (3.4445, -4.7750, 2.0315),
        "eps": 1e-7,
        "ns_steps": 5,
        "adjust_lr_fn": None,
        "ns_dtype": "bfloat16",
    }

    def validate(self, hp: Mapping[str, Any]) -> None:
        check_nonneg("lr", hp["lr"], allow_tensor=True)  # torch.optim.Muon takes a 1-element Tensor lr
        check_nonneg("weight_decay", hp["weight_decay"])
        check_unit_interval("momentum", hp["momentum"])
        check_bool("nesterov", hp["nesterov"])
        check_nonneg("eps", hp["eps"])
        steps = hp["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"Invalid ns_steps: {steps!r} (expected an int >= 1)")
        if steps < 1:
            raise ValueError(f"Invalid ns_steps: {steps} (expected an int >= 1)")
        resolve_coefficients(hp["ns_coefficients"])
        if hp["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"Adjust learning rate function {hp['adjust_lr_fn']} is not supported "
                f"(Invalid adjust_lr_fn: {hp['adjust_lr_fn']!r}; expected one of {ADJUST_LR_FNS})"
            )
        resolve_ns_dtype(hp["ns_dtype"])
        check_ns_method(hp.get("ns_method", "standard"))
        if hp.get("matrix_view") not in (None, *MATRIX_VIEWS):
            raise ValueError(f"Invalid matrix_view: {hp['matrix_view']!r} (expected one of {MATRIX_VIEWS}, "
                             "or no key for the shape rule)")

    def check_param(self, param: Tensor, label: str) -> None:
        super().check_param(param, label)
        if param.ndim < 2:
            raise ValueError(
                f"{label}: Muon only supports 2D parameters (and, in shardopt, stacks of matrices and "
                f"conv kernels), got a {param.ndim}-D parameter of shape "
                f"{tuple(param.shape)}; put it in a param group with use_muon=False "
                "(shardopt.muon_param_groups does this)"
            )

    def state_specs(self, hp: Mapping[str, Any]) -> tuple[StateSpec, ...]:
        return (StateSpec("momentum_buffer"),)

    @torch.no_grad()
    def prepare(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                hp: Mapping[str, Any]) -> None:
        torch._foreach_lerp_([state["momentum_buffer"] for state in states], grads, 1 - hp["momentum"])

    @torch.no_grad()
    def direction(self, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        buf = state["momentum_buffer"]
        return grad.lerp(buf, hp["momentum"]) if hp["nesterov"] else buf

    def batches(self, shapes: Sequence[tuple[int, ...]], hp: Mapping[str, Any]) -> list[list[int]]:
        # Same-shape matrices are orthogonalized in one batched matmul where that
        # cannot change the result: in fp32. CPU bf16 batched matmuls round
        # differently from one-at-a-time ones (measured: 7 of 200 stacks of four
        # 16x16 matrices differed), which would make a matrix's update depend on
        # which other matrices share its rank, and a sharded run differ from an
        # unsharded one.
        if resolve_ns_dtype(hp["ns_dtype"]) != torch.float32:
            return [[index] for index in range(len(shapes))]
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, shape in enumerate(shapes):
            by_shape[tuple(shape)].append(index)
        return list(by_shape.values())

    @torch.no_grad()
    def transform(self, directions: list[Tensor], hp: Mapping[str, Any]) -> list[Tensor]:
        coefficients = resolve_coefficients(hp["ns_coefficients"])
        dtype = resolve_ns_dtype(hp["ns_dtype"])
        shape, view = tuple(directions[0].shape), _view(hp)
        count = len(directions) * matrix_count(shape, view)
        with record_function(newton_schulz_range(count, *matrix_shape(shape, view))):
            method = _method(hp, shape, dtype)
            if len(directions) == 1:
                outputs = [orthogonalize(as_matrices(directions[0], view), coefficients, hp["ns_steps"],
                                         eps=hp["eps"], dtype=dtype, method=method)]
            else:
                stack = torch.cat([as_matrices(d, view).reshape(-1, *matrix_shape(shape, view))
                                   for d in directions])
                ortho = orthogonalize(stack, coefficients, hp["ns_steps"], eps=hp["eps"], dtype=dtype,
                                      method=method)
                outputs = list(ortho.split(stack.shape[0] // len(directions)))
        return outputs

    def transform_cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> int:
        """Multiply-adds of Newton-Schulz per optimizer step (``ns_steps`` iterations,
        :func:`newton_schulz_flops`), summed over the matrices of a 3-D stack
        (``matrix_view``)."""
        view = _view(hp)
        dtype = resolve_ns_dtype(hp["ns_dtype"])
        return matrix_count(shape, view) * newton_schulz_flops(
            *matrix_shape(shape, view), hp["ns_steps"], _method(hp, shape, dtype), dtype)

    def workspace_bytes(self, shapes: Sequence[tuple[int, ...]], hp: Mapping[str, Any],
                        master_dtype: torch.dtype) -> int:
        """Peak transient bytes of :meth:`direction`, :meth:`transform` and :meth:`finish`
        over parameters of ``shapes`` in ``MatrixStep``'s order (read from this code and
        ``MatrixStep``'s loop; measured equal on CPU in ``tests/test_matrix_workspace.py``).

        :meth:`batches` makes same-shape groups when ``ns_dtype`` is float32,
        otherwise one parameter per batch. Per batch of ``n`` parameters holding
        ``k`` matrices of ``rows x cols`` (``m = min``), with ``w`` and ``s`` the
        bytes per element of the master dtype and of ``ns_dtype``:

        * :meth:`direction`: the Nesterov update of the batch's matrices,
          ``k rows cols w``, alive until the batch's last :meth:`finish` (none
          without ``nesterov``: the momentum buffer itself);
        * ``n > 1``: the ``torch.cat`` stack, ``k rows cols w``, alive through
          Newton-Schulz;
        * Newton-Schulz (:func:`orthogonalize`), at its peak inside the last
          ``addmm`` of a step: the current and the next X (``rows x cols``), the
          Gram matrix and the polynomial (``m x m``), ``k (2 rows cols + 2 m^2) s``
          (the Gram iteration, ``ns_method``: ``k s`` times
          :func:`~shardopt.rules.newton_schulz.gram_workspace_numel`, and no
          transposed copy);
          (a 3-D input's norms, ``k s``, are freed before the loop, with the cast
          and the normalisation).
          The first step of a tall 2-D input of at least 60 x 60 elements adds
          ``3600 s``: ``addmm`` copies the transposed X into its result through
          torch's 60 x 60 block buffer (:data:`TRANSPOSE_BLOCK_NUMEL`). The input
          cast to ``ns_dtype`` and the normalisation are alive only at smaller
          moments;
        * what ``MatrixStep`` still holds of the previous batch: its outputs,
          ``k' rows' cols' s``, until the names ``updates`` and ``update`` are bound
          again (after Newton-Schulz);
        * :meth:`finish`, one parameter (``p`` elements) at a time, with the
          batch's directions and outputs (``k rows cols s``) alive: when ``ns_dtype``
          is not the master dtype, torch's CPU kernels first bring the operands of
          ``param.add_(update)`` to the promoted dtype (``c`` bytes per element):
          a copy of the update unless that dtype is ``ns_dtype``, a copy of the
          parameter and a result buffer unless it is the master dtype (``p c``
          each). CUDA kernels cast on the fly: there this term is an upper bound.

        The result is the largest such sum over batches. Left out: 0-d
        temporaries (a 2-D input's norm, the Python floats torch wraps as 0-d
        tensors; a few tens of bytes), freed before Newton-Schulz's loop, which
        allocates more unless a matrix has a single element. Straddlers a rank
        owns come as assembled inputs, not from :meth:`direction`, and their
        results are held to the end of the step (the planner's ``muon
        exchange``): counted as whole matrices, the number is an upper bound.
        """
        ns_dtype = resolve_ns_dtype(hp["ns_dtype"])
        promoted = torch.promote_types(ns_dtype, master_dtype)
        w, s, c = _itemsize(master_dtype), _itemsize(ns_dtype), _itemsize(promoted)
        peak = held = 0
        view = _view(hp)
        for batch in self.batches(shapes, hp):
            shape = tuple(shapes[batch[0]])
            rows, cols = matrix_shape(shape, view)
            per_param = matrix_count(shape, view)
            count = len(batch) * per_param
            numel = count * rows * cols
            directions = numel * w if hp["nesterov"] else 0
            stacked = len(batch) > 1 or (len(shape) == 3 and resolve_matrix_view(view, shape) == "stack")
            stack = numel * w if len(batch) > 1 else 0
            gram = _method(hp, shape, ns_dtype) == "gram"
            if gram:
                newton_schulz = count * gram_workspace_numel(rows, cols, hp["ns_steps"], ns_dtype) * s
            else:
                newton_schulz = count * (2 * rows * cols + 2 * min(rows, cols) ** 2) * s
            if not stacked and not gram and rows > cols and rows * cols >= TRANSPOSE_BLOCK_NUMEL:
                newton_schulz += TRANSPOSE_BLOCK_NUMEL * s
            p = per_param * rows * cols
            finish = (p * c if promoted != ns_dtype else 0) + (2 * p * c if promoted != master_dtype else 0)
            peak = max(peak, held + directions + stack + newton_schulz, directions + numel * s + finish)
            held = numel * s
        return peak

    def exchange_dtype(self, hp: Mapping[str, Any], master_dtype: torch.dtype) -> torch.dtype:
        # Newton-Schulz first casts its input to ns_dtype (orthogonalize) and returns
        # ns_dtype, so slices travel in it at no change of result: bf16 halves the bytes.
        return resolve_ns_dtype(hp["ns_dtype"])

    def host_scalars(self, hp: Mapping[str, Any], shapes: Sequence[tuple[int, ...]]) -> dict[str, Any]:
        """``hp`` with the decay factor and each shape's step size as Python floats, read
        in one transfer when ``lr`` is a Tensor (torch.optim.Muon computes ``1 - lr * wd``
        and ``lr * scale`` in the Tensor's dtype, then uses them as scalars)."""
        lr = as_scalar(hp["lr"])
        scales = sorted({lr_scale(hp["adjust_lr_fn"], *matrix_shape(shape, _view(hp))) for shape in shapes})
        values = host_floats([1 - lr * hp["weight_decay"], *(-(lr * scale) for scale in scales)])
        return {**hp, "_decay": values[0], "_neg_step": dict(zip(scales, values[1:]))}

    def update(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
               hp: Mapping[str, Any]) -> None:
        if params:
            super().update(params, grads, states, self.host_scalars(hp, [tuple(p.shape) for p in params]))

    @torch.no_grad()
    def finish(self, param: Tensor, update: Tensor, shape: tuple[int, ...], hp: Mapping[str, Any]) -> None:
        scale = lr_scale(hp["adjust_lr_fn"], *matrix_shape(shape, _view(hp)))
        if "_decay" not in hp:  # called directly (ZeRO's MatrixStep), not through update()
            hp = self.host_scalars(hp, [shape])
        if hp["weight_decay"] != 0:
            param.mul_(hp["_decay"])
        param.add_(update.reshape(param.shape), alpha=hp["_neg_step"][scale])
