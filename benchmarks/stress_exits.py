"""Start the same short distributed job many times and count abnormal exits.

A release check, not a speed benchmark: a native crash that strikes one run
in ten (a rank dying with ``terminate called ...`` and no Python traceback)
passes any single test run. Each launch is a fresh ``torchrun --standalone``
job of ``--world`` gloo ranks on 127.0.0.1 training a byte-level GPT
(``examples/gpt_model.py``) for ``--steps`` steps; every job is one of:

* ``adamw-fp32``: ``ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=2)``, fp32 model;
* ``adamw-bf16``: the same with the model in bf16 (fp32 master weights);
* ``muon-bf16``: ``ZeroOptimizer(muon_param_groups(model), shardopt.Muon, stage=2)`` with
  every default (bf16 Newton-Schulz, balanced layout, straddling matrices) and
  ``bucket_numel`` small enough for several all-gather buckets.

* ``init-no-destroy``: ``shardopt.dist.init_from_env()``, 300 gloo all-reduces, exit
  without ``destroy_process_group()`` (shardopt destroys the group at exit);
* ``gloo-no-destroy`` (a control, not run by default): plain ``torch.distributed``,
  no shardopt: 300 gloo all-reduces, then exit *without*
  ``destroy_process_group()``. It aborts with ``terminate called without an
  active exception`` in some runs (measured 1-5 of 10): the crash torch and gloo
  give a process that exits with a live process group. shardopt's own
  ``init_from_env`` destroys its group at exit.

A run is abnormal when torchrun exits non-zero, when any rank's output holds
``terminate called``, ``Segmentation fault`` or ``Aborted``, or when the ranks
end with different parameters (a digest each rank prints). Prints one line per
variant and exits 1 if any run was abnormal. One launch took about 8 s
(adamw-fp32), 18 s (adamw-bf16), 48 s (muon-bf16) and 4 s (init-no-destroy)
here::

    python benchmarks/stress_exits.py --runs 30                 # about 40 min on 2 cores
    python benchmarks/stress_exits.py --runs 3 --variants muon-bf16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

VARIANTS = ("adamw-fp32", "adamw-bf16", "muon-bf16", "init-no-destroy")
CONTROLS = ("gloo-no-destroy",)
CRASH_MARKERS = ("terminate called", "Segmentation fault", "Aborted", "core dumped")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args: argparse.Namespace) -> None:
    """One rank of one job (run under torchrun)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.variant == "init-no-destroy":
        from shardopt.dist import init_from_env

        init_from_env("gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.variant.endswith("no-destroy"):  # the control does not even import shardopt
        value = torch.ones(16)
        for _ in range(300):
            dist.all_reduce(value)
        print(f"rank {rank} digest {float(value.sum())!r} skipped 0", flush=True)
        return  # leaves the process group alive at exit

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from gpt_model import GPT, GPTConfig

    import shardopt

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab, seq_len=64, num_layers=args.layers, num_heads=4, hidden=args.hidden)
    model = GPT(config)
    if args.variant == "adamw-bf16":
        model = model.to(torch.bfloat16)
    if args.variant.startswith("muon"):
        opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, stage=2, lr=0.02,
                                     bucket_numel=args.bucket_numel, adamw_lr=3e-4)
    else:
        opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=2, lr=3e-4,
                                     bucket_numel=args.bucket_numel)
    generator = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        tokens = torch.randint(0, args.vocab, (world * 2, config.seq_len + 1), generator=generator)
        mine = tokens.chunk(world)[rank]
        logits = model(mine[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), mine[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    digest = sum(float(p.double().sum()) for p in model.parameters())
    print(f"rank {rank} digest {digest!r} skipped {opt.num_skipped_steps}", flush=True)
    dist.destroy_process_group()


def launch(args: argparse.Namespace, variant: str) -> tuple[bool, str]:
    """One torchrun job; (abnormal, reason)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.world),
        os.path.abspath(__file__), "--worker", "--variant", variant, "--steps", str(args.steps),
        "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
        "--bucket-numel", str(args.bucket_numel),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return True, f"timed out after {args.timeout} s"
    output = done.stdout + done.stderr
    for marker in CRASH_MARKERS:
        if marker in output:
            return True, f"{marker!r} in the output (exit {done.returncode})"
    if done.returncode != 0:
        return True, f"exit {done.returncode}: {output.strip().splitlines()[-1:] or ''}"
    digests = {line.split()[3] for line in done.stdout.splitlines() if line.startswith("rank ")}
    if len(digests) != 1:
        return True, f"ranks ended with different parameters: {sorted(digests)}"
    return False, ""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="launches per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS + CONTROLS, default=list(VARIANTS))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--bucket-numel", type=int, default=1 << 18)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS + CONTROLS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    total_abnormal = 0
    for variant in args.variants:
        abnormal, reasons, start = 0, [], time.perf_counter()
        for run in range(args.runs):
            bad, reason = launch(args, variant)
            if bad:
                abnormal += 1
                reasons.append(f"run {run}: {reason}")
        seconds = time.perf_counter() - start
        print(f"{variant}: {abnormal} abnormal of {args.runs} runs ({seconds:.0f} s)", flush=True)
        for reason in reasons:
            print(f"  {reason}", flush=True)
        total_abnormal += abnormal
    return 1 if total_abnormal else 0


if __name__ == "__main__":
    sys.exit(main())
