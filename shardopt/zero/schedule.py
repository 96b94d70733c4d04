"""The gradient reduction schedule: which gradients go in one collective, in what order, how many at once.

Pure, like the plan it is computed from: the same on every rank, and the one
implementation that both the runtime's reducer (:mod:`shardopt.zero.reducer`)
executes and the memory planner replays to count the gradient buffers alive
(:func:`window_numel`), so the two cannot drift apart.

Reduction units (:func:`reduce_units`) come in two kinds:

* :class:`BucketReduction`: one bucket's gradients in one collective, a
  reduce-scatter when gradients are sharded (stage 2) or an all-reduce when the
  full averaged gradient is kept (stage 1, one rank);
* :class:`MatrixReduction`: one matrix of a matrix storage (Muon, several
  ranks) as its gradient arrives: at stage 2 each part reduced to the rank
  whose area holds it, at stage 1 all-reduced in place. A bucket spanning every
  rank's area would wait for gradients from all over the model (and at stage
  2 hold them meanwhile).

Units are launched strictly in one order, the same on every rank
(:class:`ReductionSchedule`): a complete unit waits for the ones before it. The
first step uses the plan's guess, each parameter's place inside its param
group (indices run group by group); from the second step on, the order in
which rank 0's units completed in the first (DDP rebuilds its buckets after its
first iteration the same way: Li et al. 2020, "PyTorch Distributed", section
3.2.3). With a ``window``, at most ``window`` launched units stay in flight:
launching one more first waits for the oldest, so peak gradient memory is this
rank's areas plus a bounded window, not the whole model's gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .plan import Bucket, PlanError, ShardPlan
from .policy import GATHERS_IN_FLIGHT, MAX_IN_FLIGHT
from .pool import PoolLedger


@dataclass(frozen=True)
class BucketReduction:
    """Bucket ``bucket``'s gradients, reduced in one collective."""

    bucket: int


@dataclass(frozen=True)
class MatrixReduction:
    """Matrix ``param``'s gradient, each part reduced to the rank whose area holds it."""

    param: int


ReduceUnit = BucketReduction | MatrixReduction


def unit_params(plan: ShardPlan, unit: ReduceUnit) -> tuple[int, ...]:
    """The parameters whose gradients the unit reduces."""
    if isinstance(unit, BucketReduction):
        return tuple(dict.fromkeys(slot.param for slot in plan.buckets[unit.bucket].slots))
    return (unit.param,)


def unit_numel(plan: ShardPlan, unit: ReduceUnit) -> int:
    """Elements of the unit's gradient buffer: a bucket's flat buffer, or the matrix."""
    if isinstance(unit, BucketReduction):
        return plan.buckets[unit.bucket].flat_numel
    return plan.param(unit.param).numel


def _depth(plan: ShardPlan) -> dict[int, float]:
    """Each parameter's place in its param group, in (0, 1]: the group's last is 1.

    Indices run group by group (a Muon setup numbers every matrix before the
    embedding); inside a group they follow the order the parameters were
    listed, usually the model's. Gradients arrive in about the reverse of that
    order in every group at once, so the place inside the group predicts
    arrival where the index across groups does not.
    """
    groups: dict[int, list[int]] = {}
    for info in plan.params:
        groups.setdefault(info.group, []).append(info.index)
    depth = {}
    for indices in groups.values():
        for place, index in enumerate(sorted(indices)):
            depth[index] = (place + 1) / len(indices)
    return depth


def reduce_units(plan: ShardPlan) -> tuple[ReduceUnit, ...]:
    """Gradient reductions in the order backward is expected to complete them.

    A bucket of a storage without ``reduce_per_matrix`` is one unit; each matrix
    of a storage with it is one. Every parameter is in exactly one unit
    (checked: :class:`PlanError` otherwise). The guess must be good even though
    it serves one step only: a unit waiting for a late one holds every later
    gradient.
    """
    depth = _depth(plan)
    keyed: list[tuple[float, int, int, int, ReduceUnit]] = []
    for bucket in plan.buckets:
        if not bucket.storage.reduce_per_matrix:
            params = {slot.param for slot in bucket.slots}
            keyed.append((-min(depth[p] for p in params), -min(params), 0, bucket.index, BucketReduction(bucket.index)))
    for storage in plan.storages:
        if storage.reduce_per_matrix:
            for slot in storage.slots:
                keyed.append((-depth[slot.param], -slot.param, 1, slot.param, MatrixReduction(slot.param)))
    keyed.sort(key=lambda item: item[:4])
    units = tuple(item[4] for item in keyed)
    covered = sorted(p for unit in units for p in unit_params(plan, unit))
    if covered != sorted(info.index for info in plan.params):
        raise PlanError("Invalid shard plan: the reduce units do not cover every parameter exactly once")
    return units


