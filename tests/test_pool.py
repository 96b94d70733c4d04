"""BufferPool: reuse by exact key, poisoning, refusal of foreign or owned buffers."""

from __future__ import annotations

import pytest
import torch

from shardopt.zero.comm import BufferOwnershipError, Communicator
from shardopt.zero.pool import BufferPool

CPU = torch.device("cpu")


def test_a_returned_buffer_is_lent_again_for_the_same_key_only():
    pool = BufferPool()
    a = pool.take(10, torch.float32, CPU, kind="reduce")
    pool.give(a)
    again = pool.take(10, torch.float32, CPU, kind="reduce")
    assert again.data_ptr() == a.data_ptr()
    other_kind = pool.take(10, torch.float32, CPU, kind="cast")
    other_dtype = pool.take(10, torch.bfloat16, CPU, kind="reduce")
    other_size = pool.take(11, torch.float32, CPU, kind="reduce")
    assert len({t.data_ptr() for t in (again, other_kind, other_dtype, other_size)}) == 4
    assert pool.num_allocations == 4
    assert pool.num_lent == 4
    assert pool.held_bytes("reduce") == 10 * 4 + 10 * 2 + 11 * 4
    assert pool.held_bytes() == pool.held_bytes("reduce") + 40


def test_the_pool_holds_the_most_buffers_lent_at_once():
    pool = BufferPool()
    for _ in range(5):  # the same pattern every "step": two at once, then one
        first, second = (pool.take(8, torch.float32, CPU, kind="reduce") for _ in range(2))
        pool.give(first)
        pool.give(second)
        pool.give(pool.take(8, torch.float32, CPU, kind="reduce"))
    assert pool.num_allocations == 2
    assert pool.held_bytes() == 2 * 8 * 4
    assert pool.num_lent == 0
    pool.clear()
    assert pool.held_bytes() == 0


def test_poison_fills_new_and_returned_buffers_with_nan():
    pool = BufferPool(poison=True)
    buffer = pool.take(4, torch.float32, CPU, kind="reduce")
    assert buffer.isnan().all()
    buffer.fill_(1.0)
    pool.give(buffer)
    assert buffer.isnan().all()


def test_give_refuses_foreign_and_twice_returned_buffers():
    pool = BufferPool()
    with pytest.raises(ValueError, match="not lent by the pool"):
        pool.give(torch.ones(3))
    buffer = pool.take(3, torch.float32, CPU, kind="reduce")
    pool.give(buffer)
    with pytest.raises(ValueError, match="given back already"):
        pool.give(buffer)
    assert pool.take(0, torch.float32, CPU, kind="reduce").numel() == 0
    assert pool.num_lent == 0


def test_a_buffer_an_in_flight_collective_owns_cannot_return():
    comm = Communicator(None)
    buffer = comm.pool.take(6, torch.float32, CPU, kind="receive")
    claim = comm._claim("reduce-scatter", [buffer[2:4]])
    comm._owned.extend(claim)  # what an asynchronous collective's launch registers
    with pytest.raises(BufferOwnershipError, match="in-flight reduce-scatter"):
        comm.pool.give(buffer)
    assert comm.pool.lends(buffer)  # refused: still lent, nothing lost
    comm._release(claim)
    comm.pool.give(buffer)
    assert not comm.pool.lends(buffer)


def test_the_smallest_fitting_buffer_serves_and_a_too_small_one_is_replaced():
    pool = BufferPool()
    big, small = pool.take(8, torch.float32, CPU, kind="reduce"), pool.take(4, torch.float32, CPU, kind="reduce")
    pool.give(big)
    pool.give(small)
    assert pool.take(3, torch.float32, CPU, kind="reduce").data_ptr() == small.data_ptr()
    view = pool.take(5, torch.float32, CPU, kind="reduce")
    assert view.data_ptr() == big.data_ptr()
    assert view.numel() == 5
    pool.give(view)
    grown = pool.take(12, torch.float32, CPU, kind="reduce")  # the free 8 is dropped, 12 allocated
    assert pool.num_allocations == 3
    assert pool.held_bytes("reduce") == (4 + 12) * 4
    assert pool.ledger.held_numel("reduce") == 16
    assert grown.numel() == 12
