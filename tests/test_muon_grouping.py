"""muon_param_groups on real model shapes built from torch.nn: module type and shape
decide, names override; conv kernels of any dimensionality are orthogonalized as
(out, rest), 3-D parameters per slice only where declared or unambiguous."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import shardopt
from shardopt.rules.newton_schulz import COEFFICIENT_SETS, orthogonalize

D, VOCAB, CONTEXT = 16, 64, 8  # VOCAB = 4 * D: the MLP's c_fc has vocabulary-many outputs too


class GPTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(D, 3 * D), "c_proj": nn.Linear(D, D)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(D, 4 * D), "c_proj": nn.Linear(4 * D, D)})


class GPT(nn.Module):
    """GPT-2's module tree (transformer.wte/wpe/h/ln_f, lm_head), tied or untied."""

    def __init__(self, tied: bool, layers: int = 2) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(VOCAB, D), "wpe": nn.Embedding(CONTEXT, D),
            "h": nn.ModuleList(GPTBlock() for _ in range(layers)), "ln_f": nn.LayerNorm(D),
        })
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.transformer.wte.weight


class BertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({k: nn.Linear(D, D) for k in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": nn.Linear(D, D), "LayerNorm": nn.LayerNorm(D)}),
        })
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(D, 4 * D)})
        self.output = nn.ModuleDict({"dense": nn.Linear(4 * D, D), "LayerNorm": nn.LayerNorm(D)})


class BertForMaskedLM(nn.Module):
    """BERT's module tree: embeddings, encoder.layer.*, and the MLM head whose
    cls.predictions.decoder shares the word embeddings' weight."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.bert = nn.ModuleDict({
            "embeddings": nn.ModuleDict({
                "word_embeddings": nn.Embedding(VOCAB, D), "position_embeddings": nn.Embedding(CONTEXT, D),
                "token_type_embeddings": nn.Embedding(2, D), "LayerNorm": nn.LayerNorm(D),
            }),
            "encoder": nn.ModuleDict({"layer": nn.ModuleList(BertLayer() for _ in range(layers))}),
        })
        predictions = nn.Module()
        predictions.transform = nn.ModuleDict({"dense": nn.Linear(D, D), "LayerNorm": nn.LayerNorm(D)})
        predictions.decoder = nn.Linear(D, VOCAB, bias=False)
        predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        predictions.bias = nn.Parameter(torch.zeros(VOCAB))
        self.cls = nn.ModuleDict({"predictions": predictions})


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 8, 5)  # (8, 3, 5): 3-D, yet a kernel
        self.conv2d = nn.Conv2d(8, 6, 3, groups=2)  # (6, 4, 3, 3)
        self.bn = nn.BatchNorm2d(6)
        self.conv3d = nn.Conv3d(2, 4, (2, 3, 3), bias=False)  # (4, 2, 2, 3, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 10)


class MoE(nn.Module):
    """A router and two expert stacks (experts, rows, cols), declared as stacks."""

    muon_expert_stacks = ("w_in", "w_out")

    def __init__(self, experts: int = 4, hidden: int = 24) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.router = nn.Linear(D, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, D) / 4)
        self.w_out = nn.Parameter(torch.randn(experts, D, hidden) / 4)


class Unlabelled(nn.Module):
    """A 3-D nn.Parameter outside any conv module, not declared: unambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.randn(3, 8, 16))
        self.proj = nn.Linear(16, 8)


def placement(groups):
    return {name: (kind, reason) for name, kind, _, reason in groups.placement}


def group_of(groups, param):
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


def test_gpt_untied_head_and_embeddings_to_adamw_hidden_matrices_to_muon():
    model = GPT(tied=False)
    groups = shardopt.muon_param_groups(model)
    where = placement(groups)
    assert where["transformer.wte.weight"] == ("adamw", "embedding (nn.Embedding)")
    assert where["transformer.wpe.weight"] == ("adamw", "embedding (nn.Embedding)")
    assert where["lm_head.weight"] == ("adamw", "output head: 64 = transformer.wte.num_embeddings outputs")
    assert where["transformer.ln_f.weight"] == ("adamw", "norm (nn.LayerNorm)")
    assert where["transformer.h.0.attn.c_attn.bias"] == ("adamw", "bias")
    # c_fc has vocabulary-many outputs but is neither the last Linear nor named like a head.
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert where[f"transformer.h.1.{name}.weight"] == ("muon", "hidden matrix (nn.Linear)")
    assert [len(g["params"]) for g in groups] == [8, 21]
    # Every matrix 2-D: no matrix_view, the rule's shape rule, and torch.optim.Muon's keys.
    torch_keys = set(torch.optim.Muon([nn.Parameter(torch.zeros(2, 2))]).param_groups[0])
    assert set(shardopt.Muon(groups).param_groups[0]) - torch_keys == {"ns_dtype", "use_muon"}
    assert groups[1]["use_muon"] is False