class ReductionSchedule:
    """When to launch and wait for each reduction unit, driven by gradient arrival.

    ``window``: launched units allowed in flight (``None``: unbounded, for kept
    gradients, whose buffers live on anyway). The caller reports each gradient
    (:meth:`arrive`), then runs what :meth:`launches` yields: launch the unit,
    then wait for the units listed with it.
    """

    def __init__(self, plan: ShardPlan, window: int | None) -> None:
        self.units = reduce_units(plan)
        self.params = [unit_params(plan, unit) for unit in self.units]
        self.unit_of = {param: position for position, params in enumerate(self.params) for param in params}
        self.window = window
        self.order = list(range(len(self.units)))
        # The order units complete in the first step, adopted (from rank 0) after it.
        self.completion: list[int] | None = []
        self.in_flight: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Start a new step (units in flight must have been drained)."""
        self.pending = [len(params) for params in self.params]
        self.next_launch = 0

    def arrive(self, param: int) -> int:
        """Parameter ``param``'s gradient is in its unit's buffer; returns the unit's position."""
        position = self.unit_of[param]
        self.pending[position] -= 1
        if self.pending[position] == 0 and self.completion is not None:
            self.completion.append(position)
        return position

    def launches(self) -> Iterator[tuple[int, list[int]]]:
        """Units to launch now, in launch order, each with the units to wait for right after it."""
        while self.next_launch < len(self.order) and self.pending[self.order[self.next_launch]] == 0:
            position = self.order[self.next_launch]
            self.next_launch += 1
            self.in_flight.append(position)
            waits = []
            while self.window is not None and len(self.in_flight) > self.window:
                waits.append(self.in_flight.pop(0))
            yield position, waits

    def drain(self) -> list[int]:
        """Every unit still in flight, oldest first; none is in flight afterwards."""
        drained, self.in_flight = self.in_flight, []
        return drained

    def adopt(self, order: Sequence[int]) -> None:
        """Launch in ``order`` from now on (rank 0's first-step completion order, the same on all ranks)."""
        if sorted(order) != list(range(len(self.units))):
            raise ValueError(f"Invalid launch order: {list(order)} is not a permutation of the units")
        self.order = list(order)
        self.completion = None


def _replay(plan: ShardPlan, arrival: Sequence[int], first_step: bool,
            window: int | None) -> Iterator[tuple[str, ReduceUnit]]:
    """Replay :class:`ReductionSchedule` on one backward, as the reducer runs it:
    ``("appear", unit)`` at a unit's first gradient (its buffer is taken),
    ``("launch", unit)`` when its reduction starts and ``("wait", unit)`` when it is
    waited for (its buffers go back; the rest at the end of backward).

    From the second step on (``first_step=False``) units launch in the order they
    completed in the first.
    """
    schedule = ReductionSchedule(plan, window)
    if not first_step:
        for param in arrival:
            schedule.arrive(param)
        schedule.adopt(schedule.completion or [])
        schedule.reset()
    units = schedule.units
    seen: set[int] = set()
    for param in arrival:
        position = schedule.arrive(param)
        if position not in seen:
            seen.add(position)
            yield "appear", units[position]
        for launched, waits in schedule.launches():
            yield "launch", units[launched]
            for waited in waits:
                yield "wait", units[waited]
    for position in schedule.drain():
        yield "wait", units[position]


def window_numel(plan: ShardPlan, arrival: Sequence[int], *, first_step: bool = False,
                 window: int | None = MAX_IN_FLIGHT) -> int:
    """Peak elements of gradient reduction buffers alive during a backward with sharded gradients.

    Replays :class:`ReductionSchedule` on the gradient ``arrival`` order
    (parameter indices; every parameter once): the plan's order in the first
    step (``first_step``), from the second on the order units completed in the
    first. The reducer's measured peak
    (``ZeroOptimizer.memory_report()["comm_buffers_peak"]``) is tested equal.
    The peak is taken when a buffer appears, before the launch it may allow
    waits for an older one: both are alive at that moment.
    """
    alive, peak = 0, 0
    for event, unit in _replay(plan, arrival, first_step, window):
        if event != "launch":
            alive += (1 if event == "appear" else -1) * unit_numel(plan, unit)
        peak = max(peak, alive)
    return peak


