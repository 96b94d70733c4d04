"""The memory planner against publications, against its own formulas, and against the runtime.

* ZeRO's worked example (Rajbhandari et al. 2020, section 5 / Figure 1).
* Every preset's shapes sum to the published parameter count.
* Korthikanti et al. 2022, Table 2, row by row.
* ``ZeroOptimizer.memory_report()`` on spawned gloo ranks, world sizes 1-4,
  every optimizer, stages 1-2: the planner's bytes per rank are equal, exactly.
"""

from __future__ import annotations

import functools
import json
import math
import time

import memory_workers as w
import pytest
import torch
from dist_harness import run_ranks
from plan_infos import param_info
from torch import nn

from shardopt import ParamInfo, plan_shards, planner
from shardopt.planner import accounting, activations, presets
from shardopt.rules import Granularity, MuonRule
from shardopt.zero.schedule import window_numel

# ---------------------------------------------------------------- publications


@pytest.mark.parametrize(("stage", "expected_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_worked_example(stage, expected_gb):
    # 7.5B parameters, 64 ranks, mixed-precision Adam: (2 + 2 + 12) psi / sharding (ZeRO, Figure 1).
    r = planner.estimate(7_500_000_000, optimizer="adam", precision="mixed", zero_stage=stage, dp=64)
    assert round(r.rank.model_states / 1e9, 1) == expected_gb
    # Stage 3 is FSDP2: its fp32 shards are the parameters and the master copy (4 + 4 + 8 psi).
    master = r.rank.params if stage == 3 else r.rank.master_params
    assert master + sum(r.rank.optimizer_states.values()) == pytest.approx(
        12 * 7.5e9 / (1 if stage == 0 else 64), rel=1e-5)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_preset_shapes_sum_to_published_total(name):
    preset = presets.PRESETS[name]
    arch = preset.architecture()
    shapes = presets.param_shapes(arch)
    assert sum(math.prod(s) for _, s in shapes) == preset.total_params
    assert len({n for n, _ in shapes}) == len(shapes)
    # Splitting by tp and pp loses nothing but replicated tensors are counted per rank.
    if arch.num_layers % 2 == 0:
        stages = [presets.param_shapes(arch, pp=2, stage=s) for s in (0, 1)]
        tied_copy = arch.vocab_size * arch.hidden_size if arch.tie_embeddings else 0
        assert sum(math.prod(s) for st in stages for _, s in st) == preset.total_params + tied_copy


def test_presets_match_closed_forms():
    # LLaMA: L (2h q_width + 2h kv_width + 3 h f + 2h) + 2 v h + h; GPT-3: 12 L h^2 + 13 L h + v h + 2048 h + 2h.
    for name in ("llama2-7b", "llama2-70b", "llama3-8b", "llama3-70b", "llama3.1-405b"):
        a = presets.PRESETS[name].architecture()
        h, kv = a.hidden_size, a.num_kv_heads * a.head_dim
        layer = 2 * h * h + 2 * h * kv + 3 * h * a.intermediate_size + 2 * h
        assert a.num_layers * layer + 2 * a.vocab_size * h + h == presets.PRESETS[name].total_params
    h, layers = 12288, 96
    assert 12 * layers * h * h + 13 * layers * h + 50257 * h + 2048 * h + 2 * h == 174_604_259_328


def _llama_module(arch: presets.Architecture) -> nn.Module:
    """transformers' LlamaForCausalLM module tree (names and registration order), no forward."""

    def linear(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, bias=False)

    h, q, kv, f = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, \
        arch.intermediate_size
    layers = nn.ModuleList()
    for _ in range(arch.num_layers):
        layer = nn.Module()
        layer.self_attn = nn.Module()
        for name, (i, o) in {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}.items():
            setattr(layer.self_attn, name, linear(i, o))
        layer.mlp = nn.Module()
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj = linear(h, f), linear(h, f), linear(f, h)
        layer.input_layernorm, layer.post_attention_layernorm = nn.RMSNorm(h), nn.RMSNorm(h)
        layers.append(layer)
    root = nn.Module()
    root.model = nn.Module()
    root.model.embed_tokens = nn.Embedding(arch.vocab_size, h)
    root.model.layers, root.model.norm = layers, nn.RMSNorm(h)
    root.lm_head = linear(h, arch.vocab_size)
    return root


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_meta_model_plans_like_its_config(optimizer):
    arch = presets.PRESETS["llama2-70b"].architecture()
    with torch.device("meta"):
        module = _llama_module(arch)
    assert [(n, tuple(p.shape)) for n, p in module.named_parameters()] == presets.param_shapes(arch)
    kwargs = dict(optimizer=optimizer, zero_stage=2, dp=64)
    from_preset = planner.estimate("llama2-70b", **kwargs)
    registration = planner.estimate(module, **kwargs)
    # A module gives no forward order: the planner assumes the reverse of registration,
    # which for pre-norm blocks launches buckets earlier than the preset's use order.
    assert [r.model_states for r in registration.ranks] == [r.model_states for r in from_preset.ranks]
    names = [n for n, _ in module.named_parameters()]
    from_module = planner.estimate(module, grad_arrival=presets.backward_order(names), **kwargs)
    assert from_module.ranks == from_preset.ranks
    assert from_module.total_params == 68_976_648_192
    assert from_module.matrix_params == from_preset.matrix_params


def test_chapter_claims_for_llama2_70b():
    # The chapter: "params (140GB) + optimizer state (280GB) = 420GB"; "Muon saves 50%".
    adamw_report = planner.estimate("llama2-70b", optimizer="adamw", zero_stage=0)
    adamw = adamw_report.rank
    muon = planner.estimate("llama2-70b", optimizer="muon", zero_stage=0).rank
    psi = 68_976_648_192
    assert (adamw.params, adamw.grads, adamw.master_params) == (2 * psi, 2 * psi, 4 * psi)
    assert sum(adamw.optimizer_states.values()) == 8 * psi + 4 * adamw_report.num_buckets  # + fp32 steps
    assert round(adamw.model_states / 1e12, 2) == 1.10  # 16 bytes per parameter
    moments = [sum(r.optimizer_states.values()) for r in (adamw, muon)]
    with_master = [m + r.master_params for m, r in zip(moments, (adamw, muon))]
    assert round(1 - moments[1] / moments[0], 2) == 0.50
    assert round(1 - with_master[1] / with_master[0], 2) == 0.33
    assert round(1 - muon.model_states / adamw.model_states, 2) == 0.25


@pytest.mark.parametrize("name", ["llama3-70b", "qwen2.5-72b", "mixtral-8x7b", "gpt3-175b"])
def test_tensor_and_pipeline_splits(name, tmp_path):
    arch = presets.PRESETS[name].architecture()
    r = planner.estimate(name, optimizer="adamw", zero_stage=1, dp=4, tp=8, pp=4, sequence_parallel=True)
    stage = presets.param_shapes(arch, tp=8, pp=4, stage=r.pipeline_stage)
    assert r.stage_params == sum(math.prod(s) for _, s in stage)
    # Column-parallel rows and the vocabulary are cut 8 ways; norms are whole.
    whole = presets.param_shapes(arch)
    assert sum(math.prod(s) for _, s in presets.param_shapes(arch, tp=8)) < sum(math.prod(s) for _, s in whole) / 7
    # A config.json file gives what its preset gives.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(presets.PRESETS[name].config)))
    from_file = planner.estimate(str(path), optimizer="adamw", zero_stage=1, dp=4, tp=8, pp=4, sequence_parallel=True)
    assert from_file.per_rank_bytes() == r.per_rank_bytes()


# ---------------------------------------------------------------- activations (Korthikanti et al. 2022)

GPT = presets.from_config({"model_type": "gpt2", "n_embd": 1024, "n_layer": 4, "n_head": 16, "n_positions": 2048,
                           "vocab_size": 50257}, "gpt")


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_table2_rows(t):
    s, b, h, a = 2048, 2, GPT.hidden_size, GPT.num_heads
    sbh = s * b * h

    def layer(**kw):
        return activations.layer_bytes(GPT, seq_len=s, micro_batch=b, tp=t, **kw)

    if t == 1:
        assert layer() == sbh * 34 + 5 * a * s * s * b  # sbh(34 + 5as/h)
    assert layer() == math.ceil(sbh * 10 + sbh * 24 / t + 5 * a * s * s * b / t)  # sbh(10 + 24/t + 5as/(ht))
    assert layer(sequence_parallel=True) == math.ceil(sbh * 34 / t + 5 * a * s * s * b / t)
    assert layer(recompute="selective") == math.ceil(sbh * (10 + 24 / t))
    assert layer(recompute="selective", sequence_parallel=True) == math.ceil(sbh * 34 / t)
    assert layer(recompute="full") == 2 * sbh


def test_swiglu_gqa_and_pipeline_assumptions():
    arch = presets.PRESETS["llama2-70b"].architecture()
    s, h = 4096, 8192
    terms = activations.layer_terms(arch, s, 1)
    # No dropout: 4 (norms) + 2 (QKV in) + 2 (MLP in); Q 2h, K and V 2*1024 each, proj in 2h; SwiGLU 3 x 2f.
    assert terms.replicated == 8 * s * h
    assert terms.split == s * (2 * h + 4 * 1024 + 2 * h) + 3 * 2 * s * 28672
    assert terms.quadratic == 2 * 64 * s * s
    one = activations.activation_bytes(arch, seq_len=s, pp=1, recompute="selective")
    first = activations.activation_bytes(arch, seq_len=s, pp=4, stage=0, recompute="selective")
    last = activations.activation_bytes(arch, seq_len=s, pp=4, stage=3, recompute="selective")
    assert first["layers"] == one["layers"]  # 4 in flight x 20 layers = 80 layers (1F1B)
    assert last["layers"] == one["layers"] // 4
    assert last["fp32 logits"] == 4 * s * 32000


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(model="llama9"), "presets: gpt3-175b, llama2-13b"),
    (dict(model="llama2-7b", optimizer="adamax"), "expected one of sgd, momentum, nesterov"),
    (dict(model="llama2-70b", tp=3), "Invalid tp: 3 does not divide num_attention_heads=64"),
    (dict(model="llama2-70b", tp=16), "Invalid tp: 16 does not divide num_key_value_heads=8"),
    (dict(model="llama2-70b", pp=3), "Invalid pp: 3 does not divide num_hidden_layers=80"),
    (dict(model="llama2-7b", zero_stage=4), "Invalid zero_stage: 4"),
    (dict(model="llama2-7b", precision="fp8"), "expected one of fp32, bf16, mixed"),
    (dict(model="llama2-7b", gpu="h800"), "expected one of a100-40gb"),
    (dict(model="llama2-7b", recompute="some"), "expected one of none, selective, full"),
    (dict(model=10**9, optimizer="muon"), "muon needs parameter shapes"),
    (dict(model={"model_type": "llama", "hidden_size": 64}), "config: field 'num_attention_heads' is missing"),
    (dict(model={"model_type": "llama", "hidden_size": 64, "num_attention_heads": "8"}),
     "field 'num_attention_heads' must be a positive integer, got '8'"),
    (dict(model={"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 3}),
     "field 'num_key_value_heads' (= 3) must divide num_attention_heads (= 8)"),
    (dict(model={"model_type": "deepseek_v3", "kv_lora_rank": 512}), "field 'kv_lora_rank'"),
    (dict(model={"model_type": "t5"}), "field 'model_type' is 't5'; supported"),
])
def test_bad_input_names_the_problem(kwargs, message):
    model = kwargs.pop("model")
    with pytest.raises(ValueError) as err:  # noqa: PT011 - the message is checked as a substring below
        planner.estimate(model, **kwargs)
    assert message in str(err.value)


def test_malformed_config_file_names_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, '
                    '"num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": -5}')
    with pytest.raises(ValueError, match=r"config.json: field 'vocab_size' must be a positive integer, got -5"):
        planner.estimate(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        planner.estimate(str(path))


# ---------------------------------------------------------------- plan reading


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8, 64])
def test_used_by_rank_equals_the_plan(world_size):
    shapes = [(7,), (300,), (13, 17), (1,), (64, 64), (5000,), (3, 10, 7)]
    infos = [param_info(i, f"p{i}", s, "float32", i % 2, Granularity.MATRIX if i % 2 and len(s) > 1
                        else Granularity.ELEMENTWISE) for i, s in enumerate(shapes * 3)]
    infos = [i if i.granularity is Granularity.MATRIX or i.group == 0 else
             ParamInfo(i.index, i.name, i.shape, i.dtype, 2) for i in infos]
    for bucket_numel in (50, 400, 10_000):
        for layout in ("balanced", "whole"):
            plan = plan_shards(infos, world_size, bucket_numel=bucket_numel, matrix_layout=layout)
            for storage in plan.storages:
                assert planner.used_by_rank(storage) == [storage.used_area_numel(r) for r in range(world_size)]


