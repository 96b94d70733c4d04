"""The parameter all-gather after the step, and its deferred waits.

After the update each rank holds new values for its own area of every storage
only; one all-gather per bucket (:class:`~shardopt.zero.plan.Bucket`) brings
every rank's areas to every rank, in place, so the model's parameters (views of
the storages) hold the new weights. :class:`ParamGather` launches all of them
asynchronously at the end of ``step()``, in *forward order* (below), and then
either waits for all of them at once (``overlap_gather=False``, the default) or
leaves them in flight (``overlap_gather=True``) and waits lazily:

* before a module's forward, for the buckets holding that module's *direct*
  parameters (``module.parameters(recurse=False)``): its own weights, not its
  children's, whose own pre-hooks run when they are called. A model compiled
  with ``torch.compile(model)`` runs its submodules inside the compiled graph,
  where no hook sees them: its wrapper's call waits for everything
  (``model.compile()``, in place, keeps the per-module waits; torch warns once
  that ``torch.compile(model)`` sees a global hook, which is this one);
* for everything, in :meth:`ParamGather.wait_all`
  (``ZeroOptimizer.wait_for_params()``), which the optimizer calls wherever it
  reads or writes parameters or storages: the start of ``step()``, every
  checkpoint path (``sharded_state()``, which ``state_dict()``,
  ``full_state_dict()``, ``load_state_dict()`` and :mod:`shardopt.checkpoint` go
  through) and ``close()``.

The all-gathers then run while the host returns from ``step()``, runs
``zero_grad()`` and loads the next batch, and a later layer's while the
earlier layers' forward runs. (A wait blocks the host on gloo; on NCCL it
orders the current CUDA stream after the collective.)

**The rule.** With ``overlap_gather=True`` a parameter holds its new value
once its module's forward pre-hook has run, or after ``wait_for_params()``;
before that it may hold the old value, or a mix being written by the
collective. A parameter read outside its own module's forward (an EMA of the
weights, logging a norm, ``model.state_dict()`` for a checkpoint, a parent
module reading a child's weight before calling the child, a weight tied by
reading another module's attribute), or used by a forward that does not go
through ``Module.__call__`` (``model.forward(x)`` called directly, TorchScript),
must come after ``wait_for_params()``. That is why the option is off unless
asked for.

**Forward order.** Collectives on one process group are issued in launch
order and as a rule finish in it (NCCL runs them on one stream, gloo takes
them from one queue), so the buckets the forward needs first should launch
first. The plan orders buckets for backward
(:func:`~shardopt.zero.layout.plan_shards`: parameters in the order given,
registration order for ``model.parameters()``, and backward runs them in
reverse). Here each bucket launches by the earliest parameter it holds (its
index in the order given; for a chunk of a Muon storage, the earliest in that
chunk), then by bucket index: for elementwise buckets, the reverse of the
plan's order. It depends on the plan alone, so every rank launches the same
collectives in the same order. With several param groups
(``muon_param_groups``) the order is group by group, so a module of a later
group also waits for the earlier groups' buckets: correct, with less overlap.
A wait for one bucket waits for every bucket launched before it, in launch
order, which also releases the ownership records of
:class:`~shardopt.zero.comm.Communicator` in order.

**Why a global hook.** The optimizer is given parameters, not a module, so the
modules that use them are only known when they are called:
:func:`torch.nn.modules.module.register_module_forward_pre_hook` sees every
module call in the process. It is registered only while gathers are pending
(at the end of ``step()``) and removed as soon as the last one is waited for,
normally part-way through the next forward. With nothing pending there is no
hook at all, so the cost is zero (torch's hook-free fast path for every module
call, ours and other models' alike); while gathers are pending each module call
costs one dictionary lookup per direct parameter. Hooks on a module the user
passed would need a second argument naming the model, and either a hook call
per module on every forward, pending or not, or registering and removing one
hook per module every step.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.profiler import record_function

from .buffers import BucketBuffers
from .comm import Communicator
from .plan import ShardPlan
from .schedule import forward_order


def _runs_submodules_unseen(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper, whose graph calls its submodules without hooks."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


class _PreHook:
    """The global forward pre-hook: a weak reference, so a dropped optimizer's hook removes itself."""

    def __init__(self, gather: ParamGather) -> None:
        self.gather = weakref.ref(gather)
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: Any) -> None:
        gather = self.gather()
        if gather is None:
            self.handle.remove()
            return
        gather.before_forward(module)


