"""``shardopt plan``: per-GPU memory of a training configuration, from the planner.

A thin command line over :func:`shardopt.report.estimate` (``main(argv=None)``
so tests call it, as ``torch/distributed/run.py`` does). One configuration
prints a table with each row's formula source; comma lists
(``--optimizer adamw,muon --zero-stage 0,1,2,3 --dp 8,64``) print one line per
combination; ``--search`` finds the smallest data-parallel size per ZeRO stage
that fits ``--gpu``; ``--plot`` draws memory against data-parallel size.

Example::

    shardopt plan --model llama2-70b --optimizer muon --zero-stage 2 --dp 64 --gpu h100-80gb
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from ..zero.plan import DEFAULT_BUCKET_NUMEL
from ..zero.policy import MAX_IN_FLIGHT, shards_gradients
from . import accounting, report
from .presets import PRESETS

# Inputs beyond these are no model anyone trains; bounding them keeps every number
# the planner prints a finite float (Python's int -> float overflows near 1e308).
MAX_INT = 1 << 48
MAX_PARAMS = 10**18

CATEGORIES = ("params", "grads", "master_params", "optimizer_states", "activations", "buffers")
GB, GIB = 1e9, float(1 << 30)


def _count(text: str) -> int:
    """``7.5e9``, ``7_500_000_000`` or ``7,500,000,000`` -> 7500000000.

    Parsed exactly (``Fraction``, not ``float``): ``inf``/``nan`` and ``1e15 + 0.5``
    are refused, and ``123456789012345678`` is not rounded.
    """
    clean = text.replace("_", "").replace(",", "").strip()
    try:
        value = Fraction(clean)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a count such as 7.5e9, got {text!r}") from None
    if value.denominator != 1 or not 1 <= value <= MAX_PARAMS:
        raise argparse.ArgumentTypeError(f"expected a whole count in [1, 1e18], got {text!r}")
    return int(value)


def _list(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [convert(item.strip()) for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a value or a comma list of values, got {text!r}")
        return items

    return parse


def _choice(kind: str, choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {kind} {text!r} (choose from {', '.join(choices)})")
        return text

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if not 1 <= value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"expected an int in [1, 2**48], got {text!r}")
    return value


def _stage(text: str) -> int:
    if text not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"unknown ZeRO stage {text!r} (choose from 0, 1, 2, 3)")
    return int(text)


def _gpu(text: str) -> str | int:
    if text.isdigit():
        if int(text) > MAX_INT << 16:
            raise argparse.ArgumentTypeError(f"expected a GPU's bytes below 2**64, got {text!r}")
        return int(text)
    return _choice("gpu", [*report.GPUS, "BYTES"])(text)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where help is, not the whole usage."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardopt", description="shardopt command line tools")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "plan", help="per-GPU memory of a training configuration",
        description="Per-GPU bytes of training a model with ZeRO, from the same shard plan and optimizer state "
                    "declarations ZeroOptimizer uses. Comma lists in --optimizer/--zero-stage/--dp print one line "
                    "per combination. Formulas and assumptions: docs/planner.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face config.json")
    source.add_argument("--params", type=_count, help="a bare parameter count, e.g. 7.5e9 (no activations)")
    p.add_argument("--optimizer", type=_list(_choice("optimizer", list(accounting.OPTIMIZERS))), default=["adamw"],
                   help=f"one of {', '.join(accounting.OPTIMIZERS)} (comma list: one line each)")
    p.add_argument("--precision", type=_choice("precision", list(accounting.PRECISIONS)), default="mixed",
                   help="fp32 | bf16 (states too) | mixed (bf16 params and grads, fp32 master and states)")
    p.add_argument("--zero-stage", type=_list(_stage), default=[2], help="0, 1, 2 or 3 (comma list)")
    p.add_argument("--dp", type=_list(_positive), default=[1], help="data-parallel size (comma list)")
    p.add_argument("--tp", type=_positive, default=1, help="tensor-parallel size (Megatron splits)")
    p.add_argument("--pp", type=_positive, default=1, help="pipeline-parallel size (1F1B schedule)")
    p.add_argument("--seq-len", type=_positive, default=4096, help="tokens per sequence (activations)")
    p.add_argument("--micro-batch", type=_positive, default=1, help="sequences per micro-batch (activations)")
    p.add_argument("--recompute", type=_choice("recompute", ["none", "selective", "full"]), default="selective",
                   help="activation recomputation (selective = what flash attention stores)")
    p.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (needs --tp)")
    p.add_argument("--gpu", type=_gpu, default="h100-80gb", help=f"{' | '.join(report.GPUS)} | BYTES")
    p.add_argument("--bucket-numel", type=_positive, default=DEFAULT_BUCKET_NUMEL,
                   help="ZeroOptimizer(bucket_numel=...)")
    p.add_argument("--matrix-layout", type=_choice("matrix_layout", ["balanced", "whole"]), default="balanced",
                   help="ZeroOptimizer(matrix_layout=...) for Muon: balanced (equal state per rank, a few "
                   "matrices exchanged for Newton-Schulz) or whole (no exchange, padded to the busiest rank)")
    p.add_argument("--backend", type=_choice("backend", ["nccl", "gloo"]), default="nccl",
                   help="the process group's backend, for the collectives' staging buffers")
    p.add_argument("--search", action="store_true",
                   help="smallest data-parallel size per ZeRO stage that fits --gpu, and the choice")
    p.add_argument("--max-dp", type=_positive, default=report.MAX_DP,
                   help=f"largest data-parallel size for --search/--plot (at most {report.MAX_DP})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE.png", help="plot per-rank memory against dp for stages 0-3")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 and one line on stderr for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return _plan(args)
    except ValueError as err:
        print(f"shardopt plan: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `shardopt plan ... --json | head`: the reader has what it wanted. Point stdout at
        # devnull so the interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE").
        # A stdout that is not a file (a test's capture) has no closed pipe to flush to.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _estimate(args: argparse.Namespace, optimizer: str, stage: int, dp: int) -> report.MemoryReport:
    return report.estimate(
        args.model if args.params is None else args.params, optimizer=optimizer, precision=args.precision,
        zero_stage=stage, dp=dp, tp=args.tp, pp=args.pp, seq_len=args.seq_len, micro_batch=args.micro_batch,
        recompute=args.recompute, sequence_parallel=args.sequence_parallel, gpu=args.gpu,
        bucket_numel=args.bucket_numel, matrix_layout=args.matrix_layout, backend=args.backend,
    )


def _plan(args: argparse.Namespace) -> int:
    if args.sequence_parallel and args.tp == 1:
        raise ValueError("Invalid sequence_parallel: it splits activations across --tp ranks; give --tp > 1")
    if (args.search or args.plot) and len(args.optimizer) > 1:
        raise ValueError("Invalid optimizer: --search and --plot take one optimizer")
    if args.max_dp > report.MAX_DP:
        raise ValueError(f"Invalid max_dp: {args.max_dp:,} (the planner plans up to {report.MAX_DP:,} "
                         "data-parallel ranks)")
    if args.plot:
        _check_writable(args.plot)
    if args.plot:
        _plot(args, args.plot)
    if args.search:
        return _search(args)
    reports = [_estimate(args, o, s, d) for o in args.optimizer for s in args.zero_stage for d in args.dp]
    if args.json:
        print(json.dumps(reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports], indent=2))
    elif len(reports) == 1:
        print(render(reports[0]))
    else:
        print(render_sweep(reports))
    return 0


# ------------------------------------------------------------------ tables


def _size(nbytes: int) -> str:
    return f"{nbytes / GB:10.2f} {nbytes / GIB:10.2f}"


def _sources(r: report.MemoryReport) -> dict[str, str]:
    p = r.precision
    p_item, r_item = accounting.itemsize(p.param), accounting.itemsize(p.reduce)
    sharded = shards_gradients(r.zero_stage, r.plan_world_size)
    fsdp = r.zero_stage == 3
    where = ("FSDP2 dim-0 shards, padded to ceil(d0/dp) rows, in the master dtype" if fsdp
             else "every bucket, padding included")
    grads = "this rank's gradient region" if sharded else "whole flat gradient, all-reduced in place"
    rules = "; ".join(f"{rule}: {', '.join(names) or 'no state'}" for rule, names in r.settings["specs"].items())
    s = r.settings
    acts = (f"Korthikanti et al. 2022 Table 2, recompute={s['recompute']}, s={s['seq_len']} b={s['micro_batch']} "
            f"t={r.tp}{' SP' if s['sequence_parallel'] else ''}; {r.pp - r.pipeline_stage} micro-batch(es) in "
            "flight (1F1B); shardopt.planner.activations") if r.activations else "not modelled (no architecture)"
    if fsdp:
        w_item = accounting.itemsize(p.wide)
        params = f"{r.rank.params // w_item:,} el x {w_item} B: {where} (FSDP2 _init_sharded_param)"
        grads = (f"{r.rank.grads // w_item:,} el x {w_item} B: each group's reduce-scatter output, cast to the "
                 "shards' dtype (FSDP2 foreach_reduce)")
    else:
        params = f"{r.rank.params // p_item:,} el x {p_item} B {p.param}: {where} (ZeRO sec. 5)"
        grads = f"{r.rank.grads // r_item:,} el x {r_item} B {p.reduce}: {grads} (ZeRO sec. 5.2)"
    buffers = ("transients: FSDP2's unsharded params, all-gather and reduce-scatter buffers, unsharded grads, "
               "each its own peak (shardopt.planner.fsdp); Muon temporaries" if fsdp else
               "transients: the buffer pool's ledger replayed on the stage-2 reduction schedule and the backward "
               f"order (zero/schedule.py, zero/pool.py; MAX_IN_FLIGHT = {MAX_IN_FLIGHT} reduction in flight), "
               "staging of the backend's collectives, step()'s grad cast, "
               "Muon temporaries")
    return {
        "params": params,
        "grads": grads,
        "master_params": ("fp32 copy of this rank's region (ZeRO sec. 3, mixed precision)" if r.rank.master_params
                          else "the FSDP2 shards are the master copy: 0 B" if fsdp
                          else "aliases the parameter region: 0 B"),
        "optimizer_states": (f"state_specs() over this rank's unpadded shards, step per tensor: {rules}" if fsdp
                             else f"state_specs() over this rank's used region: {rules} (ZeRO sec. 5.1)"),
        "activations": acts,
        "buffers": buffers,
    }


def render(r: report.MemoryReport) -> str:
    """The default table: one row per category (and its parts), GB and GiB, and the source."""
    header = (f"shardopt plan: {r.model}, {r.optimizer}, {r.precision.name} precision, ZeRO-{r.zero_stage}, "
              f"dp={r.dp} x tp={r.tp} x pp={r.pp} = {r.dp * r.tp * r.pp} GPUs")
    lines = [
        header,
        f"  {r.total_params:,} parameters ({r.matrix_params:,} in hidden matrices); one rank's tp/pp share: "
        f"{r.stage_params:,}",
        f"  busiest: data-parallel rank {r.rank.rank} of pipeline stage {r.pipeline_stage}; " + (
            f"FSDP2: {r.fsdp_groups:,} fully_shard groups (units and the root) over {r.dp} rank(s)"
            if r.zero_stage == 3 else
            f"plan: {r.num_buckets:,} buckets over {r.plan_world_size} rank(s), the largest "
            f"{r.largest_bucket_numel:,} elements with padding (bucket_numel={r.settings['bucket_numel']:,}: a "
            "larger parameter, or Muon's matrices below ZeRO-2, is one bucket)"),
        "",
        f"  {'category':<24}{'GB':>10} {'GiB':>10}  formula (source)",
    ]
    sources = _sources(r)
    parts = {"optimizer_states": r.rank.optimizer_states, "activations": r.activations, "buffers": r.rank.buffers}
    for category, nbytes in r.per_rank_bytes().items():
        if category == "total":
            continue
        lines.append(f"  {category:<24}{_size(nbytes)}  {sources[category]}")
        for name, part in parts.get(category, {}).items():
            lines.append(f"    {name:<22}{_size(part)}")
    lines.append(f"  {'total':<24}{_size(r.total)}")
    verdict = "fits" if r.fits else "does NOT fit"
    lines.append(f"  {r.gpu:<24}{_size(r.gpu_bytes)}  {verdict}: headroom {r.headroom_bytes / GB:.2f} GB "
                 f"({r.headroom_bytes / GIB:.2f} GiB)")
    lines += [f"  note: {note}" for note in r.notes]
    return "\n".join(lines)


def render_sweep(reports: Sequence[report.MemoryReport]) -> str:
    """One line per configuration, per-rank GB by category."""
    r0 = reports[0]
    cols = ("params", "grads", "master", "states", "activ.", "buffers", "total")
    lines = [
        f"shardopt plan: {r0.model} ({r0.total_params:,} parameters), {r0.precision.name} precision, "
        f"tp={r0.tp} pp={r0.pp}, {r0.settings['recompute']} recompute s={r0.settings['seq_len']} "
        f"b={r0.settings['micro_batch']}; per-GPU GB (1e9 B) of the busiest rank; {r0.gpu}",
        f"  {'optimizer':<10}{'ZeRO':>5}{'dp':>6}" + "".join(f"{c:>10}" for c in cols) + "  fits",
    ]
    for r in reports:
        values = list(r.per_rank_bytes().values())
        lines.append(f"  {r.optimizer:<10}{r.zero_stage:>5}{r.dp:>6}" + "".join(f"{v / GB:10.2f}" for v in values)
                     + ("  yes" if r.fits else "  no"))
    # Each note names its configuration (ZeRO stage, dp) where it depends on it.
    notes = dict.fromkeys(n for r in reports for n in r.notes)
    return "\n".join(lines + [f"  note: {n}" for n in notes])


# ------------------------------------------------------------------ search and plot


def _powers(limit: int) -> list[int]:
    return [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]


def search(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per stage: the smallest dp <= --max-dp that fits, found over powers of two, then bisected.

    Bisection assumes per-rank memory does not grow with dp between the last
    power of two that does not fit and the first that does.
    """
    found = []
    for stage in accounting.STAGES:
        fit = None
        below = 0
        for dp in _powers(args.max_dp):
            report = _estimate(args, args.optimizer[0], stage, dp)
            if report.fits:
                fit = report
                break
            below = dp
        while fit is not None and fit.dp - below > 1:
            middle = (below + fit.dp) // 2
            report = _estimate(args, args.optimizer[0], stage, middle)
            below, fit = (below, report) if report.fits else (middle, fit)
        found.append({"zero_stage": stage, "dp": fit.dp if fit else None, "report": fit})
    return found


