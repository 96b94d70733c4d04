"""Gradient clipping by the global norm of DTensor gradients, one all-reduce per mesh.

``torch.nn.utils.clip_grad_norm_`` handles DTensor gradients when they all live on
one mesh (FSDP2 alone: one all-reduce, hidden in DTensor's ``_NormPartial``). With
FSDP2 x tensor parallelism, parameters left out of TP (norms, embeddings kept
whole) are DTensors on the data-parallel sub-mesh while TP's are on the 2-D mesh,
and torch's ``torch.stack`` of per-tensor norms fails ("All operands in
aten.stack.default must have the same mesh"). torchtitan's ``clip_grad_norm_``
(``torchtitan/distributed/utils.py``) reaches the same stack.

Here each rank adds ``|x|^p`` over its local shards, divided by the number of
ranks that hold the same shard (the sizes of the mesh dimensions where the
gradient is ``Replicate``), so that a sum over every rank of a mesh counts each
element once; one all-reduce per mesh (``MAX`` for the infinity norm) then gives
every rank the same global norm. The clip itself scales the local shards in
place: no communication. As in torch (``torch/nn/utils/clip_grad.py``), the
coefficient is ``max_norm / (norm + 1e-6)`` clamped to 1 and applied even when
it is 1.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _mesh_group(mesh) -> dist.ProcessGroup | None:
    """A process group of every rank of ``mesh`` (``None``: the default group)."""
    if mesh.size() == dist.get_world_size():
        return None
    if mesh.ndim == 1:
        return mesh.get_group()
    # A flattened view of an N-D sub-mesh: one group over all its ranks, so one collective.
    return mesh._flatten().get_group()


def _sum_or_max(locals_: list[Tensor], weights: list[float], norm_type: float) -> Tensor:
    """``sum(w * |x|^p)`` over ``locals_`` (``max |x|`` for the infinity norm), in fp32 or wider."""
    dtype, device = torch.float32, locals_[0].device
    for tensor in locals_:
        dtype = torch.promote_types(dtype, tensor.dtype)
    # Empty shards (uneven FSDP2 shards at many ranks) add nothing; the infinity norm of
    # an empty tensor is an error in torch, so they are left out.
    kept = [(t, w) for t, w in zip(locals_, weights) if t.numel()]
    if not kept:
        return torch.zeros((), dtype=dtype, device=device)
    locals_, weights = [t for t, _ in kept], [w for _, w in kept]
    if any(t.dtype != locals_[0].dtype or t.device != locals_[0].device for t in locals_):
        norms = [torch.linalg.vector_norm(t, norm_type, dtype=dtype) for t in locals_]
    else:
        # One kernel per list where torch has one (torch.nn.utils.clip_grad_norm_ uses it too).
        norms = list(torch._foreach_norm(locals_, norm_type, dtype=dtype))
    stacked = torch.stack(norms)
    if math.isinf(norm_type):
        return stacked.amax()
    if all(w == 1.0 for w in weights):
        return (stacked**norm_type).sum()
    return (stacked**norm_type * torch.tensor(weights, dtype=dtype, device=stacked.device)).sum()


@torch.no_grad()
def grad_norm(grads: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of all of ``grads`` together, as if every DTensor were whole.

    ``grads`` may mix DTensors on any meshes (``Shard``, ``_StridedShard`` and
    ``Replicate`` placements) and plain tensors (taken as identical on every rank).
    Every rank must pass the same tensors in the same order: the all-reduces run
    per mesh in order of first appearance. Returns a plain 0-d tensor, the same
    value on every rank, in fp32 (fp64 for fp64 gradients).
    """
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be positive (a p-norm or inf), got {norm_type}")
    infinite = math.isinf(norm_type)
    grads = list(grads)
    if not grads:
        return torch.tensor(0.0)
    dtensor = _dtensor_type()
    # mesh -> (local shards, weights); dicts keep insertion order, the same on every rank.
    per_mesh: dict[object, tuple[list[Tensor], list[float]]] = {}
    plain: tuple[list[Tensor], list[float]] = ([], [])
    for grad in grads:
        if dtensor is None or not isinstance(grad, dtensor):
            plain[0].append(grad)
            plain[1].append(1.0)
            continue
        if any(p.is_partial() for p in grad.placements):
            raise ValueError(
                f"a gradient of shape {tuple(grad.shape)} has placements {grad.placements}: a Partial "
                "gradient is a sum not yet taken, and its norm is not the sum of its parts' norms; "
                "redistribute it (or let FSDP2/TP reduce it) before clipping")
        # Ranks along Replicate dimensions hold the same shard: each counts 1/replicas of it.
        replicas = math.prod(grad.device_mesh.size(dim) for dim, p in enumerate(grad.placements)
                             if p.is_replicate())
        locals_, weights = per_mesh.setdefault(grad.device_mesh, ([], []))
        locals_.append(grad.to_local())
        weights.append(1.0 / replicas)
    totals = []
    for mesh, (locals_, weights) in per_mesh.items():
        total = _sum_or_max(locals_, weights, norm_type)
        dist.all_reduce(total, op=dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM, group=_mesh_group(mesh))
        totals.append(total)
    if plain[0]:
        totals.append(_sum_or_max(*plain, norm_type))
    device = totals[0].device
    combined = torch.stack([t.to(device) for t in totals])
    return combined.amax() if infinite else combined.sum() ** (1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Scale the gradients of ``parameters`` in place so that their global norm is at
    most ``max_norm``; return the norm before clipping (:func:`grad_norm`).

    ``torch.nn.utils.clip_grad_norm_``'s arguments and arithmetic, for DTensor
    gradients on any number of meshes (FSDP2, TP, both): one all-reduce per mesh,
    the scaling local. Every rank must pass the same parameters in the same order.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    total = grad_norm(grads, norm_type)
    if not grads:
        return total
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the non-finite "
            "norm anyway, set `error_if_nonfinite=False`")
    coefficient = torch.clamp(max_norm / (total + EPS), max=1.0)
    dtensor = _dtensor_type()
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for grad in grads:
        local = grad.to_local() if dtensor is not None and isinstance(grad, dtensor) else grad
        by_kind.setdefault((local.device, local.dtype), []).append(local)
    for (device, _), locals_ in by_kind.items():
        torch._foreach_mul_(locals_, coefficient.to(device))
    return total
