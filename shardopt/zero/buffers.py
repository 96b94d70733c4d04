"""The tensors one rank holds for a :class:`~shardopt.zero.plan.ShardPlan`.

Per storage (:class:`StorageBuffers`):

* ``param_flat``: the whole storage in the model's dtype. Model parameters are
  views of it, so the all-gather after the step writes them with no copy-out.
* ``master``: this rank's area in fp32. For fp32 models it *is* the area of
  ``param_flat`` (no second copy); for bf16 models a separate fp32 tensor.
* ``grad_area``: this rank's averaged gradient area (stage 2); at stage 1 (and
  on one rank) a view of ``grad_flat``, the full averaged gradient, which
  ``p.grad`` views. Which of the two is the gradient-sharding strategy
  (:class:`KeptGradients` or :class:`ShardedGradients`), chosen once per
  optimizer by :func:`gradient_sharding`.
* ``states``: the rule's declared state for the area, allocated on the first
  step (lazily, like torch.optim), over the area's used elements only.

Per bucket (:class:`BucketBuffers`): ``grad_flat``, the bucket's local
gradients, the reduce-scatter's (or all-reduce's) input. At stage 2 it is lent
by the communicator's :class:`~shardopt.zero.pool.BufferPool` from the bucket's
first gradient until its reduce-scatter is done, and reused by the next step.
(Matrix storages at stage 2 reduce per matrix instead: :mod:`shardopt.zero.schedule`.)

Ownership invariant: every buffer here that an asynchronous collective reads
or writes (``grad_flat``, the regions of ``grad_area`` a reduction fills, a
matrix's gradient, the ``param_flat`` chunks an all-gather fills) belongs to
exactly one in-flight operation from its launch until its ``wait()``; nothing
else reads or writes it meanwhile, and it is dropped (or reused) only after
the wait. :class:`~shardopt.zero.comm.Communicator` enforces this: a collective
touching bytes that an in-flight one owns raises ``BufferOwnershipError``.
With ``SHARDOPT_POISON_BUFFERS=1`` (on in the tests) fresh buffers start as
NaN and released ones are overwritten with NaN, so an element that no
collective wrote, or a stale view read after release, shows up as NaN on every
run instead of as whatever the allocator left there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..rules.base import StateSpec, allocate_state
from .comm import Communicator
from .plan import Bucket, Storage
from .policy import MAX_IN_FLIGHT, shards_gradients
from .pool import BufferPool, new_buffer


@dataclass
class StorageBuffers:
    storage: Storage
    rank: int
    param_flat: Tensor
    master: Tensor
    reduce_dtype: torch.dtype
    sharding: KeptGradients | ShardedGradients
    pool: BufferPool
    poison: bool = False
    grad_flat: Tensor | None = None
    grad_area: Tensor | None = None
    states: dict[str, Tensor] = field(default_factory=dict)

    @property
    def used_numel(self) -> int:
        return self.storage.used_area_numel(self.rank)

    @property
    def area(self) -> tuple[int, int]:
        return self.storage.area_bounds(self.rank)

    def param_area(self) -> Tensor:
        start, end = self.area
        return self.param_flat[start:end]

    def master_separate(self) -> bool:
        return self.master.data_ptr() != self.param_area().data_ptr() or (
            self.master.dtype != self.param_flat.dtype
        )

    def ensure_grad_flat(self) -> Tensor:
        """The storage-sized gradient buffer of kept gradients (one bucket per storage)."""
        if self.grad_flat is None:
            # Uninitialised: every slot is written by a gradient (or zeros when it
            # has none), and the reducer zeroes the padding before the collective.
            self.grad_flat = new_buffer(self.storage.flat_numel, self.reduce_dtype, self.param_flat.device,
                                        poison=self.poison)
        return self.grad_flat

    def ensure_grad_area(self) -> Tensor:
        """This rank's averaged gradient area."""
        if self.grad_area is None:
            self.grad_area = self.sharding.grad_area(self)
        return self.grad_area

    def allocate_states(self, specs: tuple[StateSpec, ...]) -> None:
        """Allocate ``specs`` for the used part of the area."""
        if not self.states:
            self.states = allocate_state(specs, self.master[: self.used_numel])


@dataclass
class BucketBuffers:
    bucket: Bucket
    owner: StorageBuffers
    grad_flat: Tensor | None = None

    def ensure_grad_flat(self) -> Tensor:
        """The bucket's local gradients, the input of its reduction."""
        return self.owner.sharding.bucket_grads(self)

    def grad_region(self) -> Tensor:
        """This rank's averaged gradient for the bucket: its chunk of the gradient area."""
        start = self.bucket.area_offset
        return self.owner.ensure_grad_area()[start : start + self.bucket.region_numel]

    def release_grad_flat(self) -> None:
        """Hand the bucket's gradient buffer back to the pool (its reduction has been waited for)."""
        if self.grad_flat is not None:
            self.owner.pool.give(self.grad_flat)
        self.grad_flat = None

    @functools.cached_property
    def param_chunks(self) -> list[Tensor]:
        """Each rank's chunk of the parameters, as views of the storage (all-gather output)."""
        size, area, offset = self.bucket.region_numel, self.owner.storage.area_numel, self.bucket.area_offset
        return [
            self.owner.param_flat[rank * area + offset : rank * area + offset + size]
            for rank in range(self.bucket.world_size)
        ]