def test_70b_at_512_ranks_is_fast():
    planner.estimate("llama2-7b", dp=8)  # warm imports
    start = time.perf_counter()
    planner.estimate("llama2-70b", optimizer="adamw", zero_stage=3, dp=512)
    planner.estimate("llama2-70b", optimizer="muon", zero_stage=2, dp=512, bucket_numel=10**9)
    assert time.perf_counter() - start < 2 * 2.0


# ---------------------------------------------------------------- against measurement


@functools.cache
def measured() -> list[dict]:
    return run_ranks(w.all_cases, 4, timeout=300)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_planner_equals_memory_report_on_every_rank(world_size):
    with torch.device("meta"):
        model = w.PlanNet()
    named = [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]
    for label, optimizer, stage, dtype, precision, bucket_numel, layout in w.CASES:
        precision = w.precision_of(dtype, precision)
        got = [measured()[rank][world_size][label] for rank in range(world_size)]
        # Gradients arrive in autograd's order; the planner replays the reducer on it.
        arrival = got[0]["grad_arrival"]
        r = planner.estimate(model, optimizer=optimizer, precision=precision, zero_stage=stage, dp=world_size,
                            bucket_numel=bucket_numel, grad_arrival=arrival, matrix_layout=layout, backend="gloo")
        infos, groups = planner.param_infos(named, optimizer, dtype)
        plan, _ = planner.plan_rank_bytes(infos, groups, precision, stage, world_size, bucket_numel,
                                         matrix_layout=layout)
        for rank in range(world_size):
            planned, measured_rank = r.ranks[rank], got[rank]
            report = measured_rank["report"]
            where = f"{label} at world size {world_size}, rank {rank}"
            assert measured_rank["layout"] == w.layout_of(plan), where
            assert measured_rank["specs"] == [(type(g).__name__, [s.name for s in g.state_specs(hp)])
                                              for g, hp in groups], where
            assert (report["params"], report["grads"], report["master_params"]) == (
                planned.params, planned.grads, planned.master_params), where
            assert report["optimizer_states"] == dict(planned.optimizer_states), where
            # The buffer pool keeps the stage-2 gradient buffers for the next step: the planner
            # replays its lending; step()'s casts are kept in it too.
            assert report["comm_buffers"] == planned.buffers.get("grad buffer pool", 0), where
            assert report["grad_cast"] == planned.buffers.get("step grad cast", 0), where
            # gloo's receive buffers of the stage-2 all-to-all reductions, replayed per rank.
            assert report["staging_buffers"] == planned.buffers.get("gloo staging", 0), where
            assert measured_rank["grad_arrival"] == arrival, where
            assert measured_rank["grad_copies"] == planned.buffers.get("p.grad copies", 0), where
            assert measured_rank["grad_cast"] == planned.buffers.get("step grad cast", 0), where
            if stage == 2 and world_size > 1:
                item = torch.finfo(getattr(torch, precision.reduce)).bits // 8
                index = {info.name: info.index for info in infos}
                order = [index[name] for name in arrival if name in index]
                assert measured_rank["grad_window_peak"] == window_numel(plan, order) * item, where
                assert report["comm_buffers"] > 0, where


