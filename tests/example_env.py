"""Running the example in the test process as one process alone."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from unittest import mock

import torch

LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SHARDOPT_BACKEND")
LAUNCHER_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "SLURM_")


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """No launcher variables (the example must not try to join a job) and one thread."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_NAMES and not k.startswith(LAUNCHER_PREFIXES)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.dict(os.environ, env, clear=True):
            yield
    finally:
        torch.set_num_threads(threads)