def _search(args: argparse.Namespace) -> int:
    found = search(args)
    fitting = [f for f in found if f["dp"] is not None]
    choice = min(fitting, key=lambda f: (f["dp"], f["zero_stage"])) if fitting else None
    if args.json:
        print(json.dumps({
            "search": [{"zero_stage": f["zero_stage"], "dp": f["dp"],
                        "report": f["report"].to_json() if f["report"] else None} for f in found],
            "choice": {"zero_stage": choice["zero_stage"], "dp": choice["dp"]} if choice else None,
        }, indent=2))
        return 0
    first = _estimate(args, args.optimizer[0], 0, 1)
    lines = [f"shardopt plan --search: {first.model}, {args.optimizer[0]}, {args.precision} precision, "
             f"tp={args.tp} pp={args.pp}, {first.gpu} ({first.gpu_bytes / GB:.2f} GB), dp <= {args.max_dp}",
             f"  {'ZeRO':>4}{'smallest dp':>13}{'GPUs':>8}{'per-GPU GB':>12}{'headroom GB':>13}"]
    for f in found:
        r = f["report"]
        if r is None:
            lines.append(f"  {f['zero_stage']:>4}{'none':>13}")
        else:
            lines.append(f"  {r.zero_stage:>4}{r.dp:>13}{r.dp * r.tp * r.pp:>8}{r.total / GB:>12.2f}"
                         f"{r.headroom_bytes / GB:>13.2f}")
    lines.append(f"  choice: ZeRO-{choice['zero_stage']} at dp={choice['dp']} (fewest GPUs, then lowest stage)"
                 if choice else "  choice: nothing fits; add --tp/--pp, --recompute full or a larger --gpu")
    print("\n".join(lines))
    return 0


