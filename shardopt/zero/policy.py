"""Settings of the ZeRO engine that the memory planner must know: pure data, no process group.

The planner (:mod:`shardopt.planner`) reads these instead of the engine's
runtime modules, so the dependencies run one way: planner -> plan, schedule and
policy -> rules (``tests/test_structure.py`` keeps it so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Stage 2 keeps at most this many gradient reductions in flight during backward
# (shardopt.zero.schedule): launching one more waits for the oldest, so peak
# gradient memory is this rank's areas plus a bounded window. One: a reduction
# still overlaps the backward of the next bucket, and a backend runs its
# collectives one after another anyway; each more in flight holds another bucket
# and (on gloo) its receive buffer in the pool. Measured on the 25.5M-parameter
# benchmark GPT at 2 ranks (benchmarks/bench_zero.py): peak RSS 918 MiB with two
# in flight and 2^23-element buckets, 788 MiB with one and 2^22 (one 4-step run
# each: step 0.60 s and 0.50 s).
MAX_IN_FLIGHT = 1

# The native (NCCL) chunked all-gather stages each bucket in a pooled flat buffer
# until its copy-out: at most this many at once (shardopt.zero.comm), so a step's
# gathers never stage the whole model's parameters.
GATHERS_IN_FLIGHT = MAX_IN_FLIGHT + 1

# shardopt.Muon on DTensor parameters (FSDP2, TP) exchanges matrices with their
# owners in rounds of at most this many whole-matrix elements per rank on average
# (shardopt.dtensor.exchange): 2^26, 128 MiB of bf16, bounds the owner's buffers.
DTENSOR_EXCHANGE_BUCKET_NUMEL = 2 ** 26


def shards_gradients(stage: int, world_size: int) -> bool:
    """Whether each rank keeps only its area of the averaged gradient (stage 2 on several ranks).

    Otherwise (stage 1, or one rank) every storage keeps its full averaged
    gradient, all-reduced in place, and ``p.grad`` views it. Decided here once,
    for the runtime (:func:`shardopt.zero.buffers.gradient_sharding`) and the
    planner alike.
    """
    return stage >= 2 and world_size > 1


@dataclass(frozen=True)
class PrecisionPolicy:
    """Dtypes of the gradient reduction and of the master weights and states.

    ``reduce_dtype=torch.bfloat16`` halves gradient traffic; ``None`` reduces in
    the parameters' dtype. Master weights and optimizer states stay fp32 unless
    the model itself is in a wider dtype.
    """

    reduce_dtype: torch.dtype | None = torch.float32
    master_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        # A non-float reduce dtype would round every gradient to zero and freeze training silently.
        if self.reduce_dtype is not None and not (
            isinstance(self.reduce_dtype, torch.dtype) and self.reduce_dtype.is_floating_point
        ):
            raise ValueError(f"Invalid reduce_dtype: {self.reduce_dtype!r} (expected a floating torch.dtype "
                             "such as torch.float32 or torch.bfloat16, or None for the parameters' dtype)")
        if not (isinstance(self.master_dtype, torch.dtype) and self.master_dtype.is_floating_point):
            raise ValueError(f"Invalid master_dtype: {self.master_dtype!r} (expected a floating torch.dtype "
                             "such as torch.float32)")
