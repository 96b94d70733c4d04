"""Between the DCP format and torch.optim's single-file format.

``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(dcp_dir, file)``
assembles a DCP checkpoint into one ``torch.save`` file of full tensors, keyed
like the saved dict; its optimizer entry is :func:`get_optimizer_state_dict`'s
layout with whole tensors. :func:`full_state_dict_from_dcp` turns that entry
into what ``ZeroOptimizer.full_state_dict()`` gives (and torch.optim's
``state_dict()``): state keyed by parameter index over the param groups. The
way back: ``ZeroOptimizer.load_state_dict`` takes that dict at any world size,
and :func:`set_optimizer_state_dict` takes the file's entry as it is (fqn keys,
full tensors, fp32 master weights included).

From the shell, both directions (no process group; torch's ``format_utils``,
https://pytorch.org/docs/stable/distributed.checkpoint.html#module-torch.distributed.checkpoint.format_utils)::

    python -m shardopt.checkpoint.convert ckpt/step-000000100 full.pt   # DCP directory -> one file
    python -m shardopt.checkpoint.convert ckpt full.pt                  # the newest complete one under ckpt
    python -m shardopt.checkpoint.convert full.pt ckpt/step-000000100   # file -> DCP (whole tensors; any
                                                                        # world size reshards it on load)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .full import full_state_dict_from_dcp

__all__ = ["convert", "full_state_dict_from_dcp", "main"]


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A DCP checkpoint directory (or a root of ``step-N`` directories: its newest complete one)
    to one ``torch.save`` file, or such a file to a DCP directory. Returns the directory or file
    that was read. Raises ``ValueError`` naming what was expected when ``src`` is neither."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    from .files import latest

    src, dst = Path(src), Path(dst)
    if src.is_dir():
        found = src if (src / ".metadata").is_file() else latest(src)
        if found is None:
            raise ValueError(f"Invalid source: {src} is neither a DCP checkpoint (no .metadata) nor a directory "
                             "of complete step-N checkpoints")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dcp_to_torch_save(found, dst)
        return found
    if src.is_file():
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise ValueError(f"Invalid destination: {dst} exists (expected a new or empty directory for the "
                             "DCP checkpoint)")
        torch_save_to_dcp(src, dst)
        return src
    raise ValueError(f"Invalid source: {src} does not exist (expected a DCP checkpoint directory or a torch.save file)")


def main(argv: Sequence[str] | None = None, prog: str = "python -m shardopt.checkpoint.convert") -> int:
    """``shardopt checkpoint convert SRC DST`` (or ``python -m shardopt.checkpoint.convert``):
    exit status 0, or 2 with one line on stderr."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a DCP checkpoint directory to one torch.save file, or a torch.save file to a DCP "
                    "checkpoint directory (the direction follows SRC).")
    parser.add_argument("src", help="DCP checkpoint directory, a root of step-N checkpoints, or a .pt file")
    parser.add_argument("dst", help="the .pt file to write, or the directory to create")
    args = parser.parse_args(argv)
    try:
        found = convert(args.src, args.dst)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{found} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