def test_gpt_tied_head_is_the_embedding_once():
    model = GPT(tied=True)
    groups = shardopt.muon_param_groups(model)
    where = placement(groups)
    assert "lm_head.weight" not in where  # one tensor, named once by named_parameters()
    assert where["transformer.wte.weight"] == ("adamw", "output head 'lm_head' tied to embedding 'transformer.wte'")
    assert group_of(groups, model.lm_head.weight)["use_muon"] is False
    summary = groups.summary()
    assert "tied to embedding" in summary
    assert "hidden matrix (nn.Linear)" in summary


def test_bert_attention_output_dense_is_muon_and_tied_decoder_adamw():
    model = BertForMaskedLM()
    groups = shardopt.muon_param_groups(model)
    where = placement(groups)
    for layer in range(2):
        prefix = f"bert.encoder.layer.{layer}"
        for name in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"):
            assert where[f"{prefix}.{name}.weight"] == ("muon", "hidden matrix (nn.Linear)"), name
        assert where[f"{prefix}.attention.output.LayerNorm.weight"] == ("adamw", "norm (nn.LayerNorm)")
    assert where["bert.embeddings.word_embeddings.weight"] == (
        "adamw", "output head 'cls.predictions.decoder' tied to embedding 'bert.embeddings.word_embeddings'")
    assert where["bert.embeddings.token_type_embeddings.weight"] == ("adamw", "embedding (nn.Embedding)")
    assert where["cls.predictions.bias"] == ("adamw", "bias")
    assert where["cls.predictions.transform.dense.weight"][0] == "muon"
    # By names alone (the old rule), "output" sent every attention.output.dense to AdamW.
    by_name = placement(shardopt.muon_param_groups(model.named_parameters()))
    assert by_name["bert.encoder.layer.0.attention.output.dense.weight"] == ("adamw", "name matches 'output'")


def test_conv_and_norm_placement():
    model = ConvNet()
    groups = shardopt.muon_param_groups(model)
    where = placement(groups)
    assert where["conv1d.weight"] == ("muon", "conv kernel (nn.Conv1d) as (out, in*k) = (8, 15)")
    assert where["conv2d.weight"] == ("muon", "conv kernel (nn.Conv2d) as (out, in*k) = (6, 36)")
    assert where["conv3d.weight"] == ("muon", "conv kernel (nn.Conv3d) as (out, in*k) = (4, 36)")
    assert where["bn.weight"] == where["bn.bias"] == ("adamw", "norm (nn.BatchNorm2d)")
    assert where["gn.weight"] == ("adamw", "norm (nn.GroupNorm)")
    assert where["conv1d.bias"] == ("adamw", "bias")
    assert where["fc.weight"] == ("muon", "hidden matrix (nn.Linear)")  # no embedding: no vocabulary head
    # Only the 3-D kernel departs from the rule's shape rule (3-D: per slice): it alone
    # gets a group that says "flatten".
    assert len(groups) == 3
    assert "matrix_view" not in groups[0]
    assert groups[2] == {"params": [model.conv1d.weight], "use_muon": True, "matrix_view": "flatten"}


def nesterov_first_step(grad: torch.Tensor, momentum: float = 0.95) -> torch.Tensor:
    """Muon's first Nesterov direction: B_1 = (1 - mu) G, U = (1 - mu) G + mu B_1."""
    return grad.lerp((1 - momentum) * grad, momentum)


