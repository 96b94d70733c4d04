"""The record_function ranges shardopt emits, and their totals per step from a torch.profiler trace."""

from __future__ import annotations

import bisect
import contextlib
import inspect
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function

# The record_function ranges shardopt emits (one per call of what they name).
GRAD_COPY = "shardopt.grad_copy"  # a gradient copied into its bucket (backward hook)
REDUCE_LAUNCH = "shardopt.reduce_launch"  # issuing one reduction
REDUCE_COMPLETE = "shardopt.reduce_complete"  # waiting for one reduction and finishing it
REDUCE_WAIT = "shardopt.reduce_wait"  # waiting for all reductions at the start of step()
GRAD_NORM = "shardopt.grad_norm"  # the global gradient norm and finite check (one small all-reduce)
CLIP = "shardopt.clip"  # scaling the gradients when the clip acts
UPDATE = "shardopt.update"  # the update rules plus master write-back
ALL_GATHER = "shardopt.all_gather"  # parameter all-gathers
GATHER_WAIT = "shardopt.gather_wait"  # overlap_gather: waiting for them before a module's forward
MATRIX_TRANSFORM = "shardopt.matrix_transform"  # Newton-Schulz in ZeroOptimizer's Muon step
MATRIX_EXCHANGE = "shardopt.matrix_exchange"  # the straddling matrices' all-to-alls

# The parts of a training step, each timed and (when profiling) marked "bench.<phase>".
PHASES = ("forward", "backward", "step", "zero_grad")
PHASE_PREFIX = "bench."
DURATION = "duration"  # key of a phase's whole time in step_ranges()
OTHER = "other"  # key of its time outside every named range


# ---------------------------------------------------------------------- profiler ranges


def python_event(function: Callable[..., Any]) -> str:
    """The name torch.profiler's Python tracer gives calls of ``function`` (decorators unwrapped)."""
    code = inspect.unwrap(function).__code__
    return f"{code.co_filename}({code.co_firstlineno}): {code.co_name}"


class StepProfiler:
    """``torch.profiler`` (CPU activity) over the timed steps, or nothing when no range is asked for."""

    def __init__(self, names: Collection[str], traced: Mapping[str, str]) -> None:
        self.names = set(names)
        self.traced = dict(traced)
        self.enabled = bool(self.names)
        self._profile: Any = None

    def __enter__(self) -> StepProfiler:
        if self.enabled:
            # The Python tracer only where a function without a range is to be timed.
            self._profile = profile(activities=[ProfilerActivity.CPU], with_stack=bool(self.traced))
            self._profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._profile is not None:
            self._profile.__exit__(*exc)

    def phase(self, name: str) -> contextlib.AbstractContextManager[Any]:
        return record_function(PHASE_PREFIX + name) if self.enabled else contextlib.nullcontext()

    def ranges(self) -> list[dict[str, dict[str, float]]] | None:
        if self._profile is None:
            return None
        return step_ranges(self._profile.events(), PHASES, self.names, self.traced)


def step_ranges(events: Iterable[Any], phases: Sequence[str], names: Collection[str],
                aliases: Mapping[str, str]) -> list[dict[str, dict[str, float]]]:
    """Per step, per phase: seconds in each named range, nested named ranges excluded.

    ``events`` are torch.profiler FunctionEvents; the k-th ``bench.<phase>``
    range is phase ``phase`` of step k. A named range (or an event renamed by
    ``aliases``) counts for the phase its start falls in; its time excludes the
    named ranges nested in it on its thread. Each phase also gets ``DURATION``
    (its whole time) and ``OTHER`` (its time outside every named range).
    """
    phase_names = {PHASE_PREFIX + p for p in phases}
    intervals: set[tuple[int, float, float, str]] = set()  # (thread, start, end, name); a set drops duplicates
    for event in events:
        name = event.name if event.name in names or event.name in phase_names else aliases.get(event.name)
        if name is not None:
            intervals.add((event.thread, event.time_range.start, event.time_range.end, name))

    exclusive: dict[tuple[int, float, float, str], float] = {}
    by_thread: dict[int, list[tuple[int, float, float, str]]] = defaultdict(list)
    for interval in intervals:
        by_thread[interval[0]].append(interval)
    for items in by_thread.values():
        items.sort(key=lambda i: (i[1], -i[2]))
        open_: list[tuple[int, float, float, str]] = []
        for item in items:
            while open_ and open_[-1][2] <= item[1]:
                open_.pop()
            exclusive[item] = item[2] - item[1]
            if open_:
                exclusive[open_[-1]] -= item[2] - item[1]
            open_.append(item)

    occurrences = {p: sorted(i for i in intervals if i[3] == PHASE_PREFIX + p) for p in phases}
    steps: list[dict[str, dict[str, float]]] = [{} for _ in occurrences[phases[0]]]
    spans = []  # (start, end, step, phase) of every phase occurrence
    for phase, items in occurrences.items():
        for step, item in enumerate(items[: len(steps)]):
            steps[step][phase] = {DURATION: (item[2] - item[1]) / 1e6, OTHER: exclusive[item] / 1e6}
            spans.append((item[1], item[2], step, phase))
    spans.sort()
    starts = [s[0] for s in spans]
    for item in intervals:
        if item[3] in phase_names:
            continue
        index = bisect.bisect_right(starts, item[1]) - 1
        if index >= 0 and item[1] < spans[index][1]:
            _, _, step, phase = spans[index]
            totals = steps[step][phase]
            totals[item[3]] = totals.get(item[3], 0.0) + exclusive[item] / 1e6
    return steps


def range_seconds(ranges: list[dict[str, dict[str, float]]], names: Collection[str],
                  phases: Collection[str] = PHASES) -> list[float]:
    """Per step: seconds in ``names`` during ``phases``."""
    return [sum(step.get(p, {}).get(n, 0.0) for p in phases for n in names) for step in ranges]
