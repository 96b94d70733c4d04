"""The ``shardopt`` command: ``shardopt plan ...`` (the memory planner) and
``shardopt checkpoint convert SRC DST`` (DCP <-> one torch.save file).

Each subcommand's module is imported only when it runs: the planner needs no
torch.distributed.checkpoint, and a conversion no planner.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: shardopt {plan,checkpoint} ...

  shardopt plan ...                          per-GPU memory of a training configuration (shardopt plan --help)
  shardopt checkpoint convert SRC DST        a DCP checkpoint to one torch.save file, or back
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``shardopt``; returns the exit code (2 and one line on stderr for bad input)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["checkpoint"]:
        if args[1:2] != ["convert"]:
            print("shardopt checkpoint: error: expected 'convert SRC DST'", file=sys.stderr)
            return 2
        from .checkpoint.convert import main as convert

        return convert(args[2:], prog="shardopt checkpoint convert")
    if args[:1] in ([], ["-h"], ["--help"]):
        print(USAGE, end="")
        return 0 if args else 2
    from .planner.cli import main as plan

    return plan(args)


if __name__ == "__main__":
    sys.exit(main())
