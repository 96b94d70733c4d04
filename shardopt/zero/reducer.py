"""Backward hooks: copy gradients into reduction buffers and reduce each unit as it completes.

A post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``,
the mechanism torch documents for optimizer-in-backward) copies each
parameter's gradient into its reduction buffer and frees ``p.grad``. When
every parameter of a reduction unit has arrived, an asynchronous
reduce-scatter (sharded gradients) or all-reduce (kept) of the bucket starts,
overlapping the rest of backward, as DDP's reducer does (Li et al. 2020,
"PyTorch Distributed", section 3.2.3); a Muon matrix is reduced as soon as it
arrives, part by part to the ranks holding it (stage 2) or all-reduced in
place (stage 1).

When to launch and when to wait is :class:`~shardopt.zero.schedule.ReductionSchedule`'s
decision (launch order, first-step order adoption, the in-flight window),
shared with the memory planner; this module executes it. Ranks issue the same
collectives in the same order even when one of them got no gradient for some
parameter (an unused branch on that rank only): those units launch at
``step()`` with zeros in place of the missing gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from .buffers import BucketBuffers, KeptGradients, ShardedGradients, StorageBuffers
from .comm import Communicator
from .plan import ShardPlan, Span
from .schedule import BucketReduction, MatrixReduction, ReductionSchedule


def _inside_backward_node() -> bool:
    """Whether this thread is running an autograd node's backward (so a backward that ends now was nested)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current is not None and current() is not None


