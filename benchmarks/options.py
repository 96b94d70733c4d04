"""Command-line options, environment checks and the opening lines every benchmark shares."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from harness import PRESETS
from measure import corpus

# ---------------------------------------------------------------------- options and environment


def argument_parser(doc: str | None, systems: Sequence[str], *, timeout: float, batch_help: str,
                    loss_tol_help: str) -> argparse.ArgumentParser:
    """The options every benchmark here takes; the script adds its own."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated gloo world sizes (default 2,4)")
    parser.add_argument("--systems", default=",".join(systems), help=f"comma-separated, from {', '.join(systems)}")
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS), help="model preset (default bench)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every system (default 3)")
    parser.add_argument("--batch", type=int, default=1, help=batch_help)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the preset's seq_len)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--loss-tol", type=float, default=1e-3, help=loss_tol_help)
    parser.add_argument("--timeout", type=float, default=timeout,
                        help=f"seconds allowed per run (default {timeout:.0f})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               systems: Sequence[str]) -> argparse.Namespace:
    """Parse and check the options of :func:`argument_parser` (world sizes, systems, counts)."""
    args = parser.parse_args(argv)
    args.world_sizes = [int(w) for w in args.world_sizes.split(",") if w]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in systems]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(systems)}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        parser.error("--steps, --repeats, --batch, --threads must be >= 1 and --warmup >= 0")
    if args.seq is not None and args.seq < 1:
        parser.error("--seq must be >= 1")
    if not args.world_sizes or any(w < 2 for w in args.world_sizes):
        parser.error("--world-sizes must all be >= 2")
    return args


def config_from(args: argparse.Namespace, ranges: Sequence[str] = ()) -> dict[str, Any]:
    """:class:`Config`'s fields from parsed options (a script's Config subclass adds its own)."""
    return dict(preset=args.preset, seq=args.seq, batch=args.batch, warmup=args.warmup, steps=args.steps,
                threads=args.threads, seed=args.seed, timeout=args.timeout, ranges=tuple(ranges))


def prepare_run(threads: int, systems: Sequence[str], deepspeed_systems: Sequence[str]) -> tuple[list[str], str | None]:
    """Environment the spawned ranks inherit, and the systems that can run: ``(systems, deepspeed version)``.

    Eager PyTorch everywhere (``TORCHDYNAMO_DISABLE=1`` unless set), gloo on
    127.0.0.1, ``OMP_NUM_THREADS=threads``; DeepSpeed systems are dropped with a
    note when ``deepspeed`` is not importable.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo traffic on 127.0.0.1 only
    systems = list(systems)
    ds_version = None
    if any(s in deepspeed_systems for s in systems):
        if importlib.util.find_spec("deepspeed") is None:
            print("note: deepspeed is not importable; skipping "
                  + ", ".join(s for s in systems if s in deepspeed_systems)
                  + " (pip install -e '.[deepspeed]')")
            systems = [s for s in systems if s not in deepspeed_systems]
        else:
            from importlib.metadata import version

            ds_version = version("deepspeed")
    if not systems:
        raise SystemExit("no systems to run")
    return systems, ds_version


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through spawn_ranks, which kills the ranks


def setup_lines(ds_version: str | None, batch: int, seq_len: int, descriptions: Mapping[str, str],
                systems: Sequence[str]) -> tuple[str, str, str]:
    """The versions, data and systems lines every report starts with."""
    _, corpus_note = corpus()
    return (
        f"torch {torch.__version__}, deepspeed {ds_version or 'not used'}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs",
        f"data: {corpus_note}; micro-batch {batch} x {seq_len} tokens per rank per step",
        "systems: " + "; ".join(f"{s} = {descriptions[s]}" for s in systems),
    )
