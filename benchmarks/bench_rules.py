"""Time one optimizer step of each shardopt rule against its torch.optim counterpart.

Both sides get the same parameters and gradients (clones), are warmed up, and are
then timed in interleaved repeats (ours, reference, ours, reference, ...), so slow
drift of a noisy machine hits both alike. Per system the script reports the median
and the minimum over repeats of the per-step time (a repeat is ``--steps`` steps),
and the ratio of the medians, shardopt / reference: below 1 means shardopt is faster.

The reference is torch.optim's *default* implementation: the optimizer is built
without a ``foreach``/``fused`` argument, which on CPU means torch's single-tensor
(per-parameter loop) path. Lion has no torch counterpart, so it is compared with
shardopt's own AdamW. Muon is timed on the 2-D matrices only (as torch.optim.Muon
accepts nothing else), on a smaller set than ``--numel`` by default because
Newton-Schulz is slow on CPU (``--muon-numel``).

Usage, from the repository root::

    python benchmarks/bench_rules.py                    # defaults: ~4e6 parameters
    python benchmarks/bench_rules.py --markdown --numel 1e7 --only adam
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import shardopt

Shape = tuple[int, ...]
MakeOptimizer = Callable[[list[Tensor]], torch.optim.Optimizer]

# One transformer block at d_model=512 (nn.Linear weights are (out, in)): layer
# norms, attention projections with biases, and a 4x MLP. About 3.15e6 elements.
D_MODEL = 512
BLOCK_SHAPES: tuple[Shape, ...] = (
    (D_MODEL,), (D_MODEL,),                              # ln_1 weight, bias
    (D_MODEL, D_MODEL), (D_MODEL,),                      # q
    (D_MODEL, D_MODEL), (D_MODEL,),                      # k
    (D_MODEL, D_MODEL), (D_MODEL,),                      # v
    (D_MODEL, D_MODEL), (D_MODEL,),                      # attention output
    (D_MODEL,), (D_MODEL,),                              # ln_2 weight, bias
    (4 * D_MODEL, D_MODEL), (4 * D_MODEL,),              # mlp up
    (D_MODEL, 4 * D_MODEL), (D_MODEL,),                  # mlp down
)


def numel_of(shapes: Sequence[Shape]) -> int:
    return sum(int(torch.Size(shape).numel()) for shape in shapes)


def model_shapes(numel: int) -> list[Shape]:
    """Shapes of whole blocks, then of the next block's leading tensors, up to >= numel."""
    shapes: list[Shape] = []
    while numel_of(shapes) < numel:
        shapes.append(BLOCK_SHAPES[len(shapes) % len(BLOCK_SHAPES)])
    return shapes


def muon_shapes(shapes: Sequence[Shape], numel: int) -> list[Shape]:
    """The 2-D shapes of ``shapes``, in order, until they hold >= numel elements."""
    chosen: list[Shape] = []
    for shape in shapes:
        if len(shape) == 2 and numel_of(chosen) < numel:
            chosen.append(shape)
    return chosen


@dataclass(frozen=True)
class Case:
    name: str
    ours: MakeOptimizer
    reference: MakeOptimizer
    reference_label: str = "torch"
    matrices_only: bool = False


CASES: tuple[Case, ...] = (
    Case("SGD momentum",
         lambda p: shardopt.SGD(p, lr=1e-3, momentum=0.9),
         lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)),
    Case("SGD nesterov",
         lambda p: shardopt.SGD(p, lr=1e-3, momentum=0.9, nesterov=True),
         lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, nesterov=True)),
    Case("Adagrad",
         lambda p: shardopt.Adagrad(p),
         lambda p: torch.optim.Adagrad(p)),
    Case("RMSprop",
         lambda p: shardopt.RMSprop(p),
         lambda p: torch.optim.RMSprop(p)),
    Case("RMSprop centered+momentum",
         lambda p: shardopt.RMSprop(p, centered=True, momentum=0.9),
         lambda p: torch.optim.RMSprop(p, centered=True, momentum=0.9)),
    Case("Adam",
         lambda p: shardopt.Adam(p),
         lambda p: torch.optim.Adam(p)),
    Case("Adam amsgrad",
         lambda p: shardopt.Adam(p, amsgrad=True),
         lambda p: torch.optim.Adam(p, amsgrad=True)),
    Case("AdamW",
         lambda p: shardopt.AdamW(p),
         lambda p: torch.optim.AdamW(p)),
    Case("Muon (2-D only)",
         lambda p: shardopt.Muon(p, lr=0.02),
         lambda p: torch.optim.Muon(p, lr=0.02),
         matrices_only=True),
    Case("Lion",
         lambda p: shardopt.Lion(p),
         lambda p: shardopt.AdamW(p),
         reference_label="shardopt AdamW"),
)