def test_muon_workspace_is_the_largest_batch_with_what_the_loop_still_holds():
    # The terms of MuonRule.workspace_bytes' docstring, spelled out; tests/test_matrix_workspace.py
    # measures the same numbers. bf16 Newton-Schulz: one matrix per batch. Per matrix: its fp32
    # Nesterov update + 2 X + 2 m^2 in bf16, + the previous batch's bf16 output (MatrixStep's
    # `updates`); a 3-D stack's norms are freed before the loop. finish: the fp32 update, the bf16 output and
    # the fp32 copy torch's CPU add_ makes of it.
    rule = MuonRule()
    shapes = [(64, 32), (16, 16), (2, 8, 4)]
    hp = {**rule.defaults, "nesterov": True, "ns_dtype": "bfloat16"}

    def single(rows, cols, count=1):
        return count * (rows * cols * 4 + (2 * rows * cols + 2 * min(rows, cols) ** 2) * 2)

    def finish(rows, cols, count=1):
        return count * rows * cols * (4 + 2 + 4)

    assert rule.workspace_bytes(shapes, hp, torch.float32) == max(
        single(64, 32), finish(64, 32), 64 * 32 * 2 + single(16, 16), 16 * 16 * 2 + single(8, 4, 2))
    assert rule.workspace_bytes(shapes, {**hp, "nesterov": False}, torch.float32) == 64 * 32 * 2 * 2 + 2 * 32 * 32 * 2
    # fp32: same shapes form one batch: the directions (held by MatrixStep) and the
    # torch.cat stack are alive through Newton-Schulz (the stack's norms are not).
    x, gram = 64 * 32, 32 * 32
    fp32 = {**hp, "ns_dtype": "float32"}
    assert rule.workspace_bytes([(64, 32)] * 3, fp32, torch.float32) == (
        3 * x * 4 * 2 + 3 * (2 * x + 2 * gram) * 4)
    # A tall 2-D matrix of at least 60 x 60: the first addmm copies the transposed X
    # through torch's 60 x 60 block buffer.
    x, gram = 100 * 70, 70 * 70
    assert rule.workspace_bytes([(100, 70)], {**fp32, "nesterov": False}, torch.float32) == (
        (2 * x + 2 * gram) * 4 + 60 * 60 * 4)
    assert rule.workspace_bytes([], hp, torch.float32) == 0


def test_planner_workspace_is_the_rules_largest_over_storages():
    # The planner asks the rule, per matrix storage of a rank, in MatrixStep's order.
    named = [(f"layers.{i}.weight", shape, True) for i, shape in enumerate([(64, 32), (16, 16), (3, 8, 16)] * 2)]
    infos, groups = accounting.param_infos(named, "muon", "float32", {"ns_dtype": "float32"})
    (rule, hp), = groups
    plan, ranks = accounting.plan_rank_bytes(infos, groups, accounting.PRECISIONS["fp32"], 1, 1)
    (storage,) = plan.storages
    order = [plan.param(piece.param).shape for piece in storage.pieces(0)]
    assert sorted(order) == sorted(shape for _, shape, _ in named)
    assert ranks[0].buffers["muon workspace"] == rule.workspace_bytes(order, hp, torch.float32) > 0
