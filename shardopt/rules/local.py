"""Elementwise rules on DTensor parameters run on each rank's local shard.

An elementwise rule computes every element of the new parameter and state from
the same element of the parameter, gradient and state (``docs/design/dtensor.md``).
When a DTensor parameter, its gradient and its tensor states share one layout
(mesh, placements and global shape), element ``i`` of every local shard is the
same logical element, so the rule applied to the local tensors is exactly the
rule applied to the whole tensors, with no communication. FSDP2
(``fully_shard``) and tensor parallelism give gradients the parameter's layout,
and :meth:`~shardopt.optimizer_base.RuleOptimizer.init_state` allocates state
with ``torch.full_like``, which keeps it (so DCP checkpoints the state as the
parameter).

DTensor's own dispatch would also run the arithmetic locally, but at a cost
per op, and shardopt's CPU chunking (:func:`shardopt.rules.base.apply_update`)
must cut local tensors: cutting a DTensor along a sharded dimension makes
DTensor all-gather it. A DTensor whose gradient or state has another layout
(a ``Partial`` gradient, a state loaded unsharded) is left to DTensor's dispatch,
which redistributes as needed: correct, with communication.

Reference: the DTensor layout model, ``torch.distributed.tensor`` (Placement,
DTensorSpec) and the FSDP2 design note (pytorch/pytorch#114299).
"""

from __future__ import annotations

import sys

from torch import Tensor

Group = tuple[list[Tensor], list[Tensor], list[dict[str, Tensor]]]


def _dtensor_type() -> type | None:
    # No DTensor can exist before torch.distributed.tensor is imported, so importing
    # it here (seconds on a cold start) would only slow down plain single-process use.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _same_layout(dtensor: type, param: Tensor, other: Tensor) -> bool:
    return (
        isinstance(other, dtensor)
        and other.shape == param.shape
        and other.device_mesh == param.device_mesh  # type: ignore[attr-defined]
        and other.placements == param.placements  # type: ignore[attr-defined]
    )


def split_local(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]]) -> tuple[Group, Group]:
    """``(local, distributed)``: ``local`` holds plain tensors and the local shards of
    DTensor parameters whose gradient and tensor states share their layout (scalar
    states such as ``step`` are plain 0-d tensors and pass unchanged); ``distributed``
    holds the DTensors that do not, as they are, for DTensor's dispatch."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for p in params):
        return (params, grads, states), ([], [], [])
    local: Group = ([], [], [])
    distributed: Group = ([], [], [])
    for param, grad, state in zip(params, grads, states):
        if not isinstance(param, dtensor):
            target, item = local, (param, grad, state)
        elif _same_layout(dtensor, param, grad) and all(
            _same_layout(dtensor, param, value) if value.dim() > 0 else not isinstance(value, dtensor)
            for value in state.values()
        ):
            # _local_tensor shares storage with the DTensor: updating it in place
            # updates the parameter and the state (to_local() returns it too, under
            # no_grad, which the rules run under; this works with grad enabled as well).
            views = {name: value._local_tensor if value.dim() > 0 else value for name, value in state.items()}
            target, item = local, (param._local_tensor, grad._local_tensor, views)
        else:
            target, item = distributed, (param, grad, state)
        for into, value in zip(target, item):
            into.append(value)  # type: ignore[attr-defined]
    return local, distributed
