"""shardopt under DeepSpeed: ``initialize(model=..., config=...)`` with a ``"shardopt"`` section.

::

    from shardopt.integrations import deepspeed as shardopt_ds
    engine, optimizer, _, scheduler = shardopt_ds.initialize(model=model, config="ds_config.json")
    for batch in loader:
        engine.backward(engine(batch)); engine.step()

The config's ``"shardopt"`` section (:mod:`.deepspeed_config`) chooses the rule and
ZeroOptimizer's settings; DeepSpeed keeps everything else (batch sizes and their
checks, accumulation, its scheduler, checkpoints, logging) with ZeRO stage 0. How
the two fit (DeepSpeed 0.19, ``deepspeed/runtime/engine.py``):

* The optimizer is given to ``deepspeed.initialize`` as a callable, which DeepSpeed
  calls after moving and casting the model (``_configure_optimizer``): ZeroOptimizer's
  parameters become views of its storages only then, so nothing replaces them later.
  Muon's groups come from :func:`shardopt.muon_param_groups` on the model unless
  ``model_parameters`` are given.
* At stage 0 DeepSpeed all-reduces every gradient after backward
  (``allreduce_gradients``); ``engine.enable_backward_allreduce = False`` turns that off,
  so the only gradient traffic is ZeroOptimizer's own reduce-scatter (or all-reduce at
  stage 1).
* Accumulation: DeepSpeed divides the loss by ``gradient_accumulation_steps`` and steps
  on the boundary, but at stage 0 tells the optimizer nothing before backward. The
  plugin's ``engine.backward`` asks ``engine.is_gradient_accumulation_boundary()`` first
  and calls :meth:`DeepSpeedZeroOptimizer.set_gradient_accumulation_boundary`, which
  keeps the micro-batches off the boundary inside ZeroOptimizer's ``no_sync()``: they
  accumulate locally and the boundary's backward reduces the sum once.
* Clipping is ZeroOptimizer's (``max_grad_norm`` from ``gradient_clipping``); a step
  skipped for a non-finite gradient reports ``overflow``, so DeepSpeed counts it in
  ``skipped_steps`` and does not advance its scheduler, as for its own optimizers.
* Checkpoints: ``engine.save_checkpoint`` stores only rank 0's ``optimizer.state_dict()``
  unless the optimizer is one of DeepSpeed's ZeRO optimizers, and ZeroOptimizer's state
  is sharded. The plugin's ``save_checkpoint`` lets DeepSpeed write the model, scheduler
  and counters, and every rank writes its shard with :mod:`shardopt.checkpoint`'s DCP
  format into ``<save_dir>/<tag>/shardopt_optimizer`` (loadable at another world size);
  ``load_checkpoint`` reads it back on every rank after DeepSpeed's own load.

Without a ``"shardopt"`` section :func:`initialize` is ``deepspeed.initialize`` ("rules
mode": shardopt's elementwise single-process optimizers such as ``shardopt.AdamW`` as
DeepSpeed client optimizers under its ZeRO-1/2/3, with
``"zero_allow_untested_optimizer": true``), except that it refuses what cannot work:
``shardopt.Muon`` under DeepSpeed ZeRO (which hands the optimizer flat 1-D partitions,
so no matrix is whole), and a ready-made ZeroOptimizer object.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..muon_grouping import muon_param_groups
from ..optimizer_base import RuleOptimizer
from ..rules.base import Granularity
from ..zero.optimizer import ZeroOptimizer
from . import deepspeed_config
from .deepspeed_config import Translation, check_scheduler, load_config, translate

CHECKPOINT_SUBDIR = "shardopt_optimizer"
_SAVED_MARKER = "shardopt.integrations.deepspeed"


class DeepSpeedZeroOptimizer(ZeroOptimizer):
    """A :class:`~shardopt.ZeroOptimizer` with the hooks DeepSpeed's engine looks for.

    * :meth:`set_gradient_accumulation_boundary` (called by the plugin's
      ``engine.backward``, and by ``engine.set_gradient_accumulation_boundary``):
      off the boundary, backward runs inside :meth:`no_sync`.
    * ``overflow``: whether the last step was skipped for a non-finite gradient
      (DeepSpeed then counts a skipped step and leaves its scheduler alone).
    * ``_global_grad_norm``: the last global gradient norm (``engine.get_global_grad_norm()``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._accumulating = contextlib.ExitStack()
        self._inside_no_sync = False
        self._saving_for_deepspeed: str | None = None
        self.overflow = False

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Reduce in the next backward only if ``is_boundary``; otherwise accumulate locally."""
        if is_boundary:
            self._accumulating.close()
            self._inside_no_sync = False
        elif not self._inside_no_sync:  # one no_sync() per accumulation window
            self._accumulating.enter_context(self.no_sync())
            self._inside_no_sync = True

    @property
    def _global_grad_norm(self) -> float | None:
        return self.last_grad_norm

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        skipped = self.num_skipped_steps
        loss = super().step(closure)
        self.overflow = self.num_skipped_steps != skipped
        return loss

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard; inside the plugin's ``save_checkpoint``, a pointer to the DCP directory
        that holds every rank's shard instead (DeepSpeed would store rank 0's only)."""
        if self._saving_for_deepspeed is not None:
            return {_SAVED_MARKER: self._saving_for_deepspeed}
        return super().state_dict()

    def close(self) -> None:
        accumulating = getattr(self, "_accumulating", None)
        if accumulating is not None:
            accumulating.close()
        super().close()


def _groups_for(model: nn.Module, model_parameters: Any, translation: Translation) -> Any:
    """The params ZeroOptimizer gets: the caller's, Muon's groups of the model, or the named parameters."""
    if model_parameters is not None:
        return model_parameters
    if translation.is_muon:
        return muon_param_groups(model)
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _factory(model: nn.Module, model_parameters: Any, translation: Translation) -> Callable[[Any], ZeroOptimizer]:
    def build(_deepspeed_params: Any) -> ZeroOptimizer:
        # DeepSpeed passes what it was given as model_parameters (or the module's parameters):
        # the groups are recomputed here, after DeepSpeed has moved and cast the model.
        params = _groups_for(model, model_parameters, translation)
        opt = DeepSpeedZeroOptimizer(params, translation.optimizer_class, **translation.zero_kwargs,
                                     **translation.optimizer_kwargs)
        empty = [i for i, group in enumerate(opt.param_groups) if not group["params"]]
        if empty:
            opt.close()
            # DeepSpeed drops empty groups from param_groups, which would shift ZeroOptimizer's group indices.
            raise ValueError(f"Invalid model_parameters: param groups {empty} have no parameters (DeepSpeed "
                             "drops empty groups); leave them out")
        names = [f"group {i} ({'muon' if g.get('use_muon') else 'lr'} {g['lr']})" if translation.is_muon
                 else f"group {i}" for i, g in enumerate(opt.param_groups)]
        check_scheduler(translation.scheduler, [float(g["lr"]) for g in opt.param_groups], names,
                        has_betas="betas" in opt.defaults, is_muon=translation.is_muon)
        return opt

    return build


def _refuse_client_optimizer(optimizer: Any, config: Mapping[str, Any]) -> None:
    """Rules mode: refuse client optimizers that cannot work under DeepSpeed's own ZeRO."""
    if isinstance(optimizer, ZeroOptimizer):
        raise ValueError(
            "Invalid optimizer: a ZeroOptimizer object given to DeepSpeed (built before DeepSpeed moves the "
            "model, and DeepSpeed would also all-reduce the gradients); put a 'shardopt' section in the config "
            "instead: 'shardopt': {'optimizer': {'type': 'AdamW', 'params': {...}}, 'stage': 2}")
    stage = deepspeed_config.deepspeed_zero_stage(config)
    if stage >= 1 and isinstance(optimizer, RuleOptimizer) and any(
            optimizer.rule_for_group(group).granularity is Granularity.MATRIX for group in optimizer.param_groups):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} needs whole matrices, but DeepSpeed ZeRO stage {stage} "
            "hands its client optimizer flat 1-D partitions; run distributed Muon through the plugin instead: "
            "'zero_optimization': {'stage': 0} and 'shardopt': {'optimizer': {'type': 'Muon', 'params': {...}}, "
            "'stage': 2} in the config, with shardopt.integrations.deepspeed.initialize")


