"""The tensors one rank holds for a :class:`~shardopt.plan.ShardPlan`.

Per storage (:class:`StorageBuffers`):

* ``param_flat``: the whole storage in the model's dtype. Model parameters are
  views of it, so the all-gather after the step writes them with no copy-out.
* ``master``: this rank's area in fp32. For fp32 models it *is* the area of
  ``param_flat`` (no second copy); for bf16/fp16 models a separate fp32 tensor.
* ``grad_area``: this rank's averaged gradient area (stage 2); at stage 1 (and
  on one rank) a view of ``grad_flat``, the full averaged gradient, which
  ``p.grad`` views.
* ``states``: the rule's declared state for the area, allocated on the first
  step (lazily, like torch.optim), over the area's used elements only.

Per bucket (:class:`BucketBuffers`): ``grad_flat``, the bucket's local
gradients, the reduce-scatter's (or all-reduce's) input. At stage 2 it lives
from the bucket's first gradient until its reduce-scatter is done. (Matrix
storages at stage 2 reduce per matrix instead: :mod:`shardopt.hooks`.)

Ownership invariant: every buffer here that an asynchronous collective reads
or writes (``grad_flat``, the regions of ``grad_area`` a reduction fills, a
matrix's gradient, the ``param_flat`` chunks an all-gather fills) belongs to
exactly one in-flight operation from its launch until its ``wait()``; nothing
else reads or writes it meanwhile, and it is dropped (or reused) only after
the wait. :class:`~shardopt.comm.Communicator` enforces this: a collective
touching bytes that an in-flight one owns raises ``BufferOwnershipError``.
With ``SHARDOPT_POISON_BUFFERS=1`` (on in the tests) fresh buffers start as
NaN and released ones are overwritten with NaN, so an element that no
collective wrote, or a stale view read after release, shows up as NaN on every
run instead of as whatever the allocator left there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..rules.base import StateSpec, allocate_state
from .comm import new_buffer
from .plan import Bucket, Storage


@dataclass
class StorageBuffers:
    storage: Storage
    rank: int
    param_flat: Tensor
    master: Tensor
    reduce_dtype: torch.dtype
    keep_grad_flat: bool
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
        """The storage-sized gradient buffer kept at stage 1 (one bucket per storage)."""
        if self.grad_flat is None:
            # Uninitialised: every slot is written by a gradient (or zeros when it
            # has none), and the reducer zeroes the padding before the collective.
            self.grad_flat = new_buffer(self.storage.flat_numel, self.reduce_dtype, self.param_flat.device,
                                        poison=self.poison)
        return self.grad_flat

    def ensure_grad_area(self) -> Tensor:
        if self.keep_grad_flat:
            start, end = self.area
            self.grad_area = self.ensure_grad_flat()[start:end]
        elif self.grad_area is None:
            self.grad_area = new_buffer(self.storage.area_numel, self.reduce_dtype, self.param_flat.device,
                                        poison=self.poison)
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
        if self.owner.keep_grad_flat:
            # Kept gradients need p.grad views: such storages are one bucket.
            return self.owner.ensure_grad_flat()
        if self.grad_flat is None:
            self.grad_flat = new_buffer(self.bucket.flat_numel, self.owner.reduce_dtype,
                                        self.owner.param_flat.device, poison=self.owner.poison)
        return self.grad_flat

    def grad_region(self) -> Tensor:
        """This rank's averaged gradient for the bucket: its chunk of the gradient area."""
        start = self.bucket.area_offset
        return self.owner.ensure_grad_area()[start : start + self.bucket.region_numel]

    def release_grad_flat(self) -> None:
        """Drop the bucket's gradient buffer (its reduction has been waited for)."""
        if self.owner.poison and self.grad_flat is not None:
            self.grad_flat.fill_(float("nan"))
        self.grad_flat = None

    @functools.cached_property
    def param_chunks(self) -> list[Tensor]:
        """Each rank's chunk of the parameters, as views of the storage (all-gather output)."""
        size, area, offset = self.bucket.region_numel, self.owner.storage.area_numel, self.bucket.area_offset
        return [
            self.owner.param_flat[rank * area + offset : rank * area + offset + size]
            for rank in range(self.bucket.world_size)
        ]


def storage_bytes(tensors: list[Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
