"""shardopt's Muon through the DeepSpeed plugin against DeepSpeed's own Muon and ZeroOptimizer alone.

Every system trains the byte-level GPT of ``examples/gpt_model.py`` (``--preset``,
``PRESETS["bench"]`` by default) from the same seed on the same data with the same
Muon settings as ``bench_muon.py`` (lr 0.02, momentum 0.95, Nesterov, weight decay
0.1, 5 Newton-Schulz steps; the AdamW half lr 3e-4, betas (0.9, 0.95)), no
clipping, fp32, at each world size of gloo ranks on 127.0.0.1. Systems:

* ``plugin-muon``: ``shardopt.integrations.deepspeed.initialize`` with a ``"shardopt"``
  section (Muon, stage 2, ns_dtype float32), DeepSpeed ZeRO stage 0, ``engine.backward`` /
  ``engine.step``.
* ``shardopt-muon``: ``shardopt.ZeroOptimizer(muon_param_groups, shardopt.Muon, stage=2)``
  alone (``bench_muon.build_shardopt_muon``): the plugin's cost is the difference.
* ``ds-muon-z1`` / ``ds-muon-z2``: DeepSpeed's Muon at ZeRO-1 / ZeRO-2
  (``bench_muon.build_deepspeed_muon``: its ``MuonWithAuxAdam``, torch AdamW for the
  auxiliary half, the same Muon/AdamW split, Newton-Schulz in fp32 where DeepSpeed has
  such an iteration on this accelerator; its docstring lists the differences DeepSpeed's
  configuration cannot remove).

Measured (``harness.py``): step ms = rank 0's forward + backward + optimizer step, median
over the timed steps, then over the interleaved repeats (also the minimum over repeats);
wire = ``lo`` tx bytes of ``/proc/net/dev`` over the timed window / world / steps; state =
optimizer states plus any separate fp32 master copy on the rank holding the most
(shardopt: ``memory_report()``; DeepSpeed: its optimizer's state, its fp32 partitions and
its Muon momentum staging copy). The eval loss is rank 0's on a fixed batch after the
timed steps; plugin-muon must equal shardopt-muon's within ``--loss-tol``.

Every DeepSpeed system here turns off DeepSpeed's shared-memory op before its first
``deepspeed.initialize`` (``deepspeed.ops.__compatible_ops__``): building it takes about
50 s cold and it serves only ``inference_all_reduce``, which training never calls.

Usage, from the repository root::

    python benchmarks/bench_deepspeed.py --markdown
    python benchmarks/bench_deepspeed.py --world-sizes 2 --preset tiny --steps 5 --warmup 1 --repeats 3
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import bench_muon
import harness
import measure
import options
import report
import torch
from harness import Run

DESCRIPTIONS = {
    "plugin-muon": "shardopt.integrations.deepspeed.initialize, 'shardopt': Muon stage 2; DeepSpeed ZeRO-0",
    "plugin-muon-auto": "the same with ns_method='auto' (Gram Newton-Schulz where it needs fewer multiply-adds, "
                        "as DeepSpeed's fp32 Muon runs Gram)",
    "shardopt-muon": "shardopt.ZeroOptimizer(muon_param_groups, shardopt.Muon, stage=2) alone, no DeepSpeed",
    "ds-muon-z1": bench_muon.DESCRIPTIONS["ds-muon-z1"],
    "ds-muon-z2": bench_muon.DESCRIPTIONS["ds-muon-z2"],
}
SYSTEMS = tuple(DESCRIPTIONS)
DEEPSPEED_SYSTEMS = ("plugin-muon", "plugin-muon-auto", "ds-muon-z1", "ds-muon-z2")
SAME_MATH = ("shardopt-muon", "plugin-muon")


def quiet_deepspeed() -> None:
    """DeepSpeed's logger at warnings, and no JIT build of its inference-only shared-memory op."""
    import logging

    import deepspeed
    import deepspeed.ops

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_plugin(model: torch.nn.Module, batch: int, ns_dtype: str, ns_method: str = "standard") -> harness.Built:
    from shardopt.integrations import deepspeed as plugin

    kwargs = dict(bench_muon.MUON_KWARGS, ns_dtype=ns_dtype, ns_method=ns_method)
    kwargs["adamw_betas"] = list(kwargs["adamw_betas"])
    config = {
        "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 0,
        "zero_optimization": {"stage": 0}, "steps_per_print": 1 << 30,
        "shardopt": {"optimizer": {"type": "Muon", "params": kwargs}, "stage": 2},
    }
    engine, opt, _, _ = plugin.initialize(model=model, config=config)

    def state_parts() -> dict[str, int]:
        mem = opt.memory_report()
        return {"master_params": mem["master_params"], **mem["optimizer_states"]}

    return harness.Built(forward=lambda tokens: measure.lm_loss(engine, tokens), backward=engine.backward,
                         step=engine.step, zero_grad=lambda: None, state_parts=state_parts,
                         comm_stats=opt.comm_stats, note="memory_report(): master_params + optimizer_states")


