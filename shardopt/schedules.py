"""Learning-rate schedules as pure functions of the step.

Every factory returns a :data:`Schedule`: a callable ``step -> multiplier`` where
the multiplier scales the peak learning rate (1.0 = peak). A schedule keeps no
state, so a checkpoint only needs the step, and calling it twice or out of order
gives the same value (as optax ``schedules/_schedule.py`` and nanoGPT's ``get_lr``).
:func:`as_lr_scheduler` adapts one to torch's ``LambdaLR``. The formulas follow the
optimizers chapter (``reference/optimizers-chapter.txt``), sections 13 "Learning
Rate Schedules" and 10.3 "AdamW in Modern LLMs". Example::

    >>> sched = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    >>> sched(0), sched(5), sched(10), sched(60), sched(110), sched(500)
    (0.0, 0.5, 1.0, 0.55, 0.1, 0.1)
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch

__all__ = [
    "LLM_RECIPE_PEAK_LR",
    "SCHEDULES",
    "Schedule",
    "as_lr_scheduler",
    "build_schedule",
    "constant",
    "cosine_decay",
    "join",
    "linear_warmup",
    "llm_recipe",
    "multiply",
    "step_decay",
    "warmup_cosine",
    "warmup_stable_decay",
]

Schedule = Callable[[int], float]
"""A pure map from the optimizer step ``t >= 0`` to the LR multiplier."""

LLM_RECIPE_PEAK_LR: float = 6e-4
"""Peak AdamW learning rate of GPT-3 / LLaMA / Qwen-style runs (chapter 10.3)."""


def _check_int(name: str, value: object, minimum: int, expected: str = "") -> int:
    # bool is an int subclass, but `warmup_steps=True` is always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {name}: {value!r} (expected an int, got {type(value).__name__})")
    if value < minimum:
        expected = expected or f"an int >= {minimum}"
        raise ValueError(f"Invalid {name}: {value} (expected {expected})")
    return int(value)


def _check_float(
    name: str, value: object, low: float, high: float, *, low_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}: {value!r} (expected a float, got {type(value).__name__})")
    value = float(value)
    above_low = value > low if low_open else value >= low
    if not (math.isfinite(value) and above_low and value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"Invalid {name}: {value} (expected a finite float in {interval})")
    return value


def _check_schedule(name: str, fn: object) -> Schedule:
    if not callable(fn):
        raise TypeError(f"Invalid {name}: {fn!r} (expected a callable step -> float)")
    return fn


def constant(value: float = 1.0) -> Schedule:
    """The same multiplier at every step: ``m_t = value``.

    ``value`` must be finite and ``>= 0``. Example: ``constant(0.5)(123) == 0.5``.
    """
    value = _check_float("value", value, 0.0, math.inf)

    def schedule(step: int) -> float:
        _check_int("step", step, 0)
        return value

    return schedule


def linear_warmup(warmup_steps: int, *, start: float = 0.0) -> Schedule:
    """Linear warmup to the peak, then flat (chapter 13.1).

    ``m_t = start + (1 - start) * t / T_warmup`` for ``t <= T_warmup``, else ``1``.
    The chapter's form is ``start = 0``: large early gradients can destabilize
    training, so the LR rises from 0. ``warmup_steps == 0`` means no warmup.
    Example: ``linear_warmup(100)(25) == 0.25``.
    """
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    start = _check_float("start", start, 0.0, 1.0)

    def schedule(step: int) -> float:
        step = _check_int("step", step, 0)
        if step >= warmup_steps:
            return 1.0
        return start + (1.0 - start) * step / warmup_steps

    return schedule


def cosine_decay(decay_steps: int, *, min_ratio: float = 0.1) -> Schedule:
    """Half-cosine from the peak to ``min_ratio`` (chapter 13.2, without warmup).

    ``m_t = r + (1/2)(1 - r)(1 + cos(pi * t / T_decay))`` for ``0 <= t <= T_decay``,
    and ``r`` afterwards, where ``r = min_ratio`` (the chapter's eta_min / eta_max;
    0.1 is the common choice). Cosine annealing is from Loshchilov & Hutter 2017,
    "SGDR: Stochastic Gradient Descent with Warm Restarts" (one cycle, no restart).
    Example: ``cosine_decay(100)(50) == 0.55`` (halfway is ``r + (1 - r) / 2``).
    """
    decay_steps = _check_int("decay_steps", decay_steps, 1)
    min_ratio = _check_float("min_ratio", min_ratio, 0.0, 1.0)

    def schedule(step: int) -> float:
        step = _check_int("step", step, 0)
        if step >= decay_steps:
            return min_ratio
        return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * step / decay_steps))

    return schedule


def step_decay(step_size: int, *, gamma: float = 0.1) -> Schedule:
    """Multiply by ``gamma`` every ``step_size`` steps (chapter 13.3).

    ``m_t = gamma ** floor(t / T_step)``, as torch's ``StepLR``. Example:
    ``step_decay(10)(9) == 1.0`` and ``step_decay(10)(10) == 0.1``.
    """
    step_size = _check_int("step_size", step_size, 1)
    gamma = _check_float("gamma", gamma, 0.0, 1.0, low_open=True)

    def schedule(step: int) -> float:
        return gamma ** (_check_int("step", step, 0) // step_size)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Piecewise composition, as ``optax.join_schedules``.

    With boundaries ``b_1 < ... < b_{n-1}`` (and ``b_0 = 0``), schedule ``i`` is
    used on ``[b_i, b_{i+1})`` and called with the step relative to its start:
    ``m_t = s_i(t - b_i)``. The last schedule runs from ``b_{n-1}`` on.
    Example: ``join([linear_warmup(10), cosine_decay(90)], [10])``.
    """
    schedules = [_check_schedule(f"schedules[{i}]", s) for i, s in enumerate(schedules)]
    if not schedules:
        raise ValueError("Invalid schedules: [] (expected at least one schedule)")
    boundaries = [_check_int(f"boundaries[{i}]", b, 0) for i, b in enumerate(boundaries)]
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"Invalid boundaries: {boundaries} (expected len(schedules) - 1 = "
            f"{len(schedules) - 1} boundaries, got {len(boundaries)})"
        )
    if any(b <= a for a, b in pairwise(boundaries)):
        raise ValueError(f"Invalid boundaries: {boundaries} (expected strictly increasing)")
    starts = [0, *boundaries]

    def schedule(step: int) -> float:
        step = _check_int("step", step, 0)
        i = bisect.bisect_right(boundaries, step)
        return float(schedules[i](step - starts[i]))

    return schedule