def case_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def make_tensors(shapes: Sequence[Shape], seed: int) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Parameters and two sets of gradients (steps alternate between them)."""
    gen = torch.Generator().manual_seed(seed)
    params = [0.02 * torch.randn(shape, generator=gen) for shape in shapes]
    grad_sets = [[1e-3 * torch.randn(shape, generator=gen) for shape in shapes] for _ in range(2)]
    return params, grad_sets


class Runner:
    """One optimizer over its own clone of the parameters and gradients."""

    def __init__(
        self, make: MakeOptimizer, params: list[Tensor], grad_sets: list[list[Tensor]]
    ) -> None:
        self.params = [p.clone() for p in params]
        self.grad_sets = [[g.clone() for g in grads] for grads in grad_sets]
        self.optimizer = make(self.params)
        self.count = 0

    def run(self, steps: int) -> float:
        """Run ``steps`` steps; return the wall time per step in seconds."""
        params, grad_sets, optimizer = self.params, self.grad_sets, self.optimizer
        start = time.perf_counter()
        for _ in range(steps):
            for param, grad in zip(params, grad_sets[self.count % 2], strict=True):
                param.grad = grad
            optimizer.step()
            self.count += 1
        return (time.perf_counter() - start) / steps


@dataclass
class Result:
    case: Case
    numel: int
    ours: list[float]
    reference: list[float]
    max_diff: float | None

    @property
    def ratio(self) -> float:
        return statistics.median(self.ours) / statistics.median(self.reference)


def run_case(case: Case, shapes: Sequence[Shape], args: argparse.Namespace) -> Result:
    params, grad_sets = make_tensors(shapes, args.seed)
    ours = Runner(case.ours, params, grad_sets)
    reference = Runner(case.reference, params, grad_sets)
    del params, grad_sets
    for runner in (ours, reference):
        runner.run(args.warmup)
    ours_times: list[float] = []
    reference_times: list[float] = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(args.repeats):
            ours_times.append(ours.run(args.steps))
            reference_times.append(reference.run(args.steps))
    finally:
        if gc_was_enabled:
            gc.enable()
    max_diff = None
    if case.reference_label == "torch":
        # Same inputs, same number of steps: shows both sides did the same math.
        pairs = zip(ours.params, reference.params, strict=True)
        max_diff = max(float((a - b).abs().max()) for a, b in pairs)
    return Result(case, numel_of(shapes), ours_times, reference_times, max_diff)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


HEADER = (
    "case", "numel", "vs", "shardopt median ms", "shardopt min ms",
    "ref median ms", "ref min ms", "ratio (median)", "max abs dparam",
)


def result_row(result: Result) -> tuple[str, ...]:
    diff = "-" if result.max_diff is None else f"{result.max_diff:.1e}"
    return (
        result.case.name, f"{result.numel:,}", result.case.reference_label,
        ms(statistics.median(result.ours)), ms(min(result.ours)),
        ms(statistics.median(result.reference)), ms(min(result.reference)),
        f"{result.ratio:.2f}", diff,
    )


def format_plain(rows: list[tuple[str, ...]]) -> str:
    table = [HEADER, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = []
    for index, row in enumerate(table):
        cells = [cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in
                 enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(HEADER) - 3)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=float, default=4e6,
                        help="total fp32 parameter elements (default 4e6)")
    parser.add_argument("--muon-numel", type=float, default=3e6,
                        help="elements of the 2-D matrices Muon is timed on (default 3e6: one block)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument("--steps", type=int, default=10, help="steps per repeat (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--only", metavar="NAME", default=None,
                        help="run the cases whose name contains NAME (e.g. adam, muon)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--repeats and --steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    shapes = model_shapes(int(args.numel))
    matrices = muon_shapes(shapes, int(args.muon_numel))
    cases = [c for c in CASES if args.only is None or case_key(args.only) in case_key(c.name)]
    if not cases:
        raise SystemExit(f"--only {args.only!r} matches no case; cases: "
                         + ", ".join(c.name for c in CASES))

    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    print(f"parameters: {numel_of(shapes):,} fp32 elements in {len(shapes)} tensors "
          f"(blocks of d_model={D_MODEL}: 512x512, 2048x512, 512x2048 matrices + 1-D vectors)")
    if any(c.matrices_only for c in cases):
        counts = {shape: matrices.count(shape) for shape in dict.fromkeys(matrices)}
        listing = ", ".join(f"{n}x {height}x{width}" for (height, width), n in counts.items())
        smaller = numel_of(matrices) < numel_of([s for s in shapes if len(s) == 2])
        note = " (a smaller set: Newton-Schulz is slow on CPU)" if smaller else ""
        print(f"Muon: 2-D matrices only{note}: {numel_of(matrices):,} elements ({listing}); "
              "--muon-numel to change")
    print("reference: torch.optim default implementation (no foreach/fused argument); "
          "Lion vs shardopt AdamW (no torch counterpart)")
    print(f"timing: {args.warmup} warm-up steps, then {args.repeats} interleaved repeats of "
          f"{args.steps} steps; per-step median and min over repeats; "
          "ratio = shardopt median / reference median (< 1: shardopt faster)")
    print(flush=True)

    rows = []
    for case in cases:
        result = run_case(case, matrices if case.matrices_only else shapes, args)
        rows.append(result_row(result))
        print(f"  {case.name}: ratio {result.ratio:.2f}", file=sys.stderr, flush=True)
    print(format_markdown(rows) if args.markdown else format_plain(rows))


if __name__ == "__main__":
    main()
