"""Backward hooks: copy gradients into buckets and reduce each bucket as it completes.

A post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``,
the mechanism torch documents for optimizer-in-backward) copies each
parameter's gradient into its bucket's flat buffer and frees ``p.grad``. When
every parameter of a bucket has arrived, an asynchronous reduce-scatter
(stage 2) or all-reduce (stage 1) of the bucket starts, overlapping the rest
of backward, as DDP's reducer does (Li et al. 2020, "PyTorch Distributed",
section 3.2.3).

Buckets are launched strictly in plan order: a bucket that is complete waits
for the ones before it. Ranks then issue the same collectives in the same
order even when one of them got no gradient for some parameter (an unused
branch on that rank only); those buckets launch at ``step()`` with zeros in
place of the missing gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .buffers import BucketBuffers
from .comm import Communicator
from .plan import ShardPlan

MAX_IN_FLIGHT = 2


class GradientReducer:
    def __init__(
        self,
        plan: ShardPlan,
        buffers: list[BucketBuffers],
        params: dict[int, Tensor],
        comm: Communicator,
        *,
        stage: int,
        overlap: bool,
        label: Callable[[Tensor], str],
        on_reduced: Callable[[], None],
    ) -> None:
        self.plan = plan
        self.buffers = buffers
        self.params = params
        self.comm = comm
        self.stage = stage
        self.overlap = overlap
        self.label = label
        self.sync_enabled = True
        self.on_reduced = on_reduced
        self.finished = False
        self._callback_queued = False
        # Where each parameter's gradient goes: (bucket, offset in its flat, slot).
        self.location: dict[int, list[tuple[int, Any]]] = {}
        for bucket in plan.buckets:
            for slot in bucket.slots:
                self.location.setdefault(slot.param, []).append((bucket.index, slot))
        self.num_pending = [len(bucket.slots) for bucket in plan.buckets]
        self.arrived: set[int] = set()
        self.next_launch = 0
        # (buffers, work) of launched reductions not yet waited for.
        self.in_flight: list[tuple[BucketBuffers, Any]] = []
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
                self.take_grad(index, param)
                if self.overlap:
                    self.launch_ready()

        return hook

    def take_grad(self, index: int, param: Tensor) -> None:
        """Move ``param.grad`` into its bucket; ``None`` means a zero gradient."""
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
        for bucket_index, slot in self.location[index]:
            flat = self.buffers[bucket_index].ensure_grad_flat()
            target = flat[slot.offset : slot.offset + slot.numel]
            if grad is None:
                target.zero_()
            else:
                target.copy_(grad[slot.param_offset : slot.param_offset + slot.numel])
            self.num_pending[bucket_index] -= 1
        param.grad = None
        self.arrived.add(index)

    def launch_ready(self) -> None:
        while self.next_launch < len(self.buffers) and self.num_pending[self.next_launch] == 0:
            self._launch(self.buffers[self.next_launch])
            self.next_launch += 1

    def _launch(self, buffers: BucketBuffers) -> None:
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
            self.in_flight.append((buffers, self.comm.all_reduce_avg(flat, async_op=True)))
        else:
            region = buffers.grad_region()
            self.in_flight.append((buffers, self.comm.reduce_scatter_avg(region, flat, async_op=True)))
            # Stage 2 keeps at most MAX_IN_FLIGHT full-bucket gradient buffers alive:
            # waiting for the oldest frees it, so peak gradient memory is this rank's
            # regions plus a bounded window, not the whole model's gradients.
            while len(self.in_flight) > MAX_IN_FLIGHT:
                self._complete(*self.in_flight.pop(0))

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
        self.finished = True
        self.on_reduced()

    @staticmethod
    def _complete(buffers: BucketBuffers, work: Any) -> None:
        work.wait()
        if not buffers.owner.keep_grad_flat:
            buffers.release_grad_flat()

    def reset(self) -> None:
        self.finished = False
        self.arrived.clear()
        self.num_pending = [len(bucket.slots) for bucket in self.plan.buckets]
        self.next_launch = 0