class ParamGather:
    """Every bucket's parameter all-gather after the step, with its waits now or deferred.

    ``buffers`` are the optimizer's bucket buffers in plan order and ``params``
    its parameters by plan index. ``overlap`` defers the waits (module
    docstring); on one rank there is nothing to gather and it changes nothing.
    """

    def __init__(self, plan: ShardPlan, buffers: list[BucketBuffers], params: dict[int, Tensor],
                 comm: Communicator, *, overlap: bool) -> None:
        self.comm = comm
        self.overlap = overlap and comm.active
        order = forward_order(plan)
        self.order = [buffers[bucket.index] for bucket in order]
        # id(parameter) -> launch position of the last bucket holding any of its elements.
        self._last: dict[int, int] = {}
        for position, bucket in enumerate(order):
            for slot in bucket.slots:
                if slot.numel:
                    key = id(params[slot.param])
                    self._last[key] = max(self._last.get(key, -1), position)
        self._handles: list[Any] = []
        self._done = 0  # handles[:_done] have been waited for
        self._hook: _PreHook | None = None

    @property
    def num_pending(self) -> int:
        """All-gathers launched by the last ``step()`` and not waited for yet."""
        return len(self._handles) - self._done

    def launch(self) -> None:
        """All-gather every bucket's parameters (after the update), in forward order.

        Without ``overlap``, wait for all of them here; with it, return and wait lazily.
        """
        self.wait_all()
        with record_function("shardopt.all_gather"):
            handles = [self._gather(buffers) for buffers in self.order]
            if not self.overlap:
                for handle in handles:
                    handle.wait()
                return
        self._handles, self._done = handles, 0
        if handles and self._hook is None:
            hook = _PreHook(self)
            hook.handle = register_module_forward_pre_hook(hook)
            self._hook = hook

    def _gather(self, buffers: BucketBuffers) -> Any:
        if buffers.bucket.storage.num_chunks == 1:
            return self.comm.all_gather_inplace(buffers.owner.param_flat, async_op=True)
        chunks = buffers.param_chunks
        return self.comm.all_gather_chunks(chunks, chunks[self.comm.rank], async_op=True)

    def before_forward(self, module: nn.Module) -> None:
        """Wait for the buckets holding ``module``'s direct parameters (and all launched before them)."""
        last = -1
        # The direct parameters, as module.parameters(recurse=False) gives them, without its generators.
        for param in module._parameters.values():
            if param is not None:
                last = max(last, self._last.get(id(param), -1))
        if last < 0 and _runs_submodules_unseen(module):
            last = len(self._handles) - 1
        if last >= self._done:
            self.wait_through(last)

    def wait_through(self, position: int) -> None:
        """Wait for the all-gathers launched at ``position`` and before, in launch order."""
        position = min(position, len(self._handles) - 1)
        if position < self._done:
            return
        with record_function("shardopt.gather_wait"):
            try:
                while self._done <= position:
                    self._handles[self._done].wait()
                    self._handles[self._done] = None
                    self._done += 1
            except BaseException:
                # A failed collective (CollectiveFailure: a peer died): stop tracking, so the
                # hook does not raise again in every later module call; the error propagates.
                self._finish()
                raise
        if self._done == len(self._handles):
            self._finish()

    def wait_all(self) -> None:
        """Wait for every pending all-gather: afterwards every parameter holds its new value."""
        if self._done < len(self._handles):
            self.wait_through(len(self._handles) - 1)

    def _finish(self) -> None:
        self._handles, self._done = [], 0
        if self._hook is not None:
            self._hook.handle.remove()
            self._hook = None
