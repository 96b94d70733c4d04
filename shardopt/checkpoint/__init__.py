"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) of shardopt optimizers.

Save at any number of ranks, load at any other, and exchange with torch's
format::

    from shardopt import checkpoint
    state = {"model": model.state_dict(), "optim": checkpoint.OptimizerState(model, opt)}
    checkpoint.save(state, "ckpt", step)                 # ckpt/step-000000100, complete or absent
    path = checkpoint.latest("ckpt")                     # in a new job, any world size
    checkpoint.load(state, path)                         # checks names, shapes and rule first

:func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict` are named
and shaped like ``torch.distributed.checkpoint.state_dict``'s (dicts keyed by
fully qualified parameter names; each rank's tensors are its pieces of the
logical parameter shapes). Covered today: :class:`~shardopt.ZeroOptimizer`
(every rule, Muon with its AdamW group, fp32 master weights, steps, skipped
steps). The FSDP2 path plugs in at :func:`get_optimizer_state_dict` /
:func:`set_optimizer_state_dict` (dispatch on the optimizer) and
:func:`.boxes.local_pieces` (reading ``Shard(0)`` DTensors). Checkpoints of
FSDP2 + torch.optim (torch's ``get_optimizer_state_dict``) load through
:func:`load`, checked from their metadata (:mod:`.foreign`), and shardopt's load
into FSDP2 + torch.optim with torch's functions. ``python -m
shardopt.checkpoint.convert SRC DST`` converts to one ``torch.save`` file and
back. See docs/checkpointing.md.
"""

from .files import checkpoint_dir, latest, load, save, step_of
from .full import full_state_dict_from_dcp
from .state_dict import (
    FORMAT,
    OptimizerState,
    check_meta,
    get_optimizer_state_dict,
    param_names,
    read_meta,
    set_optimizer_state_dict,
)

__all__ = [
    "FORMAT",
    "OptimizerState",
    "check_meta",
    "checkpoint_dir",
    "full_state_dict_from_dcp",
    "get_optimizer_state_dict",
    "latest",
    "load",
    "param_names",
    "read_meta",
    "save",
    "set_optimizer_state_dict",
    "step_of",
]
