"""Run the example under a real launcher and record what each rank saw.

Used by tests/test_launch_multiproc.py as the SCRIPT of launch/*.sh:

    LAUNCH_CHECK_DIR=/tmp/x torchrun ... tests/launch_check.py --steps 4 --save-params /tmp/x/params.pt

Each rank writes ``rank<R>.json`` into ``$LAUNCH_CHECK_DIR``: the launcher
shardopt.dist detected before initialisation, whether MASTER_ADDR was given
by the launcher, the rendezvous address and port it ended up with, and the
example's result (world size, final loss).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import train_gpt

from shardopt.dist import launch_env


def main() -> None:
    out = Path(os.environ["LAUNCH_CHECK_DIR"])
    before = launch_env()
    given_master = os.environ.get("MASTER_ADDR")
    result = train_gpt.main(sys.argv[1:])
    record = {
        "launcher": before.launcher if before else None,
        "rank": int(os.environ["RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "world_size": result["world_size"],
        "master_addr_given": given_master,
        "master_addr": os.environ["MASTER_ADDR"],
        "master_port": int(os.environ["MASTER_PORT"]),
        "final_loss": result["final_loss"],
    }
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
