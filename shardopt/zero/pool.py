"""A pool of communication buffers that stops growing after the first steps.

Every step asks for the same buffers: a bucket's gradients from its first
gradient until its reduce-scatter is waited for, a matrix's gradient copy, a
receive buffer per gloo all-to-all, the master-dtype cast of the gradient
areas. Allocating them afresh each step costs twice on the host:

* page faults: a copy into a fresh 32 MiB buffer took 20.9 ms against 3.5 ms
  into a reused one (``benchmarks/bench_zero.py --profile``);
* heap growth: glibc serves a freed large chunk's size from the heap from then
  on (its mmap threshold adapts upwards to the largest freed chunk, up to 32
  MiB), and the heap keeps what it grew to, fragmented. Peak RSS of ZeRO-2 on
  the 25.5M-parameter benchmark GPT at 2 ranks: 987 MiB with fresh buffers,
  734 MiB with ``MALLOC_MMAP_THRESHOLD_`` fixed (which disables the adaptation).

:class:`BufferPool` lends buffers by ``(kind, dtype, device)`` and takes them
back when their collective has been waited for. A request gets the smallest
returned buffer of its kind that is large enough (a view of its first
``numel`` elements); if none is, the largest returned one, too small, is
dropped and a buffer of the requested size allocated. So the pool never holds
more buffers of a kind than were ever lent at once, none larger than the
largest request. Which buffer serves which request depends only on the
sequence of requests and returns (:class:`PoolLedger`, pure), and every step
asks in the same order as the one before it (the reduction schedule is fixed
after the first step, :mod:`shardopt.zero.schedule`): after the first steps
the pool allocates nothing (``num_allocations`` stops moving; tested), and the
memory planner replays the same ledger (:func:`shardopt.zero.schedule.pool_numel`)
to predict its size exactly (tested against :meth:`BufferPool.held_bytes`).

DeepSpeed's ZeRO-2 keeps fixed "IPG" buckets for the same reason (Rajbhandari
et al. 2020, section 6.2: "constant size buffers").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Key = tuple[str, torch.dtype, torch.device]


def new_buffer(numel: int, dtype: torch.dtype, device: torch.device, *, poison: bool) -> Tensor:
    """An uninitialised buffer, or with ``poison`` one full of NaN (floating dtypes)."""
    if poison and (dtype.is_floating_point or dtype.is_complex):
        return torch.full((numel,), float("nan"), dtype=dtype, device=device)
    return torch.empty(numel, dtype=dtype, device=device)


class PoolLedger:
    """Which buffer serves which request: :class:`BufferPool`'s decisions on sizes alone.

    Buffers are numbered as they are allocated; :meth:`take` returns a buffer's
    number, or a new number with the number it replaces (``None`` if none).
    """

    def __init__(self) -> None:
        self.size: dict[int, int] = {}  # buffer number -> elements
        self.key: dict[int, Key] = {}
        self.free: set[int] = set()
        self.num_allocations = 0

    def take(self, key: Key, numel: int) -> tuple[int, bool, int | None]:
        """(buffer number, whether it is new, the free buffer it replaces or ``None``)."""
        mine = [b for b in self.free if self.key[b] == key]
        fits = [b for b in mine if self.size[b] >= numel]
        if fits:
            chosen = min(fits, key=lambda b: (self.size[b], b))
            self.free.discard(chosen)
            return chosen, False, None
        dropped = max(mine, key=lambda b: (self.size[b], b)) if mine else None
        if dropped is not None:
            self.free.discard(dropped)
            del self.size[dropped], self.key[dropped]
        number = self.num_allocations
        self.num_allocations += 1
        self.size[number], self.key[number] = numel, key
        return number, True, dropped

    def give(self, number: int) -> None:
        self.free.add(number)

    def held_numel(self, kind: str | None = None) -> int:
        return sum(n for b, n in self.size.items() if kind is None or self.key[b][0] == kind)

    def clear(self) -> None:
        for number in self.free:
            del self.size[number], self.key[number]
        self.free = set()


class BufferPool:
    """Lends buffers by ``(kind, dtype, device)`` and takes them back (module docstring).

    ``poison``: new buffers start as NaN and returned ones are filled with NaN
    (``SHARDOPT_POISON_BUFFERS``), so a read of an element nobody wrote, or of a
    buffer after its return, shows as NaN. ``check``: called with a buffer
    before it is taken back (the communicator's ownership check: a buffer an
    in-flight collective still owns must not return).
    """

    def __init__(self, *, poison: bool = False, check: Callable[[Tensor], None] | None = None) -> None:
        self.poison = poison
        self.check = check
        self.ledger = PoolLedger()
        self._buffers: dict[int, Tensor] = {}  # buffer number -> its tensor
        self._lent: dict[int, int] = {}  # data_ptr of a lent buffer -> its number

    @property
    def num_allocations(self) -> int:
        return self.ledger.num_allocations

    def take(self, numel: int, dtype: torch.dtype, device: torch.device, *, kind: str) -> Tensor:
        """``numel`` elements, uninitialised (NaN with ``poison``), lent until :meth:`give`."""
        device = torch.device(device)
        if numel == 0:
            return torch.empty(0, dtype=dtype, device=device)  # nothing to pool (all share address 0)
        number, new, dropped = self.ledger.take((kind, dtype, device), numel)
        if dropped is not None:
            del self._buffers[dropped]
        if new:
            self._buffers[number] = new_buffer(numel, dtype, device, poison=self.poison)
        buffer = self._buffers[number][:numel]
        self._lent[buffer.data_ptr()] = number
        return buffer

    def lends(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is a buffer this pool lent and has not taken back."""
        return tensor.numel() > 0 and tensor.data_ptr() in self._lent

    def give(self, tensor: Tensor) -> None:
        """Take back a buffer from :meth:`take` (its collective has been waited for)."""
        if tensor.numel() == 0:
            return
        number = self._lent.get(tensor.data_ptr())
        if number is None:
            raise ValueError("BufferPool.give: this tensor was not lent by the pool (or was given back already)")
        if self.check is not None:
            self.check(tensor)
        del self._lent[tensor.data_ptr()]
        if self.poison and tensor.is_floating_point():
            self._buffers[number].fill_(float("nan"))
        self.ledger.give(number)

    def held_bytes(self, kind: str | None = None) -> int:
        """Bytes the pool holds (lent and free), of one ``kind`` or of all."""
        return sum(t.numel() * t.element_size() for number, t in self._buffers.items()
                   if kind is None or self.ledger.key[number][0] == kind)

    @property
    def num_lent(self) -> int:
        return len(self._lent)

    def clear(self) -> None:
        """Drop every buffer not lent now (lent ones stay their holders')."""
        for number in self.ledger.free:
            del self._buffers[number]
        self.ledger.clear()