def _install_engine_hooks(engine: Any, opt: DeepSpeedZeroOptimizer) -> None:
    """Turn off DeepSpeed's gradient all-reduce; wrap backward and the checkpoint methods (this engine only)."""
    engine.enable_backward_allreduce = False
    backward, save, load = engine.backward, engine.save_checkpoint, engine.load_checkpoint

    @functools.wraps(backward)
    def backward_at_boundary(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        boundary = engine.is_gradient_accumulation_boundary() and not getattr(engine, "inside_no_sync_ctxt", False)
        opt.set_gradient_accumulation_boundary(boundary)
        return backward(loss, *args, **kwargs)

    @functools.wraps(save)
    def save_checkpoint(save_dir: str | os.PathLike, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
        opt._saving_for_deepspeed = CHECKPOINT_SUBDIR
        try:
            result = save(save_dir, tag, *args, **kwargs)
        finally:
            opt._saving_for_deepspeed = None
        save_optimizer(engine.module, opt, Path(save_dir) / tag / CHECKPOINT_SUBDIR)
        return result

    @functools.wraps(load)
    def load_checkpoint(load_dir: str | os.PathLike, tag: Any = None, *args: Any,
                        load_optimizer_states: bool = True, load_module_only: bool = False, **kwargs: Any) -> Any:
        if tag is None:
            latest = Path(load_dir) / "latest"
            tag = latest.read_text().strip() if latest.is_file() else None
        # DeepSpeed's copy of the optimizer state is only a pointer (state_dict above): never hand it over.
        path, client_state = load(load_dir, tag, *args, load_optimizer_states=False,
                                  load_module_only=load_module_only, **kwargs)
        if path is not None and load_optimizer_states and not load_module_only:
            load_optimizer(engine.module, opt, Path(load_dir) / str(tag) / CHECKPOINT_SUBDIR)
        return path, client_state

    engine.backward = backward_at_boundary
    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def save_optimizer(model: nn.Module, opt: ZeroOptimizer, path: str | os.PathLike) -> None:
    """Every rank writes its shard of ``opt`` to ``path`` (DCP; a collective)."""
    import torch.distributed.checkpoint as dcp

    from ..checkpoint import OptimizerState

    dcp.save({"optim": OptimizerState(model, opt)}, checkpoint_id=str(path))


def load_optimizer(model: nn.Module, opt: ZeroOptimizer, path: str | os.PathLike) -> None:
    """Every rank reads its shard of ``opt`` from ``path`` (checked first: rule, names, shapes; a collective)."""
    from .. import checkpoint

    if not (Path(path) / ".metadata").is_file():
        raise FileNotFoundError(f"Invalid checkpoint: {path} has no shardopt optimizer state (expected the "
                                f"directory written by the plugin's engine.save_checkpoint)")
    checkpoint.load({"optim": checkpoint.OptimizerState(model, opt)}, path)


def initialize(*, model: nn.Module, config: Mapping[str, Any] | str | os.PathLike,
               model_parameters: Iterable[Any] | None = None, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with the optimizer chosen by the config's ``"shardopt"`` section.

    Returns what ``deepspeed.initialize`` returns: ``(engine, optimizer, training_dataloader,
    lr_scheduler)``; ``optimizer`` is a :class:`DeepSpeedZeroOptimizer`. Every other keyword goes
    to ``deepspeed.initialize`` unchanged (``training_data``, ``lr_scheduler``, ``mpu``, ...),
    except ``optimizer``, which the section replaces (refused). Without a ``"shardopt"`` section,
    rules mode (module docstring). Raises ``ValueError`` for the combinations listed in
    :mod:`.deepspeed_config`, before DeepSpeed starts.
    """
    loaded = load_config(config)
    if not deepspeed_config.has_section(loaded):
        if "optimizer" in kwargs:
            _refuse_client_optimizer(kwargs["optimizer"], loaded)
        import deepspeed

        return tuple(deepspeed.initialize(model=model, config=loaded, model_parameters=model_parameters,
                                          **kwargs))
    if kwargs.get("optimizer") is not None:
        raise ValueError("Invalid optimizer: the config's 'shardopt' section builds the optimizer; leave out "
                         "initialize(optimizer=...) or the 'shardopt' section")
    kwargs.pop("optimizer", None)
    translation = translate(loaded)
    deepspeed_config.warn(translation)
    import deepspeed  # after every check: a refused config fails without importing DeepSpeed

    parameters = list(model_parameters) if model_parameters is not None else None
    engine, opt, loader, scheduler = deepspeed.initialize(
        model=model, config=translation.deepspeed_config, optimizer=_factory(model, parameters, translation),
        model_parameters=parameters, **kwargs)
    if not isinstance(opt, DeepSpeedZeroOptimizer):  # a wrapper would step its own copies
        raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(opt).__name__}; the plugin needs it unwrapped "
                           "(ZeRO stage 0, no fp16/bf16 section)")
    _install_engine_hooks(engine, opt)
    return engine, opt, loader, scheduler