def _check_writable(path: str) -> None:
    """Refuse an unwritable --plot path before planning, not after (a traceback from savefig)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"Invalid plot: {path!r} is a directory (expected FILE.png)")
    if not os.path.isdir(folder):
        raise ValueError(f"Invalid plot: {path!r}: folder {os.path.dirname(path) or folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"Invalid plot: {path!r}: folder {os.path.dirname(path) or folder!r} is not writable")


def _plot(args: argparse.Namespace, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("Invalid plot: --plot needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dps = _powers(args.max_dp)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colors = dict(zip(CATEGORIES, ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#b07aa1")))
    gpu_bytes = 0
    for stage, ax in zip(accounting.STAGES, axes.flat):
        reports = [_estimate(args, args.optimizer[0], stage, dp) for dp in dps]
        gpu_bytes = reports[0].gpu_bytes
        bottom = [0.0] * len(dps)
        for category in CATEGORIES:
            heights = [r.per_rank_bytes()[category] / GB for r in reports]
            ax.bar(range(len(dps)), heights, bottom=bottom, color=colors[category], label=category)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.axhline(gpu_bytes / GB, color="black", linestyle="--", linewidth=1, label=f"{reports[0].gpu}")
        ax.set_xticks(range(len(dps)), [str(d) for d in dps], rotation=45)
        ax.set_title(f"ZeRO-{stage}")
        ax.set_xlabel("data-parallel size")
        ax.set_ylabel("GB per GPU (busiest rank)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    r0 = reports[0]
    fig.suptitle(f"{r0.model}: {r0.optimizer}, {r0.precision.name} precision, tp={r0.tp} pp={r0.pp}, "
                 f"recompute={r0.settings['recompute']} s={r0.settings['seq_len']} (shardopt plan)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    try:
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as err:  # e.g. an extension matplotlib cannot write
        raise ValueError(f"Invalid plot: cannot write {path!r} ({err})") from None
    finally:
        plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
