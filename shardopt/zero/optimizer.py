"""ZeroOptimizer: ZeRO stage 1/2 data parallelism around any shardopt optimizer.

One training step (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", sections 5.1-5.2)::

    backward   hooks copy each gradient into its bucket; a complete bucket starts
               an async reduce-scatter (stage 2) or all-reduce (stage 1), mean over ranks
               (a Muon matrix as it arrives: a reduce of each part to the rank holding
               it at stage 2, an all-reduce at stage 1)
    step()     wait; one all-reduce of [sum of squared gradients, non-finite count];
               skip the step everywhere if any gradient is not finite; clip by the
               global norm; run the update rule on this rank's area (fp32 master
               weights and states; Muon: :mod:`shardopt.zero.matrix_step`); all-gather
               every bucket's parameters in place (:mod:`shardopt.zero.gather`)

Model parameters are views of the storages (:mod:`shardopt.zero.plan`), so the
all-gather updates the model without a copy. Do not wrap the model in DistributedDataParallel:
this optimizer averages the gradients itself (DDP would average them twice over
the wire, 1.5x the traffic, for the same result).

Example (``torchrun --nproc-per-node 2 train.py``)::

    dist.init_process_group("gloo")          # or shardopt.dist.init_from_env()
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=2,
                                 lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from ..optimizer_base import ParamsT
from ..optimizers import AdamW
from ..rules.base import Granularity, StateSpec, apply_update, region_views
from . import checkpoint, checks
from .buffers import BucketBuffers, StorageBuffers, gradient_sharding, storage_bytes
from .comm import default_group, digest_tensor
from .comm_gloo import communicator_for
from .gather import ParamGather
from .layout import plan_shards
from .matrix_step import MatrixStep
from .plan import DEFAULT_ALIGN_NUMEL, DEFAULT_BUCKET_NUMEL, ParamInfo, ShardPlan, Storage
from .policy import PrecisionPolicy
from .reducer import GradientReducer

# id(param) -> the live ZeroOptimizer whose backward hooks take that parameter's
# gradient. Weak: an optimizer nobody holds any more drops out. (Its hooks hold it
# alive as long as they are registered, which is why close() exists.)
_OWNERS: weakref.WeakValueDictionary[int, ZeroOptimizer] = weakref.WeakValueDictionary()


class ZeroOptimizer(torch.optim.Optimizer):
    """ZeRO-1/2 sharded version of ``optimizer_class`` (any shardopt optimizer).

    Args:
        params: parameters, param groups, or ``model.named_parameters()``.
        optimizer_class: a shardopt optimizer class (torch.optim's SGD, Adagrad,
            RMSprop, Adam and AdamW are mapped to theirs).
        stage: 1 shards optimizer states and keeps the full averaged gradient in
            ``p.grad`` (all-reduce); 2 also shards gradients (reduce-scatter).
        process_group: defaults to the world group; without an initialised
            process group the optimizer runs on one rank.
        bucket_numel: elements per communication bucket.
        matrix_layout: where matrix rules (Muon) keep their matrices:
            ``"balanced"`` (default) gives every rank the same number of
            elements and exchanges the few matrices cut by an area boundary
            for Newton-Schulz (:meth:`ShardPlan.exchange_numel` elements per
            step); ``"whole"`` keeps every matrix on one rank (no exchange),
            padding every area to the busiest rank's.
        precision: a :class:`PrecisionPolicy`.
        max_grad_norm: clip gradients by their global norm over all shards.
        overlap: start each bucket's reduction during backward.
        overlap_gather: leave ``step()``'s parameter all-gathers in flight, each waited for
            by the forward of the first module using it (:mod:`shardopt.zero.gather`).
            Parameters are then valid only in their module's forward or after
            :meth:`wait_for_params` (call it before an EMA, logging, ``model.state_dict()``);
            off by default for that reason. Same collectives, same results.
        **defaults: hyperparameters for ``optimizer_class`` (``lr``, ``betas``, ...).
            ``fused=True`` (Adam, AdamW, SGD, Adagrad) runs torch's fused kernel on
            this rank's fp32 area, one view per parameter piece: bitwise equal to
            torch.optim with ``fused=True`` at world size 1, and the fastest choice
            (:mod:`shardopt.rules.fused`). The default stays torch's default
            (``fused=None``: the single-tensor order), so that this optimizer equals
            the wrapped optimizer, and torch.optim's default, bitwise at world size 1
            and a checkpoint continues identically after moving between them; torch's
            fused kernels round differently from its default path (last bits).

    Where a parameter has no gradient on any rank in a step, it is updated as if
    its gradient were zero (momentum and weight decay still act), unlike
    torch.optim, which skips it: every rank must run the same collectives.

    The optimizer's backward hooks take its parameters' gradients until
    :meth:`close`; another ZeroOptimizer on the same parameters is refused
    until then.
    """

    def __init__(
        self,
        params: ParamsT,
        optimizer_class: type[torch.optim.Optimizer] = AdamW,
        *,
        stage: int = 2,
        process_group: Any | None = None,
        bucket_numel: int = DEFAULT_BUCKET_NUMEL,
        matrix_layout: str = "balanced",
        precision: PrecisionPolicy | None = None,
        max_grad_norm: float | None = None,
        overlap: bool = True,
        overlap_gather: bool = False,
        **defaults: Any,
    ) -> None:
        if stage not in (1, 2) or isinstance(stage, bool):
            raise ValueError(f"Invalid stage: {stage!r} (expected 1 or 2)")
        if isinstance(bucket_numel, bool) or not isinstance(bucket_numel, int) or bucket_numel < 1:
            raise ValueError(f"Invalid bucket_numel: {bucket_numel!r} (expected an int >= 1)")
        if precision is not None and not isinstance(precision, PrecisionPolicy):
            raise TypeError(f"Invalid precision: {precision!r} (expected a shardopt.PrecisionPolicy, e.g. "
                            "PrecisionPolicy(reduce_dtype=torch.bfloat16), or None)")
        if not isinstance(overlap, bool):
            raise TypeError(f"Invalid overlap: {overlap!r} (expected True or False)")
        if not isinstance(overlap_gather, bool):
            raise TypeError(f"Invalid overlap_gather: {overlap_gather!r} (expected True or False)")
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < math.inf
        ):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected a float > 0 or None)")
        optimizer_class = checks.resolve_class(optimizer_class)
        self._constructed = False
        self.inner = optimizer_class(params, **defaults)
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self._constructed = True
        self.stage = stage
        self.max_grad_norm = max_grad_norm
        self.precision = precision or PrecisionPolicy()
        self.comm = communicator_for(process_group if process_group is not None else default_group())
        self.num_skipped_steps = 0
        self.last_grad_norm: float | None = None

        every = [p for group in self.param_groups for p in group["params"]]
        self.params = {i: p for i, p in enumerate(every) if p.requires_grad}
        devices = {p.device for p in self.params.values()}
        if len(devices) > 1:
            raise ValueError(f"Invalid params: all parameters must be on one device, got {devices}")
        self.device = devices.pop() if devices else torch.device("cpu")
        checks.refuse_fp16(self.params.values(), self.precision, self.inner.param_label)
        group_of = {id(p): g for g, group in enumerate(self.param_groups) for p in group["params"]}
        infos = [self._param_info(index, p, group_of[id(p)]) for index, p in self.params.items()]
        self.sharding = gradient_sharding(stage, self.comm.world_size)
        self.plan: ShardPlan = plan_shards(
            infos, self.comm.world_size, bucket_numel=bucket_numel, align_numel=DEFAULT_ALIGN_NUMEL,
            matrix_layout=matrix_layout, shard_gradients=self.sharding.shards,
        )
        checks.warn_if_padded(self.plan)
        checks.reject_ddp(self.params.values(), self.inner.param_label)
        self._reject_owned()
        self._verify_same_params(infos)
        self.storages = [self._make_storage(storage) for storage in self.plan.storages]
        self.buffers = [BucketBuffers(bucket, self.storages[bucket.storage.index]) for bucket in self.plan.buckets]
        self.matrix_steps = {
            s.storage.index: MatrixStep(self.plan, s, self.comm)
            for s in self.storages if s.storage.granularity is Granularity.MATRIX
        }
        self.reducer = GradientReducer(
            self.plan, self.buffers, self.storages, self.params, self.comm, self.sharding, overlap=overlap,
            label=self.inner.param_label, on_reduced=self._expose_grads,
        )
        self.param_gather = ParamGather(self.plan, self.buffers, self.params, self.comm, overlap=overlap_gather)
        self.closed = False
        for param in self.params.values():
            _OWNERS[id(param)] = self

    def _param_info(self, index: int, param: Tensor, group: int) -> ParamInfo:
        hp = self.param_groups[group]
        rule = self.inner.rule_for_group(hp)
        cost = rule.transform_cost(tuple(param.shape), hp) if rule.granularity is Granularity.MATRIX else None
        return ParamInfo(index, self.inner.param_label(param), tuple(param.shape),
                         str(param.dtype).removeprefix("torch."), group, rule.granularity, cost)

    def _reject_owned(self) -> None:
        """Raise if another live ZeroOptimizer's hooks still take one of these parameters' gradients."""
        for param in self.params.values():
            other = _OWNERS.get(id(param))
            if other is not None and other is not self:
                raise ValueError(
                    f"Invalid params: {self.inner.param_label(param)} is already managed by another "
                    "ZeroOptimizer, whose backward hooks take its gradient (this optimizer would step "
                    "with zeros); call close() on that optimizer first"
                )

    def close(self) -> None:
        """Release the parameters: remove the backward hooks, wait for reductions in flight
        and drop the gradient buffers and optimizer state.

        The parameters keep their values (views of this optimizer's storages) and
        may be given to a new optimizer; this one can no longer step. Idempotent.
        """
        if getattr(self, "closed", True):
            return
        self.wait_for_params()
        self.reducer.close()
        for buffers in self.storages:
            buffers.grad_flat = buffers.grad_area = None
            buffers.states = {}
        for bucket in self.buffers:
            bucket.release_grad_flat()
        self.comm.pool.clear()
        for param in self.params.values():
            if _OWNERS.get(id(param)) is self:
                del _OWNERS[id(param)]
        self.closed = True

    # ------------------------------------------------------------------ setup

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_constructed", False):
            raise RuntimeError(
                "ZeroOptimizer does not support add_param_group after construction: the shard "
                "plan covers the parameters given at construction; build a new optimizer"
            )
        super().add_param_group(param_group)

    def _verify_same_params(self, infos: list[ParamInfo]) -> None:
        """Raise, on every rank, if ranks disagree on parameters or settings (instead of hanging).

        One all-gather of a fixed-size digest of the plan and of every setting that
        decides which collectives run; only on a mismatch do ranks exchange the
        readable descriptions to name the first difference.
        """
        if not self.comm.active:
            return
        settings = self._settings()
        mine = digest_tensor(repr((self.plan.fingerprint(), sorted(settings.items()))), self.device)
        gathered = torch.empty(self.comm.world_size * mine.numel(), dtype=mine.dtype, device=self.device)
        self.comm.all_gather_into(gathered, mine)
        if bool((gathered.view(self.comm.world_size, -1) == mine).all()):
            return
        views = self.comm.all_gather_objects(([i.describe() for i in infos], settings))
        for position in range(max(len(v[0]) for v in views)):
            column = [v[0][position] if position < len(v[0]) else "<missing>" for v in views]
            if len(set(column)) > 1:
                detail = "; ".join(f"rank {r}: {c}" for r, c in enumerate(column))
                raise ValueError(
                    f"Invalid params: ranks hold different parameters; first mismatch at "
                    f"trainable parameter #{position}: {detail}"
                )
        keys = list(dict.fromkeys(key for v in views for key in v[1]))
        for key in keys:
            values = [v[1].get(key, "<not set>") for v in views]
            if len(set(values)) > 1:
                listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise ValueError(f"Invalid {key}: ranks disagree ({listed})")
        raise ValueError("Invalid params: ranks disagree on parameter groups or granularity")

    def _settings(self) -> dict[str, str]:
        """Every setting that changes the result or the collectives, as text to compare across ranks."""
        settings = {"stage": self.stage, "optimizer_class": type(self.inner).__qualname__,
                    "reduce_dtype": self.precision.reduce_dtype, "master_dtype": self.precision.master_dtype,
                    "bucket_numel": self.plan.bucket_numel, "max_grad_norm": self.max_grad_norm,
                    "matrix_layout": self.plan.matrix_layout}
        for index, group in enumerate(self.param_groups):
            for key, value in sorted(group.items()):
                if key not in ("params", "param_names"):
                    settings[f"param_groups[{index}]['{key}']"] = value
        return {key: repr(value) for key, value in settings.items()}

    def _make_storage(self, storage: Storage) -> StorageBuffers:
        first = self.params[storage.slots[0].param]
        param_flat = torch.zeros(storage.flat_numel, dtype=first.dtype, device=self.device)
        for slot in storage.slots:
            param_flat[slot.offset : slot.offset + slot.numel].copy_(self.params[slot.param].detach().reshape(-1))
        self.comm.broadcast(param_flat, src=0)
        for slot in storage.slots:
            param = self.params[slot.param]
            param.data = param_flat[slot.offset : slot.offset + slot.numel].view(param.shape)
        start, end = storage.area_bounds(self.comm.rank)
        area = param_flat[start:end]
        wide = torch.promote_types(first.dtype, self.precision.master_dtype)
        master = area if wide == first.dtype else area.to(wide)
        reduce_dtype = self.precision.reduce_dtype or first.dtype
        return StorageBuffers(storage, self.comm.rank, param_flat, master, reduce_dtype, self.sharding,
                              self.comm.pool, poison=self.comm.poison)

    def _expose_grads(self) -> None:
        for buffers in self.storages:
            self.sharding.expose(buffers, self.params)

    # ------------------------------------------------------------------- step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's; also discards the gradients of a failed backward (see :meth:`step`)."""
        super().zero_grad(set_to_none)
        if self.reducer.failed is not None:
            self.reducer.discard()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (full size, in ``p.grad``) without communicating.

        Run every micro-batch but the last inside; the last backward, outside,
        reduces the accumulated sum once.
        """
        previous = self.reducer.sync_enabled
        self.reducer.sync_enabled = False
        try:
            yield
        finally:
            self.reducer.sync_enabled = previous

    def wait_for_params(self) -> None:
        """Wait for the parameter all-gathers in flight (``overlap_gather``): then every parameter is valid."""
        self.param_gather.wait_all()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if self.closed:
            raise RuntimeError("ZeroOptimizer.step(): this optimizer was closed; build a new one")
        self.wait_for_params()
        if self.reducer.failed is not None:
            raise RuntimeError(f"ZeroOptimizer.step(): a backward failed since the last step ({self.reducer.failed}); "
                               "its gradients are incomplete: call zero_grad() and run backward again")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with record_function("shardopt.reduce_wait"):
            self.reducer.finish()
        grads = self._grad_regions()
        with record_function("shardopt.grad_norm"):  # local norms, the finite check, one small all-reduce
            stats = torch.zeros(2, dtype=torch.float64, device=self.device)
            for grad in grads:
                if grad.numel():
                    stats[0] += torch.linalg.vector_norm(grad, dtype=torch.float32).double() ** 2
            finite = bool(torch.isfinite(stats[0]))  # the step's one host synchronisation before the all-reduce
            if not finite:
                # fp32 squares overflow above ~1.8e19: tell large finite gradients from
                # non-finite ones in float64 (this branch is the rare one).
                stats[0] = sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads if g.numel())
                finite = bool(torch.isfinite(stats[0]))
            stats[1] = float(not finite)
            self.comm.all_reduce_sum(stats)
            sum_sq, num_nonfinite = stats.tolist()
        self.last_grad_norm = math.sqrt(sum_sq) if math.isfinite(sum_sq) else math.inf
        if num_nonfinite > 0:
            self.num_skipped_steps += 1
            self._return_casts(grads)
            self.reducer.reset()
            return loss
        if self.max_grad_norm is not None:
            coef = self.max_grad_norm / (self.last_grad_norm + 1e-6)
            if coef < 1.0:
                with record_function("shardopt.clip"):
                    torch._foreach_mul_([g for g in grads if g.numel()], coef)
        with record_function("shardopt.update"):
            self._apply_rules(grads)
            for storage in self.storages:
                if storage.master_separate():
                    used = storage.used_numel
                    storage.param_area()[:used].copy_(storage.master[:used])
        self._return_casts(grads)
        self.param_gather.launch()
        self.reducer.reset()
        return loss

    def _grad_regions(self) -> list[Tensor]:
        """Each storage's used gradient area, in the master dtype (a cast lent by the pool
        until :meth:`_return_casts`, where the reduce dtype is narrower)."""
        out = []
        for buffers in self.storages:
            grad = buffers.ensure_grad_area()[: buffers.used_numel]
            if grad.dtype != buffers.master.dtype:
                grad = self.comm.pool.take(grad.numel(), buffers.master.dtype, grad.device, kind="cast").copy_(grad)
            out.append(grad)
        return out

    def _return_casts(self, grads: list[Tensor]) -> None:
        for grad in grads:
            if self.comm.pool.lends(grad):
                self.comm.pool.give(grad)

    def ensure_states(self, buffers: StorageBuffers) -> None:
        """Allocate ``buffers``' states if needed."""
        buffers.allocate_states(self._state_specs(buffers.storage.group))

    def _apply_rules(self, grads: list[Tensor]) -> None:
        for group_index, group in enumerate(self.param_groups):
            rule = self.inner.rule_for_group(group)
            params, group_grads, states = [], [], []
            for buffers, grad in zip(self.storages, grads):
                if buffers.storage.group != group_index:
                    continue
                self.ensure_states(buffers)
                if buffers.storage.granularity is Granularity.MATRIX:
                    self.matrix_steps[buffers.storage.index](rule, group, grad)
                elif rule.fused_kernel and group.get("fused"):
                    # torch's fused CPU kernels round an element differently in their vector
                    # loop and their scalar tail, which falls at each tensor's end: one view
                    # per parameter piece gives the tails torch.optim gives (bitwise equal at
                    # world size 1; parameters cut by an area boundary differ in the last bits).
                    bounds = [(p.offset, p.offset + p.numel) for p in buffers.storage.pieces(self.comm.rank)]
                    for view in region_views(buffers.master[: buffers.used_numel], grad, buffers.states, bounds):
                        for target, item in zip((params, group_grads, states), view):
                            target.append(item)
                else:
                    params.append(buffers.master[: buffers.used_numel])
                    group_grads.append(grad)
                    states.append(buffers.states)
            if params:
                apply_update(rule, params, group_grads, states, group)

    # ---------------------------------------------------------- introspection

    def memory_report(self) -> dict[str, Any]:
        """This rank's bytes by category, measured from the tensors allocated now."""
        param_flats = [s.param_flat for s in self.storages]
        separate = [s.master for s in self.storages if s.master_separate()]
        # Kept gradients: the area is a view of the flat buffer (counted once).
        grads = [t for s in self.storages for t in (s.grad_flat, s.grad_area)]
        states: dict[str, int] = {}
        for buffers in self.storages:
            for name, tensor in buffers.states.items():
                states[name] = states.get(name, 0) + storage_bytes([tensor])
        padding = sum(s.storage.padding_numel * s.param_flat.element_size() for s in self.storages)
        pool = self.comm.pool
        report = {
            "params": storage_bytes(param_flats),
            "grads": storage_bytes(grads),
            "master_params": storage_bytes(separate),
            "optimizer_states": states,
            # What the buffer pool (shardopt.zero.pool) keeps for the next step, by kind: the
            # stage-2 gradient buffers (buckets, and matrices cast to the reduce dtype), step()'s
            # casts of the gradient areas to the master dtype, and the backend's staging (gloo's
            # all-to-all receive buffers, the native chunked all-gather's flat buffers).
            "comm_buffers": pool.held_bytes("reduce"),
            "grad_cast": pool.held_bytes("cast"),
            "staging_buffers": pool.held_bytes("receive") + pool.held_bytes("gather"),
            # Gradient buffers lent at once at their peak in the last backward (sharded gradients).
            "comm_buffers_peak": self.reducer.peak_buffer_bytes,
            "padding": padding,
        }
        report["total"] = (
            report["params"] + report["grads"] + report["master_params"] + sum(states.values())
            + report["comm_buffers"] + report["grad_cast"] + report["staging_buffers"]
        )
        return report

    def comm_stats(self) -> dict[str, int]:
        """Bytes this rank sent per collective kind since construction (ring model)."""
        return dict(self.comm.bytes_sent)

    # ------------------------------------------------------------ checkpoints

    def sharded_state(self) -> checkpoint.ShardedState:
        """What checkpoints read and write of this optimizer (plan, this rank's buffers, param
        groups, state declarations, communicator, parameters, rule names): the interface
        :mod:`shardopt.checkpoint` and :mod:`shardopt.zero.checkpoint` work through."""
        self.wait_for_params()  # every checkpoint path (state_dict(), load_state_dict(), ...) comes here
        return checkpoint.ShardedState(
            self.plan, self.storages, self.param_groups, self._state_specs, self.comm, params=self.params,
            rule_name=lambda group: self.inner.rule_for_group(self.param_groups[group]).name)

    _sharded_state = sharded_state

    def _state_specs(self, group: int) -> tuple[StateSpec, ...]:
        hp = self.param_groups[group]
        return self.inner.rule_for_group(hp).state_specs(hp)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the optimizer state, with metadata checked on load."""
        return checkpoint.sharded_state_dict(
            self._sharded_state(), {"stage": self.stage, "num_skipped_steps": self.num_skipped_steps})

    def full_state_dict(self, *, all_ranks: bool = False) -> dict[str, Any] | None:
        """The unsharded state in torch.optim's format on rank 0 (``None`` elsewhere).

        A collective: every rank must call it.
        """
        return checkpoint.full_state_dict(self._sharded_state(), all_ranks=all_ranks)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a shard from :meth:`state_dict`, or a full torch.optim-format state dict
        (from :meth:`full_state_dict` at any world size, or from the single-process
        optimizer)."""
        shard = checkpoint.load_state_dict(self._sharded_state(), state_dict)
        if shard is not None:
            self.num_skipped_steps = shard.get("num_skipped_steps", 0)
