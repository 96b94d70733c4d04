"""Rank programs for ``test_planner_fsdp``: what a real FSDP2 (x TP) run allocates, per rank.

The model is a tiny Llama with Hugging Face parameter names, so the planner can
be given the same model as a ``config.json`` dict (:data:`CONFIG`) and split
it the way :func:`shardopt.planner.presets.param_shapes` does: q/k/v and
gate/up column-wise, o and down row-wise, embedding and head by vocabulary
rows, norms replicated. Its sizes make every dim-0 shard uneven somewhere
(vocabulary 23, 3 key/value rows per TP rank, 7 MLP rows per TP rank), so
FSDP2's padding shows.

Measured per rank, after a second training step:

* model states, exactly: the bytes of each sharded parameter's local storage
  (FSDP2 pads dim 0 to a multiple of the data-parallel size), of the sharded
  gradients' storages (one reduce-scatter output per FSDP group), and of every
  optimizer state tensor (``to_local()`` storages; ``step`` is a CPU scalar);
* FSDP2's transients during the second forward and backward, sampled at the
  points where FSDP2 allocates or frees them (its own references, read from
  ``FSDPParamGroup`` and the shared ``FSDPCommContext``): the per-parameter
  unsharded parameters (``FSDPParam.all_gather_outputs``), the flat
  all-gather outputs (``_all_gather_result`` and the forward's deferred
  ``all_gather_state``) with the mixed-precision copy-in, the reduce-scatter
  inputs (``reduce_scatter_states``) with a reduce-dtype output that is cast
  away, and the unsharded gradients autograd accumulates before a group's
  reduce-scatter. Each category's peak and the peak of their sum.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 12, 2, 4, 2, 14, 23
HEAD_DIM = HIDDEN // HEADS
BATCH, SEQ = 4, 6
CONFIG = {"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "num_key_value_heads": KV_HEADS, "intermediate_size": FFN, "vocab_size": VOCAB,
          "tie_word_embeddings": False}
# FSDP units, as the planner's default for an architecture: every decoder layer, then the root.
UNITS = [f"model.layers.{i}" for i in range(LAYERS)]
# (label, optimizer, planner precision); the model is fp32, "mixed" adds
# MixedPrecisionPolicy(param_dtype=bf16), whose reduce dtype defaults to bf16.
# FSDP2's buffers do not depend on the optimizer, nor the states on the compute
# dtype (the shards stay fp32): two scenarios cover both precisions and both rule kinds.
SCENARIOS = [("adamw/fp32", "adamw", "fp32"), ("muon/mixed", "muon", "mixed")]
CATEGORIES = ("fsdp unsharded params", "fsdp all-gather", "fsdp unsharded grads",
              "fsdp reduce-scatter")


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # Under TP each rank holds whole heads: count them from the local width.
        q, k, v = (t.view(b, s, -1, HEAD_DIM).transpose(1, 2) for t in (self.q_proj(x), self.k_proj(x),
                                                                         self.v_proj(x)))
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn, self.mlp = Attention(), MLP()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(HIDDEN), nn.RMSNorm(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """``LlamaForCausalLM``'s module tree and parameter order, at toy size."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.model.norm = nn.RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.norm(h))


