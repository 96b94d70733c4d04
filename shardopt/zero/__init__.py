"""shardopt's ZeRO-1/2 engine.

Data model and placement, pure (no tensors, no process group; the planner
reads these too): :mod:`.plan` (storages, buckets, validation, reports),
:mod:`.layout` (where :func:`plan_shards` puts every parameter),
:mod:`.policy` (precision and the reduction window), :mod:`.schedule` (the
collectives' order), and :mod:`.pool`'s ledger (which pooled buffer serves
which request).

Runtime: :mod:`.comm` and :mod:`.comm_gloo` (the only code that calls
torch.distributed collectives; the communicator's type is chosen from the
backend), :mod:`.pool` (:class:`BufferPool`, the buffers they reuse),
:mod:`.buffers` (the tensors a rank holds for a plan), :mod:`.reducer`
(backward hooks and gradient reduction), :mod:`.matrix_step` (a matrix
rule's step with straddler exchange), :mod:`.gather` (the parameter
all-gather and its deferred waits), :mod:`.optimizer` (:class:`ZeroOptimizer`)
and :mod:`.checkpoint` (its state dicts).
"""

from .comm import BufferOwnershipError, CollectiveFailure, CollectiveMismatchError
from .layout import plan_shards
from .optimizer import ZeroOptimizer
from .plan import DEFAULT_ALIGN_NUMEL, DEFAULT_BUCKET_NUMEL, ParamInfo, PlanError, ShardPlan
from .policy import GATHERS_IN_FLIGHT, MAX_IN_FLIGHT, PrecisionPolicy
from .pool import BufferPool

__all__ = [
    "DEFAULT_ALIGN_NUMEL",
    "DEFAULT_BUCKET_NUMEL",
    "GATHERS_IN_FLIGHT",
    "MAX_IN_FLIGHT",
    "BufferOwnershipError",
    "BufferPool",
    "CollectiveFailure",
    "CollectiveMismatchError",
    "ParamInfo",
    "PlanError",
    "PrecisionPolicy",
    "ShardPlan",
    "ZeroOptimizer",
    "plan_shards",
]
