"""ZeRO stage 3 as PyTorch's FSDP2 (``fully_shard``) allocates it, per data-parallel rank.

Read from ``torch/distributed/fsdp/_fully_shard/`` (torch 2.13) and checked
against a real ``fully_shard`` run, alone and on a dp x tp mesh
(``tests/test_planner_fsdp.py``). ``W`` is the data-parallel size; a
parameter of shape ``(d0, *rest)`` (the tensor-parallel local shape under TP)
is cut on dim 0 in ``torch.chunk`` pieces of ``c = ceil(d0 / W)`` rows.

Model states (exact, ``FSDPParam._init_sharded_param`` and ``foreach_reduce``):

* parameters: every rank stores ``c * prod(rest)`` elements, its rows zero-padded
  to ``c`` ("pre-pad the sharded parameter"), in the model's dtype: with
  ``MixedPrecisionPolicy(param_dtype=bf16)`` the shards stay fp32 and are the
  optimizer's parameters, so there is no separate master copy;
* gradients: each group's sharded gradients are views of one reduce-scatter
  output of the group's padded shard size, cast to the parameters' dtype;
* optimizer states: ``torch.full_like`` of the DTensor parameter, i.e. the
  rank's unpadded rows (``min(c, max(0, d0 - r c))``), and a 0-d ``step`` per
  parameter (``RuleOptimizer.init_state``).

Transients, per FSDP group ``g`` (one ``fully_shard`` call; the root holds the
parameters no inner unit holds), with ``S_g`` its padded shard elements,
``U_g = W S_g`` its padded unsharded elements and ``p``/``r`` the compute and
reduce itemsizes; forward runs the root, then the units in order:

* unsharded parameters ``p (U_root + max_g U_g)``: the root is not resharded
  after forward (``FSDPState._lazy_init``), a unit is resharded at its
  ``post_forward`` and ``post_backward``, and a prefetched group is only a flat
  all-gather output until its own ``wait_for_unshard`` copies it out;
* all-gather buffers ``p max(U_a + U_b + S_b [cast])`` over consecutive groups
  ``a, b`` in forward order: ``wait_for_unshard`` defers freeing a forward
  all-gather output until the next group's (``comm_ctx.all_gather_state``), and
  with a param dtype the shard is first copied to it (``S_b``);
* unsharded gradients ``p max(G_root, max_g (G_root_before_g + G_g))``: autograd's
  gradients of a group's unsharded (unpadded) parameters, held until its
  ``post_backward`` copies them into the reduce-scatter input; the root's
  arrive all through backward (the head's first, the embedding's last);
* reduce-scatter buffers ``r max_g (U_g + S_g [cast])``: the input, kept in
  ``reduce_scatter_states`` until the next group's ``post_backward`` (one at
  a time by default), and the reduce-dtype output when it is cast to the
  parameters' dtype.

Each row is its own peak, equal on CPU to the measured one; they do not all
peak at once, so their sum (what the report adds) exceeds the joint peak, by
at most one group's all-gather and reduce-scatter buffers (the stated
tolerance, docs/planner.md). CUDA runs the same allocation order on streams;
its caching allocator's fragmentation is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..rules.base import Granularity, StateShape
from ..zero.policy import DTENSOR_EXCHANGE_BUCKET_NUMEL
from .accounting import Precision, RankBytes, _groups, _meta, itemsize

Named = Sequence[tuple[str, tuple[int, ...], bool]]


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(dim 0, elements per row); a 0-d parameter is one row of one element."""
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


