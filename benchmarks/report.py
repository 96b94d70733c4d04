"""Tables and checks the benchmarks print."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness import Run
import statistics
from collections.abc import Iterable, Mapping, Sequence

# ---------------------------------------------------------------------- reporting


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def format_table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    """Aligned plain text (first column left, others right), or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for index, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_losses(world: int, checked: Sequence[str], runs: Mapping[str, list[Run]], tol: float,
                 others: Sequence[str] = ()) -> tuple[list[str], int]:
    """Eval losses of ``checked`` within ``tol`` of the first's: ``(notes, mismatches)``; ``others`` only reported."""
    if not checked:
        return [], 0
    base_system = checked[0]
    base = runs[base_system][0].eval_loss
    notes, mismatches, worst = [], 0, 0.0
    for system in checked:
        for run in runs[system]:
            diff = abs(run.eval_loss - base)
            worst = max(worst, diff)
            if diff > tol:
                mismatches += 1
                notes.append(f"world {world}: {system} eval loss {run.eval_loss:.6f} differs from "
                             f"{base_system}'s {base:.6f} by {diff:.2e} > {tol:.0e}")
    status = "MISMATCH" if mismatches else "ok"
    notes.insert(0, f"world {world}: eval losses of {', '.join(checked)} agree with {base_system}'s {base:.6f} "
                    f"to within {worst:.2e} (tolerance {tol:.0e}): {status}")
    if others:
        notes.append(f"world {world}: not checked (different math or precision), eval loss - {base_system}'s: "
                     + ", ".join(f"{s} {runs[s][0].eval_loss - base:+.2e}" for s in others))
    return notes, mismatches


def comm_lines(world: int, systems: Sequence[str], runs: Mapping[str, list[Run]]) -> list[str]:
    """One line per system with ``comm_stats()``: bytes per step by kind (first repeat, mean over ranks)."""
    lines = []
    for system in systems:
        comm = runs[system][0].comm_per_rank_step
        if comm is not None:
            detail = ", ".join(f"{k} {mib(v)}" for k, v in comm.items() if v)
            lines.append(f"world {world}: {system} comm_stats() MiB/rank/step: {detail or 'none'}")
    return lines