def test_every_conv_kernel_is_orthogonalized_as_out_by_rest():
    torch.manual_seed(0)
    model = ConvNet()
    groups = shardopt.muon_param_groups(model)
    lr = 0.02
    opt = shardopt.Muon(groups, lr=lr, weight_decay=0.0, ns_dtype="float32")
    kernels = [model.conv1d.weight, model.conv2d.weight, model.conv3d.weight]
    before = [k.detach().clone() for k in kernels]
    grads = [torch.randn(k.shape) for k in kernels]
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    for kernel, grad in zip(kernels, grads):
        kernel.grad = grad.clone()
    opt.step()
    for kernel, start, grad in zip(kernels, before, grads):
        rows, cols = kernel.shape[0], math.prod(kernel.shape[1:])
        ortho = orthogonalize(nesterov_first_step(grad).reshape(rows, cols), COEFFICIENT_SETS["jordan"], 5,
                              dtype=torch.float32)
        expected = start - lr * math.sqrt(max(1, rows / cols)) * ortho.reshape(kernel.shape)
        assert (kernel - expected).abs().max().item() <= 1e-6, tuple(kernel.shape)
    # Per slice (the shape rule for a 3-D tensor) is a different update: the test can tell.
    sliced = orthogonalize(nesterov_first_step(grads[0]), COEFFICIENT_SETS["jordan"], 5, dtype=torch.float32)
    flat = orthogonalize(nesterov_first_step(grads[0]).reshape(8, 15), COEFFICIENT_SETS["jordan"], 5,
                         dtype=torch.float32)
    assert (sliced.reshape(8, 15) - flat).abs().max().item() > 0.1


def test_conv1d_kernel_matches_torch_muon_on_its_2d_view():
    torch.manual_seed(1)
    conv = nn.Conv1d(4, 6, 3, bias=False)
    flat = conv.weight.detach().reshape(6, 12).clone().requires_grad_()
    opt = shardopt.Muon(shardopt.muon_param_groups(conv), lr=0.02)
    reference = torch.optim.Muon([flat], lr=0.02)
    for _ in range(4):
        grad = torch.randn(6, 4, 3)
        conv.weight.grad, flat.grad = grad.clone(), grad.reshape(6, 12).clone()
        opt.step()
        reference.step()
    assert torch.equal(conv.weight.reshape(6, 12), flat)
    assert set(reference.state_dict()["state"][0]) == set(opt.state_dict()["state"][0])


def test_moe_declared_stacks_orthogonalized_per_expert():
    torch.manual_seed(2)
    model = MoE()
    groups = shardopt.muon_param_groups(model)
    where = placement(groups)
    assert where["w_in"] == ("muon", "expert stack: 4 matrices 24x16 (3-D nn.Parameter of MoE) "
                                     "(declared in muon_expert_stacks)")
    assert where["router.weight"] == ("muon", "hidden matrix (nn.Linear)")
    assert where["norm.weight"] == ("adamw", "norm (nn.RMSNorm)")
    # 3-D per slice is the rule's shape rule: the stacks share the Muon group.
    assert len(groups) == 2
    assert group_of(groups, model.w_in) is groups[0]
    assert "matrix_view" not in groups[0]
    lr = 0.02
    opt = shardopt.Muon(groups, lr=lr, weight_decay=0.0, ns_dtype="float32")
    start = model.w_in.detach().clone()
    grad = torch.randn(model.w_in.shape)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    model.w_in.grad = grad.clone()
    opt.step()
    for expert in range(4):
        ortho = orthogonalize(nesterov_first_step(grad[expert]), COEFFICIENT_SETS["jordan"], 5,
                              dtype=torch.float32)
        expected = start[expert] - lr * math.sqrt(24 / 16) * ortho
        assert (model.w_in[expert] - expected).abs().max().item() <= 1e-6, expert


def test_expert_stacks_argument_and_unambiguous_3d_parameters():
    model = Unlabelled()
    where = placement(shardopt.muon_param_groups(model))
    assert where["experts"] == ("muon", "expert stack: 3 matrices 8x16 (3-D nn.Parameter of Unlabelled)")
    groups = shardopt.muon_param_groups(model, expert_stacks=[model.experts])
    assert placement(groups)["experts"][1].endswith("(declared in expert_stacks)")
    # Declaring works from names too, and for parameters given without modules.
    named = shardopt.muon_param_groups(model.named_parameters(), expert_stacks=["^experts$"])
    assert placement(named)["experts"][1].endswith("(declared in expert_stacks)")
    with pytest.raises(ValueError, match=r"expert_stacks: 'expert\$' matches no parameter"):
        shardopt.muon_param_groups(model, expert_stacks=["expert$"])
    with pytest.raises(ValueError, match=r"expert_stacks: proj.weight .* shape \(8, 16\)"):
        shardopt.muon_param_groups(model, expert_stacks=["proj.weight"])
    # A declaration wins over the module type (a 3-D Conv1d kernel may be declared a
    # stack); a 4-D kernel cannot be one.
    convnet = ConvNet()
    declared = shardopt.muon_param_groups(convnet, expert_stacks=[r"conv1d\.weight"])
    assert "matrix_view" not in group_of(declared, convnet.conv1d.weight)
    assert len(declared) == 2
    with pytest.raises(ValueError, match=r"expert_stacks: conv2d\.weight .* shape \(6, 4, 3, 3\)"):
        shardopt.muon_param_groups(convnet, expert_stacks=["conv2d.weight"])