def padded_shard_numel(shape: tuple[int, ...], dp: int) -> int:
    """Elements every rank stores for a parameter: ``ceil(d0 / dp) * prod(rest)``."""
    d0, row = _rows(shape)
    return -(-d0 // dp) * row


def local_numel(shape: tuple[int, ...], dp: int, rank: int) -> int:
    """Elements of rank ``rank``'s unpadded shard (``torch.chunk`` on dim 0)."""
    d0, row = _rows(shape)
    c = -(-d0 // dp)
    return min(c, max(0, d0 - rank * c)) * row


def _per_rank(named: Named, dp: int) -> list[int]:
    """``[sum(local_numel(s, dp, r) for s in shapes) for r in range(dp)]`` in one pass per parameter.

    Ranks below ``d0 // c`` hold ``c`` rows, the next the remainder, the rest
    none: a difference array keeps 70B x 512 ranks well under a second.
    """
    diff = [0] * (dp + 1)
    for _, shape, _ in named:
        d0, row = _rows(shape)
        c = -(-d0 // dp)
        full, rem = d0 // c, d0 % c
        diff[0] += c * row
        diff[full] -= c * row
        if rem:
            diff[full] += rem * row
            diff[full + 1] -= rem * row
    out, running = [], 0
    for r in range(dp):
        running += diff[r]
        out.append(running)
    return out


def unit_of(name: str, units: Sequence[str]) -> int:
    """Index of the FSDP group holding ``name``: the innermost unit prefix, else the root (-1)."""
    best, length = -1, -1
    for i, unit in enumerate(units):
        if (name == unit or name.startswith(unit + ".")) and len(unit) > length:
            best, length = i, len(unit)
    return best


def default_units(names: Sequence[str]) -> list[str]:
    """One ``fully_shard`` per decoder layer (``model.layers.N``, ``transformer.h.N``), as
    torchtitan and the FSDP2 docs wrap transformers; the root holds the rest."""
    out: list[str] = []
    for name in names:
        parts = name.split(".")
        if len(parts) > 3 and parts[1] in ("layers", "h") and parts[2].isdigit():
            unit = ".".join(parts[:3])
            if unit not in out:
                out.append(unit)
    return out


def transients(named: Named, units: Sequence[str], precision: Precision, dp: int,
               arrival: Sequence[str] | None = None) -> dict[str, int]:
    """FSDP2's transient buffer peaks (module docstring), bytes per rank.

    ``arrival``: parameter names in the order their gradients complete (default:
    the reverse of registration).
    """
    wide = precision.wide
    p_item, r_item = itemsize(precision.param), itemsize(precision.reduce)
    cast_in = getattr(torch, precision.param) != wide  # MixedPrecisionPolicy(param_dtype=...)
    cast_out = getattr(torch, precision.reduce) != wide
    count = len(units)
    shard = [0] * (count + 1)  # index -1 (the root) is the last entry
    grads = [0] * (count + 1)
    for name, shape, requires_grad in named:
        g = unit_of(name, units)
        shard[g] += padded_shard_numel(shape, dp)
        grads[g] += math.prod(shape) if requires_grad else 0
    gathered = dp if dp > 1 else 0  # one rank copies its shard without an all-gather
    order = [count] + [g for g in range(count) if shard[g]]  # forward: the root first
    flats = [gathered * shard[g] + (shard[g] if cast_in and gathered else 0) for g in order]
    pairs = [gathered * shard[a] + flats[i + 1] for i, a in enumerate(order[:-1])]
    unsharded = dp * shard[count] + max((dp * shard[g] for g in order[1:]), default=0)
    # Root gradients that completed before each unit's first one stay alive through it.
    seen = 0
    held: dict[int, int] = {}
    shapes = {name: (shape, requires_grad) for name, shape, requires_grad in named}
    for name in arrival if arrival is not None else [n for n, _, _ in named][::-1]:
        shape, requires_grad = shapes[name]
        g = unit_of(name, units)
        if g == -1:
            seen += math.prod(shape) if requires_grad else 0
        else:
            held.setdefault(g, seen)
    grad_peak = max([grads[count]] + [held.get(g, 0) + grads[g] for g in range(count)])
    reduce_peak = max(dp * shard[g] + (shard[g] if cast_out else 0) for g in order)
    out = {
        "fsdp unsharded params": unsharded * p_item,
        "fsdp all-gather": max(pairs + flats) * p_item,
        "fsdp unsharded grads": grad_peak * p_item,
        "fsdp reduce-scatter": reduce_peak * r_item,
    }
    return {k: v for k, v in out.items() if v}


def fsdp_rank_bytes(
    named: Named,
    optimizer: str,
    precision: Precision,
    dp: int,
    units: Sequence[str],
    arrival: Sequence[str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    full: Named | None = None,
) -> list[RankBytes]:
    """Bytes every data-parallel rank holds training ``named`` under FSDP2 (module docstring).

    ``named``: one tensor-parallel rank's ``(name, shape, requires_grad)`` in
    registration order; ``units``: module names given to ``fully_shard`` before
    the root; ``full``: the unsplit model, for the Muon owner's whole matrices
    (default ``named``).
    """
    wide = precision.wide
    w_item = itemsize(wide)
    trainable = [item for item in named if item[2]]
    padded = sum(padded_shard_numel(shape, dp) for _, shape, _ in named)
    padded_grads = sum(padded_shard_numel(shape, dp) for _, shape, _ in trainable)
    buffers = transients(named, units, precision, dp, arrival)
    states: list[dict[str, int]] = [{} for _ in range(dp)]
    metas = _meta(named, wide)
    by_id = {id(p): item for (_, p), item in zip(metas, named)}
    for params, rule, hp in _groups(metas, optimizer, hyperparameters or {}):
        group = [by_id[id(p)] for p in params if p.requires_grad]
        local = _per_rank(group, dp)
        for spec in rule.state_specs(hp):
            for rank in range(dp):
                nbytes = (spec.nbytes(local[rank], wide) if spec.shape is StateShape.PARAM
                          else len(group) * spec.nbytes(1, wide))
                states[rank][spec.name] = states[rank].get(spec.name, 0) + nbytes
        if rule.granularity is Granularity.MATRIX and group:
            # The owner orthogonalizes whole matrices one batch at a time; the largest bounds it.
            names = {name for name, _, _ in group}
            whole = [shape for name, shape, _ in (full or named) if name in names] or [s for _, s, _ in group]
            largest = max(whole, key=math.prod)
            buffers[f"{rule.name} workspace"] = rule.workspace_bytes([largest], hp, wide)
            wire = itemsize(rule.exchange_dtype(hp, wide))
            # Both all-to-alls' send and receive buffers of one exchange round (at most the
            # round size per rank, balanced owners), and the matrix assembled.
            buffers[f"{rule.name} exchange"] = (2 * min(max(local), DTENSOR_EXCHANGE_BUCKET_NUMEL)
                                                + math.prod(largest)) * wire
    return [RankBytes(rank=rank, params=padded * w_item, grads=padded_grads * w_item, master_params=0,
                      optimizer_states=states[rank], buffers=dict(buffers)) for rank in range(dp)]
