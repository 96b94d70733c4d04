"""Shared test settings."""

from __future__ import annotations

import os

import pytest
import torch

# For every test and every process a test starts (spawned ranks and launched jobs
# inherit the environment): fresh and released communication buffers are NaN, so
# a read of an element no collective wrote fails the comparison with the oracle
# (shardopt/comm.py). The cross-rank agreement check costs one small collective
# per collective; the scale and collective workers, and the Muon workers at two
# ranks, turn it on themselves.
os.environ.setdefault("SHARDOPT_POISON_BUFFERS", "1")


@pytest.fixture(autouse=True)
def one_thread():
    # In-process tests use small tensors: extra intra-op threads only add
    # contention on a 2-core machine (spawned ranks set their own count).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
