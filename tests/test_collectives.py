"""The Communicator's guarantees: ranks that disagree raise instead of misreading bytes,
and a buffer owned by an in-flight collective cannot be touched by another; and the
factory that picks its type (native or gloo) from the group's backend."""

from __future__ import annotations

import functools

import collective_workers as w
import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks

from shardopt.zero.comm import POISON_ENV, Communicator, flag_from_env
from shardopt.zero.comm_gloo import GlooCommunicator, communicator_for
from shardopt.zero.policy import GATHERS_IN_FLIGHT

PROGRAMS = ["mismatched_exchange_dtype", "mismatched_exchange_counts", "mismatched_all_gather", "ownership",
            "poison", "native_chunked_all_gather"]


@functools.cache
def results(world_size: int) -> list[dict]:
    return run_ranks(w.suite, world_size, PROGRAMS, timeout=120)


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_dtype_disagreement_raises_on_every_rank(world_size):
    outs = [out["mismatched_exchange_dtype"] for out in results(world_size)]
    for out in outs:
        assert out.startswith("CollectiveMismatchError"), out
        assert "kind or dtype" in out, out
        assert "bfloat16" in out
        assert "float32" in out


@pytest.mark.parametrize("world_size", [2, 3])
def test_count_disagreements_raise_on_every_rank(world_size):
    for out in results(world_size):
        assert out["mismatched_exchange_counts"].startswith("CollectiveMismatchError"), out
        assert "sends and its peer expects" in out["mismatched_exchange_counts"]
        assert out["mismatched_all_gather"].startswith("CollectiveMismatchError"), out
        assert "element count" in out["mismatched_all_gather"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_in_flight_buffers_are_owned_until_waited(world_size):
    for out in results(world_size):
        owned = out["ownership"]
        assert owned["owned"] == 2  # the reduce-scatter's input and output
        assert owned["overlapping"].startswith("BufferOwnershipError")
        assert "reduce-scatter" in owned["overlapping"]
        assert owned["disjoint"] == "no error"
        assert owned["after"] == 0
        assert owned["mean_ok"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_native_chunked_all_gather_is_async_into_a_reused_buffer(world_size):
    for out in results(world_size):
        out = out["native_chunked_all_gather"]
        assert out["owned_while_in_flight"].startswith("BufferOwnershipError"), out
        assert out["call0"], out
        assert out["call1"], out
        assert out["call2"], out
        assert out["gaps_untouched"], out
        assert out["allocations0"] == out["allocations2"] == 1, out
        assert out["lent"] == 0, out
        # The first buffer is free again (copied out); two more make the window of three.
        assert out["window_allocations"] == GATHERS_IN_FLIGHT - 1, out
        assert out["window_ok"], out


@pytest.mark.parametrize("world_size", [2])
def test_poisoning_fills_fresh_and_retired_buffers_with_nan(world_size):
    for out in results(world_size):
        assert out["poison"] == {"fresh_nan": True, "retired_nan": True, "kept": True}


def test_the_factory_picks_the_communicator_type_from_the_backend():
    assert type(communicator_for(None)) is Communicator  # no group: one rank, native
    # An in-process one-rank gloo group, destroyed before any other test runs.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        comm = communicator_for(dist.group.WORLD, check=True, poison=False)
        assert type(comm) is GlooCommunicator
        assert (comm.check, comm.poison, comm.world_size, comm.rank) == (True, False, 1, 0)
        assert not hasattr(comm, "gloo")  # the backend is the type, not a flag
    finally:
        dist.destroy_process_group()


def test_exchange_refuses_a_send_buffer_of_another_dtype():
    comm = Communicator(None)
    with pytest.raises(TypeError, match=r"send buffer is torch.float32, the exchange carries torch.bfloat16"):
        comm.exchange(torch.ones(2), [2], [2], torch.bfloat16)


def test_the_suite_poisons_buffers():
    # conftest.py turns poisoning on for every test and every rank they spawn.
    assert flag_from_env(POISON_ENV)
