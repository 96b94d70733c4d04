"""What ZeroOptimizer checks of its arguments and surroundings at construction.

Each check raises (or warns) naming the argument or parameter and what was
expected, before anything is allocated or any collective runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..optimizer_base import RuleOptimizer
from ..optimizers import SGD, Adagrad, Adam, AdamW, RMSprop
from .plan import ShardPlan
from .policy import PrecisionPolicy

# Warn when padding exceeds this share of a plan of at least this many elements
# (tiny test models pad proportionally more and do not matter).
PADDING_WARN_FRACTION = 0.25
PADDING_WARN_MIN_NUMEL = 1 << 20

_TORCH_EQUIVALENTS: dict[type, type[RuleOptimizer]] = {
    torch.optim.SGD: SGD,
    torch.optim.Adagrad: Adagrad,
    torch.optim.RMSprop: RMSprop,
    torch.optim.Adam: Adam,
    torch.optim.AdamW: AdamW,
}


def warn_if_padded(plan: ShardPlan) -> None:
    """Warn when a plan pads much: ``matrix_layout="whole"`` with matrices large against the areas."""
    if plan.used_numel >= PADDING_WARN_MIN_NUMEL and plan.padding_numel > PADDING_WARN_FRACTION * plan.used_numel:
        warnings.warn(
            f"shard plan pads {plan.padding_numel:,} elements for {plan.used_numel:,} used "
            f"({100 * plan.padding_numel / plan.used_numel:.0f}%): matrices kept whole on owner ranks "
            "are large against the per-rank share; use matrix_layout='balanced' "
            "(see docs/design/muon-at-scale.md)",
            stacklevel=3,
        )


def refuse_fp16(params: Any, precision: PrecisionPolicy, label: Callable[[Tensor], str]) -> None:
    """Raise for float16 parameters or reduction: fp16 needs loss scaling, which this engine lacks.

    fp16's 5-bit exponent flushes small gradients to zero unless the loss is
    scaled (Micikevicius et al. 2018, "Mixed Precision Training", section 3.2),
    and ``torch.amp.GradScaler`` cannot unscale stage-2 gradients, which never
    reach ``p.grad``. bfloat16 costs the same memory with fp32's exponent range.
    """
    if precision.reduce_dtype == torch.float16:
        raise ValueError("Invalid precision: reduce_dtype=torch.float16 needs loss scaling, which ZeroOptimizer "
                         "does not implement; use torch.bfloat16 (same bytes, fp32's range) or torch.float32")
    for param in params:
        if param.dtype == torch.float16:
            raise ValueError(f"Invalid params: {label(param)} is float16, which needs loss scaling that "
                             "ZeroOptimizer does not implement; convert the model to bfloat16 (same memory, "
                             "fp32's range) or keep it float32")


def reject_ddp(params: Any, label: Callable[[Tensor], str]) -> None:
    """Raise if a DistributedDataParallel module holds any of ``params``.

    DDP would average every gradient a second time (all-reduce) before these
    hooks reduce-scatter it: the result is the same, the traffic 1.5x, and the
    two reducers race for ``p.grad``. Finding DDP modules by walking the
    garbage collector's objects costs tens of milliseconds, once.
    """
    import gc

    from torch.nn.parallel import DistributedDataParallel

    ours = {id(p): p for p in params}
    for obj in gc.get_objects():
        # type(), not isinstance(): some objects warn when their __class__ is read.
        if issubclass(type(obj), DistributedDataParallel):
            for param in obj.module.parameters():
                if id(param) in ours:
                    raise ValueError(
                        f"Invalid params: {label(ours[id(param)])} belongs to a model wrapped in "
                        "DistributedDataParallel; ZeroOptimizer averages gradients itself. Pass the "
                        "unwrapped model's parameters (ddp_model.module.parameters()) and drop DDP"
                    )


def resolve_class(optimizer_class: Any) -> type[RuleOptimizer]:
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, RuleOptimizer):
        return optimizer_class
    if optimizer_class in _TORCH_EQUIVALENTS:
        return _TORCH_EQUIVALENTS[optimizer_class]
    raise TypeError(
        f"Invalid optimizer_class: {optimizer_class!r} (expected a shardopt optimizer class such "
        "as shardopt.AdamW, or one of torch.optim.SGD, Adagrad, RMSprop, Adam, AdamW)"
    )
