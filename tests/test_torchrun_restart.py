"""A rank killed under ``torchrun --max-restarts``: the restarted job resumes from the newest
complete checkpoint and ends where the uninterrupted run ends (tests/restart_job.py).

torchrun stops the surviving worker and starts both again; the script is the
same on every attempt (``checkpoint.latest`` decides where it starts). The
restart at another world size is tested without torchrun
(test_checkpoint_faults.py restarts at one rank).
"""

from __future__ import annotations

import json
import sys

import torch
from fault_workers import SAVE_AT, uninterrupted
from test_launch_multiproc import ROOT, clean_env, free_port, run_all

TOL = 1e-6  # the 2-rank run against one process on the whole batch: last bits of the reduction


def test_killed_rank_restarts_and_resumes_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", "--monitor-interval", "0.1", str(ROOT / "tests" / "restart_job.py"), str(out)]
    run_all([command], clean_env(SHARDOPT_TIMEOUT_S="30", MASTER_PORT=str(free_port())), tmp_path / "logs",
            timeout=150)
    attempts = {path.stem: json.loads(path.read_text()) for path in out.glob("attempt*.json")}
    assert attempts["attempt0-rank0"]["start"] == 0
    assert attempts["attempt1-rank0"] == attempts["attempt1-rank1"] == {"start": SAVE_AT, "world": 2}
    assert not any(name.startswith("attempt2") for name in attempts)
    final = torch.load(out / "final.pt")
    worst = max((a - b).abs().max().item() for a, b in zip(final, uninterrupted()))
    assert worst <= TOL