def test_name_overrides():
    model = GPT(tied=False)
    groups = shardopt.muon_param_groups(model, adamw_patterns=[r"c_attn"], muon_patterns=[r"^lm_head"])
    where = placement(groups)
    assert where["transformer.h.0.attn.c_attn.weight"] == (
        "adamw", "name override: matches adamw_patterns 'c_attn'")
    assert where["lm_head.weight"] == (
        "muon", "name override: matches muon_patterns '^lm_head'; hidden matrix (nn.Linear)")
    with pytest.raises(ValueError, match=r"c_attn\.weight matches adamw_patterns 'attn' and muon_patterns"):
        shardopt.muon_param_groups(model, adamw_patterns=["attn"], muon_patterns=["c_attn"])
    with pytest.raises(ValueError, match=r"muon_patterns: 'ln_f' matches transformer.ln_f.weight, a 1-D"):
        shardopt.muon_param_groups(model, muon_patterns=["ln_f"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'adamw_lr'"):
        shardopt.muon_param_groups(model, adamw_lr=3e-4)


def test_named_parameters_only_keep_the_name_and_shape_rules():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "conv": nn.Conv1d(8, 8, 3), "fc": nn.Linear(8, 8),
                           "head": nn.Linear(8, 10)})
    model.register_parameter("experts", nn.Parameter(torch.randn(2, 4, 8)))
    groups = shardopt.muon_param_groups(model.named_parameters())
    where = placement(groups)
    # Without modules, emb is an unknown matrix and conv.weight a 3-D stack, as before.
    assert where["emb.weight"] == ("muon", "hidden matrix")
    assert where["conv.weight"] == ("muon", "expert stack: 8 matrices 8x3 (3-D no module given)")
    assert where["experts"][0] == "muon"
    assert where["head.weight"] == ("adamw", "name matches 'head'")
    assert where["conv.bias"] == ("adamw", "1-D")
    assert len(groups) == 2
    assert "matrix_view" not in groups[0]
    by_module = placement(shardopt.muon_param_groups(model))
    assert by_module["emb.weight"] == ("adamw", "embedding (nn.Embedding)")
    assert by_module["conv.weight"] == ("muon", "conv kernel (nn.Conv1d) as (out, in*k) = (8, 24)")
    assert by_module["head.weight"] == ("adamw", "output head: 10 = emb.num_embeddings outputs")


def test_zero_optimizer_takes_the_views_unchanged():
    # One process, no process group: ZeroOptimizer asks the rule with each group's
    # matrix_view (transform_cost, batches, transform, workspace) and steps as Muon does.
    torch.manual_seed(3)
    model = nn.ModuleDict({"conv": ConvNet(), "moe": MoE()})
    reference = nn.ModuleDict({"conv": ConvNet(), "moe": MoE()})
    reference.load_state_dict(model.state_dict())
    hp = dict(lr=0.02, ns_dtype="float32", adamw_lr=0.01)
    opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, stage=1, **hp)
    ref_opt = shardopt.Muon(shardopt.muon_param_groups(reference), **hp)
    try:
        stack_info = next(i for i in opt.plan.params if i.shape == (4, 24, D))
        rule = opt.inner.muon_rule
        assert stack_info.transform_cost == 4 * rule.transform_cost((24, D), rule.defaults)
        conv_info = next(i for i in opt.plan.params if i.shape == (8, 3, 5))
        assert conv_info.transform_cost == rule.transform_cost((8, 15), rule.defaults)
        for _ in range(2):
            for mine, theirs in zip(model.parameters(), reference.parameters()):
                grad = torch.randn(mine.shape)
                mine.grad, theirs.grad = grad.clone(), grad.clone()
            opt.step()
            ref_opt.step()
            opt.zero_grad()
        for mine, theirs in zip(model.parameters(), reference.parameters()):
            assert (mine - theirs).abs().max().item() <= 1e-6
    finally:
        opt.close()
