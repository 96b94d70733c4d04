"""A job for test_torchrun_restart.py, run by ``torchrun --max-restarts 1``.

Trains ``fault_workers.CONFIG`` (ZeroOptimizer, AdamW, stage 2) for ``STEPS``
steps, saving at ``SAVE_AT`` through ``shardopt.checkpoint``. On torchrun's first
attempt (``TORCHELASTIC_RESTART_COUNT`` 0) the last rank kills itself (SIGKILL)
at ``FAULT_AT``; torchrun stops the others and starts every worker again, and
the same script resumes from ``checkpoint.latest``. Each attempt records the
step it started from; rank 0 of the attempt that finishes saves its parameters.

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 tests/restart_job.py OUT
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_workers import build, state_of, train
from fault_workers import CONFIG, FAULT_AT, SAVE_AT, STEPS

from shardopt import checkpoint
from shardopt.dist import init_from_env


def main(out: Path) -> None:
    env = init_from_env()
    rank, world = env.rank, env.world_size
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    model, opt = build(CONFIG, seed=attempt)  # a restart's own initialisation is overwritten by the load
    path = checkpoint.latest(out / "ckpt")
    start = 0 if path is None else checkpoint.step_of(path)
    if path is not None:
        checkpoint.load(state_of(model, opt), path)
    (out / f"attempt{attempt}-rank{rank}.json").write_text(json.dumps({"start": start, "world": world}))
    for step in range(start, STEPS):
        if step == SAVE_AT and path is None:
            checkpoint.save(state_of(model, opt), out / "ckpt", step)
        if attempt == 0 and rank == world - 1 and step == FAULT_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        train(model, opt, CONFIG, range(step, step + 1), rank, world)
    if rank == 0:
        torch.save([p.detach().clone() for p in model.parameters()], out / "final.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