def multiply(*schedules: Schedule) -> Schedule:
    """Pointwise product ``m_t = s_1(t) * s_2(t) * ... * s_n(t)``.

    Example: ``multiply(linear_warmup(100), step_decay(1000, gamma=0.5))``.
    """
    checked = [_check_schedule(f"schedules[{i}]", s) for i, s in enumerate(schedules)]
    if not checked:
        raise ValueError("Invalid schedules: () (expected at least one schedule)")

    def schedule(step: int) -> float:
        step = _check_int("step", step, 0)
        return math.prod(float(s(step)) for s in checked)

    return schedule


def warmup_cosine(warmup_steps: int, total_steps: int, *, min_ratio: float = 0.1) -> Schedule:
    """Linear warmup from 0, then cosine decay to ``min_ratio`` (chapter 13.1 + 13.2).

    ``m_t = t / T_w`` for ``t <= T_w``;
    ``m_t = r + (1/2)(1 - r)(1 + cos(pi (t - T_w) / (T_total - T_w)))`` for
    ``T_w < t <= T_total``; ``m_t = r`` after ``T_total``. Cosine annealing:
    Loshchilov & Hutter 2017 (SGDR).
    Example: ``warmup_cosine(10, 110)(60) == 0.55``.
    """
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    expected = f"an int > warmup_steps = {warmup_steps}"
    total_steps = _check_int("total_steps", total_steps, warmup_steps + 1, expected)
    # cosine_decay validates min_ratio; the pieces agree (= 1) at t = T_w.
    cosine = cosine_decay(total_steps - warmup_steps, min_ratio=min_ratio)
    return join([linear_warmup(warmup_steps), cosine], [warmup_steps])


_DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    # Each maps decay progress p in [0, 1] to a fraction falling from 1 to 0.
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    # Hägele et al. 2024 find the 1 - sqrt cooldown matches or beats cosine.
    "sqrt": lambda p: 1.0 - math.sqrt(p),
}


