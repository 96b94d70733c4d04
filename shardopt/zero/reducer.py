"""Backward hooks: copy gradients into buckets and reduce each bucket as it completes.

A post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``,
the mechanism torch documents for optimizer-in-backward) copies each
parameter's gradient into its reduction buffer and frees ``p.grad``. When
every parameter of a reduction unit has arrived, an asynchronous
reduce-scatter (stage 2) or all-reduce (stage 1) of the bucket starts,
overlapping the rest of backward, as DDP's reducer does (Li et al. 2020,
"PyTorch Distributed", section 3.2.3). A matrix of a Muon storage at stage 2
is its own unit: each of its parts is reduced to the rank whose area holds it
(:attr:`ShardPlan.reduce_units` says why).

Units are launched strictly in one order, the same on every rank: a unit
that is complete waits for the ones before it. The first step uses the plan's
guess (:attr:`ShardPlan.reduce_units`: each parameter's place inside its param
group, since indices run group by group). At the end of the first
synchronised backward, every rank adopts the order in which rank 0's units
completed (one broadcast, once), as DDP rebuilds its buckets after its first
iteration (Li et al. 2020, section 3.2.3). Ranks then issue the same collectives in the same
order even when one of them got no gradient for some parameter (an unused
branch on that rank only); those buckets launch at ``step()`` with zeros in
place of the missing gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from .buffers import BucketBuffers, StorageBuffers
from .comm import Communicator
from .plan import ShardPlan, Slot
from .policy import MAX_IN_FLIGHT


class GradientReducer:
    def __init__(
        self,
        plan: ShardPlan,
        buffers: list[BucketBuffers],
        storages: list[StorageBuffers],
        params: dict[int, Tensor],
        comm: Communicator,
        *,
        overlap: bool,
        label: Callable[[Tensor], str],
        on_reduced: Callable[[], None],
    ) -> None:
        self.plan = plan
        self.buffers = buffers
        self.params = params
        self.comm = comm
        self.overlap = overlap
        self.label = label
        self.sync_enabled = True
        self.on_reduced = on_reduced
        self.finished = False
        self._callback_queued = False
        self.units = plan.reduce_units
        # Each parameter's unit (position in launch order), and for bucket units its slots.
        self.unit_of: dict[int, int] = {}
        self.slots: dict[int, list[Slot]] = {}
        for position, unit in enumerate(self.units):
            for param in plan.unit_params(unit):
                self.unit_of[param] = position
            if unit.bucket is not None:
                for slot in plan.buckets[unit.bucket].slots:
                    self.slots.setdefault(slot.param, []).append(slot)
        self.storage_of = {
            slot.param: storage for storage in storages for slot in storage.storage.slots
        }
        # Matrix units: (rank, start, end) of each part, and where this rank's part
        # (if any) goes in its gradient area; fixed by the plan, so computed once.
        self.parts: dict[int, list[tuple[int, int, int]]] = {}
        self.own_part: dict[int, tuple[int, int, int]] = {}
        for unit in self.units:
            if unit.param is None:
                continue
            storage = self.storage_of[unit.param].storage
            self.parts[unit.param] = storage.parts(unit.param)
            for member, low, high in self.parts[unit.param]:
                if member == comm.rank:
                    area_offset = storage.slot_offset(unit.param) + low - member * storage.area_numel
                    self.own_part[unit.param] = (area_offset, low, high)
        self.num_pending = [len(plan.unit_params(unit)) for unit in self.units]
        self.arrived: set[int] = set()
        self.next_launch = 0
        # Launch order (unit positions); ``completion`` records the first step's.
        self.order = list(range(len(self.units)))
        self.completion: list[int] | None = []
        # Matrix units: each matrix's local gradient (reduce dtype) until it is reduced.
        self.matrix_grads: dict[int, Tensor] = {}
        # (unit position, work) of launched reductions not yet waited for.
        self.in_flight: list[tuple[int, Any]] = []
        self.handles = [
            param.register_post_accumulate_grad_hook(self._make_hook(index))
            for index, param in params.items()
        ]

    def _make_hook(self, index: int) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if self.sync_enabled:
                if not self._callback_queued:
                    # Like DDP, finish the reduction when this backward pass ends,
                    # so gradients are final as soon as backward() returns.
                    torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                    self._callback_queued = True
                with record_function("shardopt.grad_copy"):
                    self.take_grad(index, param)
                if self.overlap:
                    self.launch_ready()

        return hook

    def take_grad(self, index: int, param: Tensor) -> None:
        """Move ``param.grad`` into its reduction buffer; ``None`` means a zero gradient."""
        if index in self.arrived or self.finished:
            raise RuntimeError(
                f"{self.label(param)} received a second gradient before step(): "
                "accumulate micro-batches inside ZeroOptimizer.no_sync() and run the last "
                "backward outside it"
            )
        grad = param.grad
        if grad is not None:
            if grad.is_sparse:
                raise TypeError(f"{self.label(param)}: sparse gradients are not supported")
            grad = grad.reshape(-1)
        position = self.unit_of[index]
        unit = self.units[position]
        if unit.bucket is None:
            dtype = self.storage_of[index].reduce_dtype
            if grad is not None and grad.dtype == dtype and grad.is_contiguous():
                # Reduced from autograd's own buffer: p.grad is dropped below, so
                # nothing else writes it, and a copy would only cost time.
                self.matrix_grads[index] = grad
            else:
                target = self.comm.empty(param.numel(), dtype, param.device)
                self.matrix_grads[index] = target.zero_() if grad is None else target.copy_(grad)
        else:
            flat = self.buffers[unit.bucket].ensure_grad_flat()
            for slot in self.slots[index]:
                target = flat[slot.offset : slot.offset + slot.numel]
                if grad is None:
                    target.zero_()
                else:
                    target.copy_(grad[slot.param_offset : slot.param_offset + slot.numel])
        param.grad = None
        self.arrived.add(index)
        self.num_pending[position] -= 1
        if self.num_pending[position] == 0 and self.completion is not None:
            self.completion.append(position)

    def launch_ready(self) -> None:
        while self.next_launch < len(self.order) and self.num_pending[self.order[self.next_launch]] == 0:
            self._launch(self.order[self.next_launch])
            self.next_launch += 1

    def _launch(self, position: int) -> None:
        with record_function("shardopt.reduce_launch"):
            self._launch_unit(position)
        # Stage 2 keeps at most MAX_IN_FLIGHT gradient buffers in flight: waiting for
        # the oldest frees it, so peak gradient memory is this rank's areas plus a
        # bounded window, not the whole model's gradients.
        while len(self.in_flight) > MAX_IN_FLIGHT and not self._keeps_flat(position):
            self._complete(*self.in_flight.pop(0))

    def _launch_unit(self, position: int) -> None:
        unit = self.units[position]
        if unit.bucket is None:
            # Each part of the matrix goes to the rank whose area holds it.
            grad = self.matrix_grads[unit.param]
            works = [
                self.comm.reduce_avg(grad[low:high], member, async_op=True)
                for member, low, high in self.parts[unit.param]
            ]
            self.in_flight.append((position, works))
        else:
            buffers = self.buffers[unit.bucket]
            flat = buffers.ensure_grad_flat()
            bucket = buffers.bucket
            # Padding must be zero in the reduction's input: clear the gaps between slots.
            cursor = 0
            for slot in sorted(bucket.slots, key=lambda s: s.offset):
                if slot.offset > cursor:
                    flat[cursor : slot.offset].zero_()
                cursor = slot.offset + slot.numel
            flat[cursor:].zero_()
            if buffers.owner.keep_grad_flat:
                self.in_flight.append((position, [self.comm.all_reduce_avg(flat, async_op=True)]))
            else:
                work = self.comm.reduce_scatter_avg(buffers.grad_region(), flat, async_op=True)
                self.in_flight.append((position, [work]))

    def _keeps_flat(self, position: int) -> bool:
        unit = self.units[position]
        return unit.bucket is not None and self.buffers[unit.bucket].owner.keep_grad_flat

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self.finish()

    def finish(self) -> None:
        """Launch what backward left (missing gradients as zeros) and wait for all."""
        if self.finished:
            return
        for index, param in self.params.items():
            if index not in self.arrived:
                self.take_grad(index, param)
        self.launch_ready()
        while self.in_flight:
            self._complete(*self.in_flight.pop(0))
        if self.completion is not None:
            self._adopt_order(self.completion)
        self.finished = True
        self.on_reduced()

    def _adopt_order(self, completion: list[int]) -> None:
        """Launch from now on in the order rank 0's units completed (same on all ranks)."""
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        order = torch.tensor(completion, dtype=torch.int64, device=device)
        self.comm.broadcast(order, src=0)
        self.order = order.tolist()
        self.completion = None

    def _complete(self, position: int, works: list[Any]) -> None:
        with record_function("shardopt.reduce_complete"):
            self._complete_unit(position, works)

    def _complete_unit(self, position: int, works: list[Any]) -> None:
        for work in works:
            work.wait()
        unit = self.units[position]
        if unit.bucket is None:
            grad = self.matrix_grads.pop(unit.param)
            if unit.param in self.own_part:
                at, low, high = self.own_part[unit.param]
                self.storage_of[unit.param].ensure_grad_area()[at : at + high - low].copy_(grad[low:high])
            self.comm.retire(grad)
        elif not self.buffers[unit.bucket].owner.keep_grad_flat:
            self.buffers[unit.bucket].release_grad_flat()

    def close(self) -> None:
        """Wait for reductions in flight and remove the backward hooks."""
        while self.in_flight:
            self._complete(*self.in_flight.pop(0))
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.sync_enabled = False

    def buffer_bytes(self) -> int:
        """Bytes of gradient buffers alive for reductions not yet completed (stage 2)."""
        flats = sum(b.grad_flat.untyped_storage().nbytes() for b in self.buffers if b.grad_flat is not None)
        return flats + sum(g.untyped_storage().nbytes() for g in self.matrix_grads.values())

    def reset(self) -> None:
        self.finished = False
        self.arrived.clear()
        self.num_pending = [len(self.plan.unit_params(unit)) for unit in self.units]
        self.next_launch = 0