class KeptGradients:
    """Stage 1 and one rank: every storage keeps its full averaged gradient.

    The storage's flat gradient buffer is all-reduced in place (matrix storages
    are then one bucket) and ``p.grad`` views it; this rank's gradient area is a
    view of it. Buffers live on, so no window bounds the reductions in flight.
    """

    shards = False
    window: int | None = None

    def bucket_grads(self, bucket: BucketBuffers) -> Tensor:
        return bucket.owner.ensure_grad_flat()

    def grad_area(self, storage: StorageBuffers) -> Tensor:
        start, end = storage.area
        return storage.ensure_grad_flat()[start:end]

    def reduce(self, comm: Communicator, bucket: BucketBuffers, flat: Tensor) -> Any:
        return comm.all_reduce_avg(flat, async_op=True)

    def reduced(self, bucket: BucketBuffers) -> None:
        """The bucket's reduction was waited for: its buffer is the kept gradient."""

    def matrix_grad(self, storage: StorageBuffers, param: int, grad: Tensor | None, numel: int,
                    device: torch.device) -> Tensor:
        """A matrix's gradient in its slot of the storage's kept gradient (``p.grad`` will view it)."""
        offset = storage.storage.slot_offset(param)
        buffer = storage.ensure_grad_flat()[offset : offset + numel]
        return buffer.zero_() if grad is None else buffer.copy_(grad)

    def reduce_matrix(self, comm: Communicator, grad: Tensor, parts: list[tuple[int, int, int]]) -> list[Any]:
        """All-reduce the matrix's gradient in place, as soon as it arrived."""
        return [comm.all_reduce_avg(grad, async_op=True)]

    def matrix_reduced(self, comm: Communicator, storage: StorageBuffers, grad: Tensor,
                       own_part: tuple[int, int, int] | None) -> None:
        """Reduced in place: the kept gradient."""

    def expose(self, storage: StorageBuffers, params: dict[int, Tensor]) -> None:
        """``p.grad`` <- a view of the averaged gradient (a copy where the dtypes differ)."""
        flat = storage.ensure_grad_flat()
        for slot in storage.storage.slots:
            param = params[slot.param]
            grad = flat[slot.offset : slot.offset + slot.numel].view(param.shape)
            param.grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)


class ShardedGradients:
    """Stage 2 on several ranks: each rank keeps its area of the averaged gradient only.

    A bucket's local gradients live in a buffer of their own from the bucket's
    first gradient until its reduce-scatter is waited for; at most
    ``MAX_IN_FLIGHT`` reductions are in flight (:mod:`shardopt.zero.schedule`).
    ``p.grad`` stays ``None``.
    """

    shards = True
    window: int | None = MAX_IN_FLIGHT

    def bucket_grads(self, bucket: BucketBuffers) -> Tensor:
        if bucket.grad_flat is None:
            owner = bucket.owner
            bucket.grad_flat = owner.pool.take(bucket.bucket.flat_numel, owner.reduce_dtype, owner.param_flat.device,
                                               kind="reduce")
        return bucket.grad_flat

    def grad_area(self, storage: StorageBuffers) -> Tensor:
        return new_buffer(storage.storage.area_numel, storage.reduce_dtype, storage.param_flat.device,
                          poison=storage.poison)

    def reduce(self, comm: Communicator, bucket: BucketBuffers, flat: Tensor) -> Any:
        return comm.reduce_scatter_avg(bucket.grad_region(), flat, async_op=True)

    def reduced(self, bucket: BucketBuffers) -> None:
        bucket.release_grad_flat()

    def matrix_grad(self, storage: StorageBuffers, param: int, grad: Tensor | None, numel: int,
                    device: torch.device) -> Tensor:
        """The matrix's local gradient in the reduce dtype: autograd's own buffer where it already
        is (``p.grad`` is dropped, so nothing else writes it), else a pooled copy."""
        dtype = storage.reduce_dtype
        if grad is not None and grad.dtype == dtype and grad.is_contiguous():
            return grad
        target = storage.pool.take(numel, dtype, device, kind="reduce")
        return target.zero_() if grad is None else target.copy_(grad)

    def reduce_matrix(self, comm: Communicator, grad: Tensor, parts: list[tuple[int, int, int]]) -> list[Any]:
        """Each ``(rank, start, end)`` part of the matrix to the rank whose area holds it."""
        return [comm.reduce_avg(grad[low:high], member, async_op=True) for member, low, high in parts]

    def matrix_reduced(self, comm: Communicator, storage: StorageBuffers, grad: Tensor,
                       own_part: tuple[int, int, int] | None) -> None:
        """Copy this rank's part (``(area offset, start, end)``, if any) into its gradient area
        and hand the buffer back (to the pool, or poisoned where it was autograd's)."""
        if own_part is not None:
            at, low, high = own_part
            storage.ensure_grad_area()[at : at + high - low].copy_(grad[low:high])
        if storage.pool.lends(grad):
            storage.pool.give(grad)
        else:
            comm.retire(grad)

    def expose(self, storage: StorageBuffers, params: dict[int, Tensor]) -> None:
        """Sharded gradients have no full ``p.grad`` to show."""


def gradient_sharding(stage: int, world_size: int) -> KeptGradients | ShardedGradients:
    """The strategy for ``stage`` on ``world_size`` ranks (:func:`~shardopt.zero.policy.shards_gradients`)."""
    return ShardedGradients() if shards_gradients(stage, world_size) else KeptGradients()


def storage_bytes(tensors: list[Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