def build(system: str, model: torch.nn.Module, cfg: bench_muon.Config) -> harness.Built:
    if system in DEEPSPEED_SYSTEMS:
        quiet_deepspeed()
    if system == "plugin-muon":
        return build_plugin(model, cfg.batch, cfg.ns_dtype)
    if system == "plugin-muon-auto":
        return build_plugin(model, cfg.batch, cfg.ns_dtype, ns_method="auto")
    if system == "shardopt-muon":
        return bench_muon.build_shardopt_muon(model, stage=2, ns_dtype=cfg.ns_dtype)
    if system in ("ds-muon-z1", "ds-muon-z2"):
        return bench_muon.build_deepspeed_muon(model, int(system[-1]), cfg.batch, cfg.ns_dtype)
    raise ValueError(system)


def worker(rank: int, world: int, system: str, cfg: bench_muon.Config, run_dir: str) -> None:
    # deepspeed=False: no deepspeed.init_distributed before build(); deepspeed.initialize attaches to gloo's group.
    harness.rank_main(rank, world, system, cfg, run_dir, build)


def run_once(system: str, world: int, cfg: bench_muon.Config) -> Run:
    return harness.run_ranks(worker, system, world, cfg, "bench_deepspeed_")


HEADER = ["system", "step ms (median)", "step ms (min)", "opt step ms", "wire MiB/rank/step", "state MiB/rank (max)",
          "step vs shardopt-muon", "eval loss"]


def table_rows(systems: Sequence[str], runs: dict[str, list[Run]]) -> list[list[str]]:
    median = report.median
    step = {s: median(median(r.step_times) for r in runs[s]) for s in systems}
    base = step.get("shardopt-muon")
    rows = []
    for s in systems:
        rows.append([
            s, f"{1e3 * step[s]:.1f}", f"{1e3 * min(median(r.step_times) for r in runs[s]):.1f}",
            f"{1e3 * median(median(r.phase_times('step')) for r in runs[s]):.1f}",
            report.mib(median(r.wire_per_rank_step for r in runs[s])),
            report.mib(median(r.state_bytes() for r in runs[s])),
            f"{step[s] / base:.2f}" if base else "-", f"{runs[s][0].eval_loss:.5f}",
        ])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = options.argument_parser(
        __doc__, SYSTEMS, timeout=900.0, batch_help="sequences per rank per step (default 1)",
        loss_tol_help="allowed |eval loss difference| between plugin-muon and shardopt-muon (default 1e-3)")
    parser.add_argument("--ns-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="Newton-Schulz dtype of shardopt; DeepSpeed takes its iteration that runs in it")
    args = options.parse_args(parser, argv, SYSTEMS)
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # DeepSpeed's Muon is torch.compile-decorated: eager everywhere
    systems, ds_version = options.prepare_run(args.threads, args.systems, DEEPSPEED_SYSTEMS)
    cfg = bench_muon.Config(**options.config_from(args), ns_dtype=args.ns_dtype)
    gpt_config = cfg.model_config()
    torch.manual_seed(args.seed)
    n_params = harness.num_params(harness.GPT(gpt_config))
    versions, data, described = options.setup_lines(ds_version, args.batch, gpt_config.seq_len, DESCRIPTIONS, systems)
    print(versions)
    print(f"model: harness.GPT(PRESETS[{args.preset!r}]) {gpt_config}, {n_params:,} fp32 parameters")
    print(data)
    print(f"method: fresh spawn of `world` gloo ranks per run, {args.threads} thread(s) each, {args.warmup} warm-up + "
          f"{args.steps} timed steps, {args.repeats} interleaved repeat(s) of [{', '.join(systems)}]; no clipping")
    print(described, flush=True)

    results = harness.run_all(systems, args.world_sizes, args.repeats, lambda s, w: run_once(s, w, cfg),
                              lambda run: f"step {1e3 * report.median(run.step_times):.1f} ms")
    mismatches = 0
    bullet = "- " if args.markdown else ""
    for world in args.world_sizes:
        runs = results[world]
        print(f"\n{'### ' if args.markdown else ''}World size {world}\n")
        print(report.format_table(HEADER, table_rows(systems, runs), args.markdown))
        print()
        checked = [s for s in SAME_MATH if s in systems]
        notes, bad = report.check_losses(world, checked, runs, args.loss_tol,
                                          [s for s in systems if s not in checked] if checked else ())
        mismatches += bad
        notes += report.comm_lines(world, systems, runs)
        for s in systems:
            parts = ", ".join(f"{k} {report.mib(v)}" for k, v in runs[s][0].largest_state_parts.items() if v)
            notes.append(f"world {world}: {s} state MiB on its largest rank: {parts}")
        for note in notes:
            print(f"{bullet}{note}")
    print("\nColumns: step = rank 0's forward + backward + optimizer step (DeepSpeed: engine.backward + "
          "engine.step; its Muon runs Newton-Schulz inside backward), median over timed steps, then median "
          "(and minimum) over repeats; opt step = the optimizer step alone; wire = lo tx bytes / world / steps; "
          "state = optimizer states + separate fp32 master copy, maximum over ranks.")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