def _settled_pool(plan: ShardPlan, arrival: Sequence[int], window: int | None, max_steps: int, kind: str,
                  taken_at: str, borrows: Callable[[ReduceUnit], int]) -> int:
    """Elements a :class:`~shardopt.zero.pool.PoolLedger` holds for ``kind`` once steps repeat.

    Each unit borrows ``borrows(unit)`` elements (0: none) at its ``taken_at``
    event (``"appear"`` or ``"launch"``) until it is waited for; backward after
    backward (the first in the plan's order, then in the adopted one) until one
    allocates nothing.
    """
    ledger = PoolLedger()
    key = (kind, None, None)
    for step in range(max_steps):
        before = ledger.num_allocations
        lent: dict[ReduceUnit, int] = {}
        for event, unit in _replay(plan, arrival, step == 0, window):
            if event == taken_at and borrows(unit):
                lent[unit] = ledger.take(key, borrows(unit))[0]  # type: ignore[arg-type]
            elif event == "wait" and unit in lent:
                ledger.give(lent.pop(unit))
        if step > 0 and ledger.num_allocations == before:
            break
    return ledger.held_numel()


def pool_numel(plan: ShardPlan, arrival: Sequence[int], *, pooled_matrices: bool,
               window: int | None = MAX_IN_FLIGHT, max_steps: int = 8) -> int:
    """Elements of the gradient buffers the :class:`~shardopt.zero.pool.BufferPool` holds
    once steps repeat (kind ``"reduce"``), as ``memory_report()["comm_buffers"]`` measures.

    Replays the pool's own ledger on the buffers the reducer borrows from a
    unit's first gradient until its reduction is waited for. Bucket units always
    borrow; a matrix unit only with ``pooled_matrices`` (its gradient is cast to
    the reduce dtype; otherwise it is reduced in autograd's own buffer).
    """
    def borrows(unit: ReduceUnit) -> int:
        return unit_numel(plan, unit) if pooled_matrices or isinstance(unit, BucketReduction) else 0

    return _settled_pool(plan, arrival, window, max_steps, "reduce", "appear", borrows)


def forward_order(plan: ShardPlan) -> list[Bucket]:
    """The plan's buckets in the order the forward is expected to need them: the
    order :class:`~shardopt.zero.gather.ParamGather` launches the all-gathers in.

    By the earliest parameter (index) each holds, then bucket index; buckets of
    padding only come last.
    """
    def first(bucket: Bucket) -> float:
        return min((slot.param for slot in bucket.slots if slot.numel), default=math.inf)

    return sorted(plan.buckets, key=lambda bucket: (first(bucket), bucket.index))


def staging_numel(plan: ShardPlan, arrival: Sequence[int], rank: int, *, backend: str, sharded: bool,
                  window: int | None = MAX_IN_FLIGHT, max_steps: int = 8) -> int:
    """Elements of the backend's staging buffers the pool holds on ``rank`` once steps
    repeat (kinds ``"receive"`` and ``"gather"``), as ``memory_report()["staging_buffers"]``
    measures.

    * ``"gloo"``: with ``sharded`` gradients (stage 2) a reduction is an all-to-all
      into a receive buffer, lent from its launch until it is waited for: a bucket's whole flat buffer, or for
      a matrix part this rank holds, the other ranks' copies of it
      (:class:`~shardopt.zero.comm_gloo.GlooCommunicator`).
    * any other (``"nccl"``): a bucket cut into chunks (a chunked Muon storage) is
      all-gathered through a flat buffer, at most
      :data:`~shardopt.zero.policy.GATHERS_IN_FLIGHT` at once, in :func:`forward_order`.
    """
    world = plan.world_size
    if world == 1:
        return 0
    if backend != "gloo":
        ledger = PoolLedger()
        lent: list[int] = []
        for bucket in forward_order(plan):
            if bucket.storage.num_chunks > 1:
                if len(lent) >= GATHERS_IN_FLIGHT:
                    ledger.give(lent.pop(0))
                lent.append(ledger.take(("gather", None, None), bucket.flat_numel)[0])  # type: ignore[arg-type]
        return ledger.held_numel()
    if not sharded:
        return 0
    storage_of = {slot.param: storage for storage in plan.storages for slot in storage.slots}

    def received(unit: ReduceUnit) -> int:
        if isinstance(unit, BucketReduction):
            return plan.buckets[unit.bucket].flat_numel
        return sum((world - 1) * (high - low) for member, low, high in storage_of[unit.param].parts(unit.param)
                   if member == rank)

    return _settled_pool(plan, arrival, window, max_steps, "receive", "launch", received)
