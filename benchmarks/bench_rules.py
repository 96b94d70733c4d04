"""Time one optimizer step of each shardopt rule against torch.optim, and Newton-Schulz variants.

Per rule and size (``--sizes``, default 1e6 and 1e7 fp32 parameters) four systems
get the same parameters and gradients (clones), are warmed up, and are then timed
in interleaved repeats (one repeat of each in turn, ``--repeats`` times), so slow
drift of a noisy machine hits all alike:

* shardopt with its default implementation (bitwise equal to torch's default);
* shardopt with ``fused=True`` where the rule has a torch fused kernel (Adam,
  AdamW, SGD, Adagrad; bitwise equal to torch's ``fused=True``);
* torch.optim's default (no ``foreach``/``fused`` argument: the for-loop on CPU);
* torch.optim's fastest: ``fused=True`` where it exists, else ``foreach=True``.

Reported: the median per-step time of each, the ratios shardopt default / torch
default and best shardopt / torch fastest (below 1: shardopt faster), whether the
parameters after the run are bitwise equal to torch's matching implementation,
and the achieved optimizer traffic of the best shardopt system in GB/s (bytes
every step must read and write: parameter, gradient and each state read, the
parameter and each state written; ``TRAFFIC``) as a fraction of a memory-bandwidth
probe run in the same process (``a += b`` over two tensors of ``--probe-mb`` MB:
read plus write bytes per second, the median of its repeats, interleaved with the
cases; :class:`BandwidthProbe`). At 1e6 parameters the step's data (20-36 MB)
partly stays in the last-level cache, so it may beat the probe. Lion has no
torch counterpart: only shardopt's numbers. Muon (2-D matrices only,
``--muon-numel``) is compared with torch.optim.Muon; it is compute-bound, so it
has no bandwidth column, and runs only with ``--only muon``.

``--ns`` times Newton-Schulz alone, standard against Gram (``ns_method``), per
shape and dtype, with the relative distance of the Gram result from the standard
fp32 one.

Usage, from the repository root::

    python benchmarks/bench_rules.py                          # 1e6 and 1e7 parameters
    python benchmarks/bench_rules.py --markdown --sizes 1e7 --only adam
    python benchmarks/bench_rules.py --ns                     # Newton-Schulz only
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
    """A rule: torch.optim's name (None: no counterpart), its arguments, whether torch
    has a fused kernel for it, and its bytes of optimizer traffic per fp32 element."""

    name: str
    optimizer: str
    kwargs: dict
    traffic: int | None
    torch_name: str | None = None
    fused: bool = False
    matrices_only: bool = False
    by_default: bool = True

    def ours(self, impl: str) -> MakeOptimizer:
        flags = {"fused": True} if impl == "fused" else {}
        return lambda p: getattr(shardopt, self.optimizer)(p, **self.kwargs, **flags)

    def torch(self, impl: str) -> MakeOptimizer:
        flags = {"default": {}, "fused": {"fused": True}, "foreach": {"foreach": True}}[impl]
        return lambda p: getattr(torch.optim, self.torch_name or "")(p, **self.kwargs, **flags)


def _bytes(reads: int, writes: int) -> int:
    return 4 * (reads + writes)


# TRAFFIC: parameter, gradient and states read; parameter and states written.
CASES: tuple[Case, ...] = (
    Case("SGD momentum", "SGD", dict(lr=1e-3, momentum=0.9), _bytes(3, 2), "SGD", fused=True),
    Case("SGD nesterov", "SGD", dict(lr=1e-3, momentum=0.9, nesterov=True), _bytes(3, 2), "SGD", fused=True),
    Case("Adagrad", "Adagrad", {}, _bytes(3, 2), "Adagrad", fused=True),
    Case("RMSprop", "RMSprop", {}, _bytes(3, 2), "RMSprop"),
    Case("RMSprop centered+momentum", "RMSprop", dict(centered=True, momentum=0.9), _bytes(5, 4), "RMSprop"),
    Case("Adam", "Adam", {}, _bytes(4, 3), "Adam", fused=True),
    Case("Adam amsgrad", "Adam", dict(amsgrad=True), _bytes(5, 4), "Adam", fused=True),
    Case("AdamW", "AdamW", {}, _bytes(4, 3), "AdamW", fused=True),
    Case("Lion", "Lion", {}, _bytes(3, 2)),
    # Compute-bound (Newton-Schulz; see --ns): only with --only muon.
    Case("Muon (2-D only)", "Muon", dict(lr=0.02), None, "Muon", matrices_only=True, by_default=False),
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


class BandwidthProbe:
    """Memory bandwidth of ``a += b`` over large tensors (STREAM's in-place add: two
    reads and one write per element, the write to a line just read, as an optimizer
    writes its states; a plain copy would also read every destination line before
    writing it, traffic it does not count)."""

    def __init__(self, megabytes: float) -> None:
        numel = int(megabytes * 2**20 / 4)
        self.src, self.dst = torch.randn(numel), torch.empty(numel)
        self.samples: list[float] = []

    def run(self, times: int = 3) -> None:
        for _ in range(times):
            start = time.perf_counter()
            self.dst.add_(self.src)
            self.samples.append(3 * self.src.nbytes / (time.perf_counter() - start))

    @property
    def bytes_per_s(self) -> float:
        return statistics.median(self.samples)


SYSTEMS = ("ours", "ours fused", "torch", "torch fastest")


@dataclass
class Result:
    case: Case
    numel: int
    times: dict[str, list[float]]
    fastest: str  # torch's fastest implementation: "fused" or "foreach"
    bitwise: str

    def median(self, system: str) -> float | None:
        return statistics.median(self.times[system]) if self.times.get(system) else None

    def best_ours(self) -> float:
        return min(t for t in (self.median("ours"), self.median("ours fused")) if t is not None)


def run_case(case: Case, shapes: Sequence[Shape], args: argparse.Namespace, probe: BandwidthProbe) -> Result:
    params, grad_sets = make_tensors(shapes, args.seed)
    runners: dict[str, Runner] = {"ours": Runner(case.ours("default"), params, grad_sets)}
    fastest = "fused" if case.fused else "foreach"
    if case.fused:
        runners["ours fused"] = Runner(case.ours("fused"), params, grad_sets)
    if case.torch_name is not None:
        runners["torch"] = Runner(case.torch("default"), params, grad_sets)
        if not case.matrices_only:
            runners["torch fastest"] = Runner(case.torch(fastest), params, grad_sets)
    del params, grad_sets
    for runner in runners.values():
        runner.run(args.warmup)
    times: dict[str, list[float]] = {name: [] for name in runners}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(args.repeats):
            for name, runner in runners.items():
                times[name].append(runner.run(args.steps))
            probe.run(1)
    finally:
        if gc_was_enabled:
            gc.enable()
    # Same inputs, same number of steps: the pairs that promise bitwise equality.
    checks = []
    for ours, theirs in (("ours", "torch"), ("ours fused", "torch fastest")):
        if ours in runners and theirs in runners:
            same = all(torch.equal(a, b) for a, b in zip(runners[ours].params, runners[theirs].params, strict=True))
            checks.append("yes" if same else "NO")
    return Result(case, numel_of(shapes), times, fastest, "/".join(checks) or "-")


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


HEADER = (
    "case", "numel", "shardopt ms", "shardopt fused ms", "torch default ms", "torch fastest ms",
    "default / torch default", "best / torch fastest", "bitwise", "GB/s (best)", "of probe",
)


def result_row(result: Result, probe: BandwidthProbe) -> tuple[str, ...]:
    ours, torch_default = result.median("ours"), result.median("torch")
    fastest = result.median("torch fastest")
    best = result.best_ours()
    speed, share = "-", "-"
    if result.case.traffic is not None:
        rate = result.case.traffic * result.numel / best
        speed, share = f"{rate / 1e9:.1f}", f"{rate / probe.bytes_per_s:.2f}"
    return (
        result.case.name, f"{result.numel:.0e}", ms(ours), ms(result.median("ours fused")), ms(torch_default),
        "-" if fastest is None else f"{ms(fastest)} ({result.fastest})",
        "-" if torch_default is None else f"{ours / torch_default:.2f}",  # type: ignore[operator]
        "-" if fastest is None else f"{best / fastest:.2f}",
        result.bitwise, speed, share,
    )


def format_table(header: Sequence[str], rows: list[tuple[str, ...]], markdown: bool) -> str:
    """Aligned plain text (first column left) or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    table = [tuple(header), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for index, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# Newton-Schulz shapes per dtype: bf16 matmuls without CPU bf16 instructions are
# about 50x slower than fp32 here, so bf16 runs smaller matrices.
NS_SHAPES = {
    torch.float32: ((512, 512), (512, 2048), (2048, 512), (768, 3072), (256, 1024)),
    torch.bfloat16: ((128, 128), (128, 512), (512, 128)),
}


def newton_schulz_rows(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """Standard against Gram Newton-Schulz (5 Jordan steps), interleaved, per shape and dtype."""
    from shardopt.rules.newton_schulz import JORDAN, orthogonalize, resolve_ns_method

    rows = []
    for dtype, shapes in NS_SHAPES.items():
        for shape in shapes:
            matrix = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
            times: dict[str, list[float]] = {"standard": [], "gram": []}
            outputs = {}
            for _ in range(args.repeats):
                for method in times:
                    start = time.perf_counter()
                    outputs[method] = orthogonalize(matrix, JORDAN, 5, dtype=dtype, method=method)
                    times[method].append(time.perf_counter() - start)
            reference = orthogonalize(matrix, JORDAN, 5, dtype=torch.float32).double()
            distance = float((outputs["gram"].double() - reference).norm() / reference.norm())
            own = float((outputs["standard"].double() - reference).norm() / reference.norm())
            standard, gram = statistics.median(times["standard"]), statistics.median(times["gram"])
            rows.append((f"{shape[0]}x{shape[1]}", str(dtype).removeprefix("torch."), ms(standard), ms(gram),
                         f"{gram / standard:.2f}", f"{distance:.1e}", f"{own:.1e}",
                         resolve_ns_method("auto", *shape, 5, dtype)))
            print(f"  newton-schulz {rows[-1][0]} {rows[-1][1]}: gram/standard {rows[-1][4]}",
                  file=sys.stderr, flush=True)
    return rows


NS_HEADER = ("shape", "dtype", "standard ms", "gram ms", "gram / standard",
             "gram vs fp32 standard (rel)", "standard vs fp32 standard (rel)", "auto picks")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e6,1e7",
                        help="comma-separated totals of fp32 parameter elements (default 1e6,1e7)")
    parser.add_argument("--muon-numel", type=float, default=3e6,
                        help="elements of the 2-D matrices Muon is timed on (default 3e6: one block)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument("--steps", type=int, default=10, help="steps per repeat (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--probe-mb", type=float, default=256.0,
                        help="MB per tensor of the memory-bandwidth probe (default 256)")
    parser.add_argument("--only", metavar="NAME", default=None,
                        help="run the cases whose name contains NAME (e.g. adam, muon)")
    parser.add_argument("--ns", action="store_true", help="time Newton-Schulz standard vs Gram only")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.sizes = [int(float(size)) for size in args.sizes.split(",") if size]
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0 or not args.sizes:
        parser.error("--repeats, --steps and --sizes must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    if args.ns:
        print(f"Newton-Schulz: 5 steps, Jordan coefficients; {args.repeats} interleaved repeats, medians\n")
        print(format_table(NS_HEADER, newton_schulz_rows(args), args.markdown))
        return
    cases = [c for c in CASES if (c.by_default if args.only is None else case_key(args.only) in case_key(c.name))]
    if not cases:
        raise SystemExit(f"--only {args.only!r} matches no case; cases: "
                         + ", ".join(c.name for c in CASES))
    print(f"parameters: blocks of d_model={D_MODEL} (512x512, 2048x512, 512x2048 matrices + 1-D vectors), "
          f"fp32, totals {', '.join(f'{size:.0e}' for size in args.sizes)}")
    if any(c.matrices_only for c in cases):
        matrices = muon_shapes(model_shapes(int(args.muon_numel)), int(args.muon_numel))
        print(f"Muon: 2-D matrices only, {numel_of(matrices):,} elements at every size (--muon-numel)")
    print(f"timing: {args.warmup} warm-up steps, then {args.repeats} interleaved repeats of {args.steps} "
          "steps; per-step medians; ratios < 1: shardopt faster; bitwise: shardopt default vs torch "
          "default / shardopt fused vs torch fused")
    probe = BandwidthProbe(args.probe_mb)
    probe.run(5)
    rows = []
    for size in args.sizes:
        shapes = model_shapes(size)
        for case in cases:
            case_shapes = (muon_shapes(model_shapes(int(args.muon_numel)), int(args.muon_numel))
                           if case.matrices_only else shapes)
            if case.matrices_only and size != args.sizes[0]:
                continue  # the same matrices at every size: once is enough
            result = run_case(case, case_shapes, args, probe)
            rows.append(result_row(result, probe))
            print(f"  {case.name} {size:.0e}: best / torch fastest {rows[-1][7]}", file=sys.stderr, flush=True)
    print(f"memory-bandwidth probe: a += b over {args.probe_mb:.0f} MB tensors, median "
          f"{probe.bytes_per_s / 1e9:.1f} GB/s (read + write) over {len(probe.samples)} runs interleaved "
          "with the cases\n")
    print(format_table(HEADER, rows, args.markdown))


if __name__ == "__main__":
    main()