class GradientReducer:
    def __init__(
        self,
        plan: ShardPlan,
        buffers: list[BucketBuffers],
        storages: list[StorageBuffers],
        params: dict[int, Tensor],
        comm: Communicator,
        sharding: KeptGradients | ShardedGradients,
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
        self.sharding = sharding
        self.schedule = ReductionSchedule(plan, sharding.window)
        self.units = self.schedule.units
        # Bucket units: each parameter's slots in its bucket.
        self.slots: dict[int, list[Span]] = {}
        for unit in self.units:
            if isinstance(unit, BucketReduction):
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
            if not isinstance(unit, MatrixReduction):
                continue
            storage = self.storage_of[unit.param].storage
            self.parts[unit.param] = storage.parts(unit.param)
            for member, low, high in self.parts[unit.param]:
                if member == comm.rank:
                    area_offset = storage.slot_offset(unit.param) + low - member * storage.area_numel
                    self.own_part[unit.param] = (area_offset, low, high)
        self.arrived: set[int] = set()
        # Matrix units: each matrix's local gradient (reduce dtype) until it is reduced.
        self.matrix_grads: dict[int, Tensor] = {}
        # Launched reductions not yet waited for: unit position -> its works.
        self.works: dict[int, list[Any]] = {}
        # Gradient buffers of units not yet reduced: unit position -> bytes; and the
        # peak of their sum this step (what the planner's window predicts).
        self.unit_bytes: dict[int, int] = {}
        self.peak_buffer_bytes = 0
        # Why this step's gradients are unusable (a hook raised), until discard().
        self.failed: str | None = None
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
            # Autograd has already added this gradient to p.grad, which at stage 1 is a
            # view of the reduced gradient: the step's gradients are no longer what any
            # backward computed. step() refuses them until zero_grad() discards them.
            self.failed = (
                f"{self.label(param)} received a second gradient before step(): "
                "accumulate micro-batches inside ZeroOptimizer.no_sync() and run the last "
                "backward outside it"
            )
            raise RuntimeError(f"{self.failed}; this step's gradients are now incomplete: call zero_grad() "
                               "and run backward again")
        grad = param.grad
        if grad is not None:
            if grad.is_sparse:
                raise TypeError(f"{self.label(param)}: sparse gradients are not supported")
            grad = grad.reshape(-1)
        position = self.schedule.unit_of[index]
        unit = self.units[position]
        if isinstance(unit, MatrixReduction):
            buffer = self.sharding.matrix_grad(self.storage_of[index], index, grad, param.numel(), param.device)
            self.matrix_grads[index] = buffer
        else:
            buffer = self.buffers[unit.bucket].ensure_grad_flat()
            for slot in self.slots[index]:
                target = buffer[slot.offset : slot.offset + slot.numel]
                if grad is None:
                    target.zero_()
                else:
                    target.copy_(grad[slot.param_offset : slot.param_offset + slot.numel])
        if not self.arrived:
            self.peak_buffer_bytes = 0  # a new backward
        if self.sharding.shards and position not in self.unit_bytes:
            # Sharded gradients' buffers are transient: counted from the unit's first
            # gradient until its reduction is waited for (kept ones are the gradients).
            self.unit_bytes[position] = buffer.numel() * buffer.element_size()
            self.peak_buffer_bytes = max(self.peak_buffer_bytes, sum(self.unit_bytes.values()))
        param.grad = None
        self.arrived.add(index)
        self.schedule.arrive(index)

    def launch_ready(self) -> None:
        """Launch the units the schedule allows now, waiting where its window says."""
        for position, waits in self.schedule.launches():
            with record_function("shardopt.reduce_launch"):
                self.works[position] = self._launch(self.units[position])
            for waited in waits:
                self._complete(waited)

    def _launch(self, unit: BucketReduction | MatrixReduction) -> list[Any]:
        if isinstance(unit, MatrixReduction):
            return self.sharding.reduce_matrix(self.comm, self.matrix_grads[unit.param], self.parts[unit.param])
        buffers = self.buffers[unit.bucket]
        flat = buffers.ensure_grad_flat()
        # Padding must be zero in the reduction's input: clear the gaps between slots.
        cursor = 0
        for slot in sorted(buffers.bucket.slots, key=lambda s: s.offset):
            if slot.offset > cursor:
                flat[cursor : slot.offset].zero_()
            cursor = slot.offset + slot.numel
        flat[cursor:].zero_()
        return [self.sharding.reduce(self.comm, buffers, flat)]

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        if _inside_backward_node():
            # The end of a nested backward (a reentrant activation checkpoint runs one
            # inside its node's backward): the step's backward goes on, and its next
            # hook queues the callback again on it. If none comes, step() finishes.
            return
        self.finish()

    def finish(self) -> None:
        """Launch what backward left (missing gradients as zeros) and wait for all."""
        if self.finished:
            return
        for index, param in self.params.items():
            if index not in self.arrived:
                self.take_grad(index, param)
        self.launch_ready()
        for position in self.schedule.drain():
            self._complete(position)
        if self.schedule.completion is not None:
            self._adopt_order(self.schedule.completion)
        self.finished = True
        self.on_reduced()

    def _adopt_order(self, completion: list[int]) -> None:
        """Launch from now on in the order rank 0's units completed (same on all ranks)."""
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        order = torch.tensor(completion, dtype=torch.int64, device=device)
        self.comm.broadcast(order, src=0)
        self.schedule.adopt(order.tolist())

    def _complete(self, position: int) -> None:
        with record_function("shardopt.reduce_complete"):
            for work in self.works.pop(position):
                work.wait()
            unit = self.units[position]
            if isinstance(unit, MatrixReduction):
                self.sharding.matrix_reduced(self.comm, self.storage_of[unit.param], self.matrix_grads.pop(unit.param),
                                             self.own_part.get(unit.param))
            else:
                self.sharding.reduced(self.buffers[unit.bucket])
            self.unit_bytes.pop(position, None)

    def close(self) -> None:
        """Wait for reductions in flight and remove the backward hooks."""
        for position in self.schedule.drain():
            self._complete(position)
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.sync_enabled = False

    def buffer_bytes(self) -> int:
        """Bytes of transient gradient buffers alive now (sharded gradients)."""
        return sum(self.unit_bytes.values())

    def reset(self) -> None:
        """Start a new step."""
        self.finished = False
        self.arrived.clear()
        self.schedule.reset()

    def discard(self) -> None:
        """Drop this step's gradients (after a failed backward) and start a new step."""
        for position in self.schedule.drain():
            self._complete(position)
        for grad in self.matrix_grads.values():  # gradients of matrices never launched
            if self.comm.pool.lends(grad):
                self.comm.pool.give(grad)
        self.matrix_grads.clear()
        self._callback_queued = False  # the failed backward never ran its callback
        self.failed = None
        self.reset()
