"""Crash-safe checkpoint directories: write to ``step-N.tmp``, rename to ``step-N`` last.

A job killed during a save leaves a ``.tmp`` directory that :func:`latest`
ignores, so the previous complete checkpoint stays the one a restart loads.
The rename is done by rank 0 once ``dcp.save`` has returned there: DCP's
coordinator (rank 0) writes the ``.metadata`` file only after every rank's
data is written (its final gather), so at that moment the directory is
complete. ``rename`` of a directory within one filesystem is atomic on POSIX.
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.stateful import Stateful

from .boxes import staged_copy

_NAME = re.compile(r"^step-(\d+)$")


def _rank(group: Any | None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _barrier(group: Any | None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group)


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """``root/step-000000123``: zero-padded so names sort by step."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"Invalid step: {step!r} (expected an int >= 0)")
    return Path(root) / f"step-{step:09d}"


def save(state: dict[str, Any], root: str | os.PathLike, step: int, *, async_save: bool = False,
         process_group: Any | None = None) -> Path | Future:
    """``dcp.save(state)`` into ``root/step-N.tmp``, then rank 0 renames it ``root/step-N``.

    A collective: every rank calls it with its own ``state`` (e.g.
    ``{"model": model.state_dict(), "optim": OptimizerState(model, opt)}``).
    Returns the final directory; with ``async_save=True`` a ``Future`` of it
    (``dcp.async_save``: the state is copied to CPU memory before this returns,
    so training may go on; the directory is renamed when rank 0's upload is
    done). An existing ``step-N`` is replaced.
    """
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = _rank(process_group)
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
    _barrier(process_group)

    def complete() -> Path:
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        return final

    if not async_save:
        dcp.save(state, checkpoint_id=str(tmp), process_group=process_group)
        complete()
        _barrier(process_group)  # every rank returns with the directory complete
        return final
    # Staged here (a CPU copy, boxes kept: boxes.staged_copy), so DCP's stager must not copy again.
    staged = staged_copy({key: value.state_dict() if isinstance(value, Stateful) else value
                          for key, value in state.items()})
    upload = dcp.async_save(staged, checkpoint_id=str(tmp), process_group=process_group, async_stager=_Staged())
    upload = getattr(upload, "upload_completion", upload)  # AsyncSaveResponse when staging is async
    done: Future = Future()

    def finish(future: Future) -> None:
        try:
            future.result()
            done.set_result(complete())
        except BaseException as error:  # handed to whoever waits on the future
            done.set_exception(error)

    upload.add_done_callback(finish)
    return done


class _Staged(AsyncStager):
    """An ``AsyncStager`` for a state dict that is already a private CPU copy: hands it on."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def synchronize_staging(self) -> None:
        """Nothing to wait for: the copy was made before ``async_save`` was called."""

    def close(self) -> None:
        """No resources of its own to release."""


def latest(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (``None`` if none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in root.iterdir()
             if (m := _NAME.match(path.name)) and (path / ".metadata").is_file()]
    return max(found)[1] if found else None


def step_of(path: str | os.PathLike) -> int:
    """The step a checkpoint directory from :func:`save` was written at."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"Invalid checkpoint path: {path} (expected a step-N directory from shardopt.checkpoint.save)")
    return int(match.group(1))


def load(state: dict[str, Any], path: str | os.PathLike, *, process_group: Any | None = None) -> None:
    """``dcp.load(state)`` after checking, for every :class:`OptimizerState` in ``state``, the
    checkpoint's integrity record (rule, parameter names and shapes) against its model and
    optimizer, so that a mismatch raises before ``dcp.load`` writes anything in place.

    A collective. A checkpoint without the record under that key (torch.optim's,
    e.g. FSDP2 + torch.optim saved with ``torch.distributed.checkpoint.state_dict``)
    is checked from its metadata instead (names, shapes, state names, param
    groups: :mod:`shardopt.checkpoint.foreign`) and loaded without fp32 master
    weights (taken from the model's parameters, which ``state`` must hold under
    another key) or skipped-step counter. (Plain ``dcp.load`` works too; it
    catches missing names and shapes before reading, but a checkpoint with extra
    parameters or another rule of the same state names only in
    ``load_state_dict``, after the reads.)
    """
    from ..optimizer_base import RuleOptimizer
    from .foreign import foreign_request, saved_keys
    from .state_dict import (
        OptimizerState,
        check_meta,
        get_optimizer_state_dict,
        read_meta,
        set_optimizer_state_dict,
    )

    saved: Any = None
    foreign: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if not isinstance(value, OptimizerState):
            continue
        saved = saved_keys(path) if saved is None else saved
        if f"{key}.shardopt.meta" not in saved:
            if isinstance(value.optimizer, RuleOptimizer):  # torch's layout already: read as it is
                request = get_optimizer_state_dict(value.model, value.optimizer)
                del request["shardopt"]
                foreign[key] = request
                continue
            foreign[key] = foreign_request(key, value.model, value.optimizer, path, saved, process_group)
            continue
        probe: dict[str, Any] = {key: {"shardopt": {"meta": ""}}}
        dcp.load(probe, checkpoint_id=str(path), process_group=process_group)
        check_meta(read_meta(probe[key]) or {}, value.model, value.optimizer)
    # Foreign entries are plain dicts read in place, loaded after the model's tensors are (masters).
    dcp.load({**state, **foreign}, checkpoint_id=str(path), process_group=process_group)
    for key, request in foreign.items():
        set_optimizer_state_dict(state[key].model, state[key].optimizer, request)