def warmup_stable_decay(
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    *,
    min_ratio: float = 0.0,
    decay: str = "linear",
) -> Schedule:
    """Warmup-stable-decay ("WSD", trapezoidal) schedule.

    From Hu et al. 2024, "MiniCPM: Unveiling the Potential of Small Language
    Models with Scalable Training Strategies", and Hägele et al. 2024, "Scaling
    Laws and Compute-Optimal Training Beyond Fixed Training Durations". With
    ``T_s = T_w + stable_steps`` and ``T_e = T_s + decay_steps``:

    * warmup ``t <= T_w``: ``m_t = t / T_w``;
    * stable ``T_w <= t <= T_s``: ``m_t = 1``;
    * decay ``T_s <= t <= T_e``: ``m_t = r + (1 - r) f(p)`` with ``p = (t - T_s) / T_decay``
      and ``f(p) = 1 - p`` ("linear"), ``(1 + cos(pi p)) / 2`` ("cosine") or
      ``1 - sqrt(p)`` ("sqrt");
    * after ``T_e``: ``m_t = r`` (``r = min_ratio``).

    The stable phase does not depend on the run length, so a run can be extended
    from any stable-phase checkpoint and cooled down later.
    Example: ``warmup_stable_decay(10, 80, 10)(95) == 0.5``.
    """
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    stable_steps = _check_int("stable_steps", stable_steps, 0)
    decay_steps = _check_int("decay_steps", decay_steps, 1)
    min_ratio = _check_float("min_ratio", min_ratio, 0.0, 1.0)
    if not isinstance(decay, str):
        raise TypeError(f"Invalid decay: {decay!r} (expected a str, got {type(decay).__name__})")
    if decay not in _DECAY_SHAPES:
        choices = ", ".join(repr(k) for k in sorted(_DECAY_SHAPES))
        raise ValueError(f"Invalid decay: {decay!r} (expected one of {choices})")
    shape = _DECAY_SHAPES[decay]
    decay_start = warmup_steps + stable_steps

    def schedule(step: int) -> float:
        step = _check_int("step", step, 0)
        if step < warmup_steps:
            return step / warmup_steps
        if step <= decay_start:
            return 1.0
        if step >= decay_start + decay_steps:
            return min_ratio
        return min_ratio + (1.0 - min_ratio) * shape((step - decay_start) / decay_steps)

    return schedule


def llm_recipe(total_steps: int, *, warmup_steps: int = 2000, min_ratio: float = 0.1) -> Schedule:
    """The chapter's AdamW recipe for LLMs (chapter 10.3): 2,000 linear warmup
    steps, then cosine decay to 10% of the peak, which is :data:`LLM_RECIPE_PEAK_LR`.

    Same as :func:`warmup_cosine`. Example: ``llm_recipe(100_000)(1000) == 0.5``.
    """
    return warmup_cosine(warmup_steps, total_steps, min_ratio=min_ratio)


def as_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, *, last_epoch: int = -1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Drive any ``torch.optim.Optimizer`` with a schedule.

    Each param group's ``lr = initial_lr * schedule(step)``: ``initial_lr`` is the
    group's lr when the scheduler is built, ``step`` counts ``scheduler.step()``
    calls (construction applies ``schedule(0)``). To resume, load the scheduler's
    ``state_dict()``, which holds the step, or pass ``last_epoch`` (torch then
    needs ``initial_lr`` in every group).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Invalid optimizer: {type(optimizer).__name__} (expected a torch.optim.Optimizer)"
        )
    schedule = _check_schedule("schedule", schedule)
    last_epoch = _check_int("last_epoch", last_epoch, -1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=last_epoch)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "linear_warmup": linear_warmup,
    "cosine_decay": cosine_decay,
    "step_decay": step_decay,
    "warmup_cosine": warmup_cosine,
    "warmup_stable_decay": warmup_stable_decay,
    "llm_recipe": llm_recipe,
}
"""Schedule factories by name, for configs (see :func:`build_schedule`)."""


def build_schedule(name: str, **kwargs: object) -> Schedule:
    """Build a schedule from its name in :data:`SCHEDULES` and its factory's kwargs.

    Example: ``build_schedule("warmup_cosine", warmup_steps=10, total_steps=110)``.
    """
    if not isinstance(name, str):
        raise TypeError(f"Invalid schedule name: {name!r} (expected a str)")
    if name not in SCHEDULES:
        choices = ", ".join(repr(k) for k in SCHEDULES)
        raise ValueError(f"Invalid schedule name: {name!r} (expected one of {choices})")
    return SCHEDULES[name](**kwargs)