def _shard(model: TinyLlama, tp: int, precision: str) -> tuple[int, int]:
    """FSDP2 over dp (x Megatron TP); returns (dp index, dp size)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    if tp > 1:
        plan: dict[str, Any] = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                                "lm_head": ColwiseParallel(output_layouts=Replicate())}
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            plan.update({p + n: ColwiseParallel() for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                              "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")})
            plan.update({p + n: RowwiseParallel() for n in ("self_attn.o_proj", "mlp.down_proj")})
        parallelize_module(model, mesh["tp"], plan)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if precision == "mixed" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"], mp_policy=mp)
    fully_shard(model, mesh=mesh["dp"], mp_policy=mp)
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors by their local tensor)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        seen[storage.data_ptr() or id(local)] = storage.nbytes()
    return sum(seen.values())


class Transients:
    """Peaks of FSDP2's transient buffers, read from FSDP2's own references.

    Sampled wherever one of them is allocated (all-gather and reduce-scatter
    buffers through the groups' ``allocate``, unsharded parameters through
    ``FSDPParam.alloc_all_gather_outputs``) and where autograd's unsharded
    gradients are complete (the entry of ``post_backward`` and of
    ``foreach_reduce``): between those points the tracked bytes only fall.
    """

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives, _fsdp_param, _fsdp_param_group

        self.groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
        self.peaks = dict.fromkeys((*CATEGORIES, "sum"), 0)
        self.active = False
        self.copies: list[weakref.ref] = []  # mixed-precision all-gather copy-in
        self.reduce_live: list[weakref.ref] = []  # inside foreach_reduce: input, and a cast-away output
        # Flat all-gather outputs: alive while FSDP2 references them (pending, deferred, or
        # just allocated inside foreach_all_gather, before _all_gather_result holds it).
        self.gathers: list[weakref.ref] = []
        self.pending: list[torch.Tensor] = []  # foreach_reduce's unsharded_grads list (cleared after copy-in)
        self.restore: list[tuple[object, str, object]] = []
        tracker = self

        def patch(owner: object, name: str, make) -> None:
            original = getattr(owner, name)
            self.restore.append((owner, name, original))
            setattr(owner, name, make(original))

        def gather_inputs(original):
            def wrapped(fsdp_params):
                out = original(fsdp_params)
                casts = [t for ts, p in zip(out, fsdp_params) for t in ts if p.param_dtype is not None]
                tracker.copies = [weakref.ref(t) for t in casts]
                return out
            return wrapped

        def all_gather(original):
            def wrapped(*args, **kwargs):
                try:
                    return original(*args, **kwargs)
                finally:
                    tracker.copies = []
            return wrapped

        def reduce(original):
            def wrapped(fsdp_params, unsharded_grads, *args, **kwargs):
                orig_dtype = args[3]
                tracker.pending, tracker.orig_dtype, tracker.reduce_calls = unsharded_grads, orig_dtype, 0
                tracker.sample()
                try:
                    return original(fsdp_params, unsharded_grads, *args, **kwargs)
                finally:
                    tracker.pending, tracker.reduce_live = [], []
            return wrapped

        def alloc_outputs(original):
            def wrapped(fsdp_param):
                original(fsdp_param)
                tracker.sample()
            return wrapped

        def post_backward(original):
            def wrapped(group, *args):
                tracker.sample()
                return original(group, *args)
            return wrapped

        patch(_fsdp_collectives, "_get_param_all_gather_inputs", gather_inputs)
        patch(_fsdp_param_group, "foreach_all_gather", all_gather)
        patch(_fsdp_param_group, "foreach_reduce", reduce)
        patch(_fsdp_param.FSDPParam, "alloc_all_gather_outputs", alloc_outputs)
        patch(_fsdp_param_group.FSDPParamGroup, "post_backward", post_backward)
        for group in self.groups:
            group._all_gather_comm = _Allocating(group._all_gather_comm, self, "gather")
            group._reduce_scatter_comm = _Allocating(group._reduce_scatter_comm, self, "reduce")

    def close(self) -> None:
        for owner, name, original in reversed(self.restore):
            setattr(owner, name, original)

    def allocated(self, kind: str, tensor: torch.Tensor) -> None:
        if kind == "gather":
            self.gathers = [r for r in self.gathers if r() is not None] + [weakref.ref(tensor)]
        if kind == "reduce":
            # foreach_reduce allocates its input, then its output; the output is the
            # sharded gradients (counted as grads) unless it is cast to the parameters' dtype.
            first = self.reduce_calls == 0
            self.reduce_calls += 1
            if first or tensor.dtype != self.orig_dtype:
                self.reduce_live.append(weakref.ref(tensor))
        self.sample()

    def current(self) -> dict[str, int]:
        ctx = self.groups[0].comm_ctx
        params = sum(t.untyped_storage().nbytes() for g in self.groups for p in g.fsdp_params
                     for t in p.all_gather_outputs)
        flats = [t for t in (r() for r in self.gathers) if t is not None]
        copies = [t for t in (r() for r in self.copies) if t is not None]
        grads = [p._unsharded_param.grad for g in self.groups for p in g.fsdp_params
                 if hasattr(p, "_unsharded_param") and p._unsharded_param.grad is not None]
        reduce = [s.reduce_scatter_input for s in ctx.reduce_scatter_states]
        reduce += [t for t in (r() for r in self.reduce_live) if t is not None]
        out = {"fsdp unsharded params": params, "fsdp all-gather": _storage_bytes(flats + copies),
               "fsdp unsharded grads": _storage_bytes(grads + list(self.pending)),
               "fsdp reduce-scatter": _storage_bytes(reduce)}
        out["sum"] = sum(out.values())
        return out

    def sample(self) -> None:
        if self.active:
            for key, value in self.current().items():
                self.peaks[key] = max(self.peaks[key], value)


class _Allocating:
    """An FSDP2 collective whose ``allocate`` reports each buffer to the tracker."""

    def __init__(self, inner: Any, tracker: Transients, kind: str) -> None:
        self.inner, self.tracker, self.kind = inner, tracker, kind

    def allocate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = self.inner.allocate(*args, **kwargs)
        self.tracker.allocated(self.kind, tensor)
        return tensor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    import shardopt

    if name == "muon":
        return shardopt.Muon(shardopt.muon_param_groups(model), lr=0.02)
    return shardopt.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def measure(tp: int, scenario: tuple[str, str, str]) -> dict[str, Any]:
    """Two steps of one scenario; the bytes this rank holds after them, and the second pass's transient peaks."""
    _label, optimizer, precision = scenario
    torch.manual_seed(0)
    model = TinyLlama()
    dp, dp_size = _shard(model, tp, precision)
    opt = _optimizer(model, optimizer)
    tracker = Transients(model)
    gen = torch.Generator().manual_seed(3)
    try:
        for step in range(2):
            tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen).chunk(dp_size)[dp]
            tracker.active = step == 1  # the first pass also runs FSDP2's lazy initialization
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
            tracker.active = False
            opt.step()
            if step == 0:
                opt.zero_grad()
    finally:
        tracker.close()
    params = list(model.parameters())
    states: dict[str, int] = {}
    for param in params:
        for key, value in opt.state[param].items():
            states[key] = states.get(key, 0) + _storage_bytes([value])
    return {
        "params": _storage_bytes(params),
        "grads": _storage_bytes([p.grad for p in params]),
        "optimizer_states": states,
        "local_numel": sum(p.to_local().numel() for p in params),
        "transients": tracker.peaks,
        "placements": sorted({repr(pl) for p in params for pl in p.placements}),
    }


def all_scenarios(rank: int, world: int, tp: int) -> dict[str, Any]:
    """Every scenario in one spawn; ``tp`` = 1 (FSDP2 alone) or 2 (dp x tp)."""
    import shardopt

    torch.set_num_threads(1)
    shardopt.SGD([nn.Parameter(torch.zeros(1))])  # the first optimizer imports torch._dynamo: once, up front
    out = {"dp_rank": rank // tp, "tp_rank": rank % tp}
    out.update({scenario[0]: measure(tp, scenario) for scenario in SCENARIOS})
    return out
