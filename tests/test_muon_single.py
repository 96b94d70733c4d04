"""Muon in one process: Newton-Schulz orthogonalization, parameter shapes,
the AdamW remainder, muon_param_groups and the update scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import shardopt
from shardopt.rules.muon import NEWTON_SCHULZ_RANGE, count_orthogonalized
from shardopt.rules.newton_schulz import (
    COEFFICIENT_SETS,
    matrix_shape,
    newton_schulz_flops,
    orthogonalize,
    resolve_coefficients,
    resolve_ns_method,
    singular_value_band,
)

NS_STEPS = 5
BAND_TOL = 1e-3




def matrix_with_singular_values(rows, cols, scale, gen):
    """M = U diag(s) V^T with s spread log-uniformly over [1e-2, 1] * scale."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(-2, 0, k, dtype=torch.float64) * scale
    return (u * s) @ v.T, u, s, v


def scalar_map(coefficients, s):
    for a, b, c in coefficients.for_steps(NS_STEPS):
        s = a * s + b * s**3 + c * s**5
    return s


def normalized(s, matrix, coefficients):
    return s / (coefficients.norm_scale * torch.linalg.matrix_norm(matrix))


# ---------------------------------------------------------------------------
# orthogonalize: singular values in the promised band, vectors preserved

SHAPES = [(24, 24), (40, 16), (16, 40)]


@pytest.mark.parametrize("scale", [1e-2, 1.0, 300.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("coeff_name", sorted(COEFFICIENT_SETS))
def test_singular_values_in_band_and_vectors_preserved(coeff_name, shape, scale):
    coefficients = COEFFICIENT_SETS[coeff_name]
    gen = torch.Generator().manual_seed(sum(shape) + len(coeff_name))
    m, u, s, v = matrix_with_singular_values(*shape, scale, gen)
    out = orthogonalize(m.float(), coefficients, NS_STEPS, dtype=torch.float32)
    assert out.shape == shape
    assert out.dtype == torch.float32

    s_norm = normalized(s, m, coefficients)
    lower = float(s_norm.min())
    band_low, band_high = singular_value_band(coefficients, NS_STEPS, lower)
    out_s = torch.linalg.svdvals(out.double())
    assert float(out_s.min()) >= band_low - BAND_TOL
    assert float(out_s.max()) <= band_high + BAND_TOL
    # Each singular value is mapped by the scalar polynomial; U and V unchanged.
    expected = (u * scalar_map(coefficients, s_norm)) @ v.T
    assert (out.double() - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("coeff_name", sorted(COEFFICIENT_SETS))
def test_expert_stack_singular_values_in_band(coeff_name):
    coefficients = COEFFICIENT_SETS[coeff_name]
    gen = torch.Generator().manual_seed(3)
    parts = [matrix_with_singular_values(20, 12, scale, gen) for scale in (0.1, 1.0, 10.0)]
    stack = torch.stack([p[0] for p in parts]).float()
    out = orthogonalize(stack, coefficients, NS_STEPS, dtype=torch.float32)
    assert out.shape == stack.shape
    for index, (m, u, s, v) in enumerate(parts):
        s_norm = normalized(s, m, coefficients)
        band_low, band_high = singular_value_band(coefficients, NS_STEPS, float(s_norm.min()))
        out_s = torch.linalg.svdvals(out[index].double())
        assert float(out_s.min()) >= band_low - BAND_TOL
        assert float(out_s.max()) <= band_high + BAND_TOL
        expected = (u * scalar_map(coefficients, s_norm)) @ v.T
        assert (out[index].double() - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("lower", [1e-3, 1e-2, 0.1])
def test_polar_express_band_is_tighter_than_jordan(lower):
    jordan = singular_value_band(COEFFICIENT_SETS["jordan"], NS_STEPS, lower)
    polar = singular_value_band(COEFFICIENT_SETS["polar_express"], NS_STEPS, lower)
    assert polar[1] - polar[0] < jordan[1] - jordan[0]
    assert max(abs(1 - polar[0]), abs(polar[1] - 1)) < max(abs(1 - jordan[0]), abs(jordan[1] - 1))
    # Jordan's documented band (about 0.7-1.2) for the singular values Muon meets.
    if lower >= 1e-2:
        assert jordan[0] > 0.6
        assert jordan[1] < 1.25


def test_orthogonalize_zero_matrix_stays_finite():
    out = orthogonalize(torch.zeros(4, 6), COEFFICIENT_SETS["jordan"], NS_STEPS)
    assert torch.equal(out.float(), torch.zeros(4, 6))


def test_resolve_coefficients_names_and_tuples():
    assert resolve_coefficients("jordan") is COEFFICIENT_SETS["jordan"]
    assert resolve_coefficients((3.4445, -4.7750, 2.0315)) is COEFFICIENT_SETS["jordan"]
    custom = resolve_coefficients([(3.0, -3.0, 1.0), (2.0, -1.5, 0.5)])
    assert custom.for_steps(3) == [(3.0, -3.0, 1.0), (2.0, -1.5, 0.5), (2.0, -1.5, 0.5)]


# ---------------------------------------------------------------------------
# Parameter shapes: expert stacks, conv weights


def test_expert_stack_equals_each_expert_alone_fp32():
    gen = torch.Generator().manual_seed(4)
    for coeff_name, coefficients in COEFFICIENT_SETS.items():
        for shape in [(4, 12, 8), (4, 8, 12), (3, 10, 10)]:
            stack = torch.randn(shape, generator=gen) * 3
            out = orthogonalize(stack, coefficients, NS_STEPS, dtype=torch.float32)
            for index in range(shape[0]):
                alone = orthogonalize(stack[index], coefficients, NS_STEPS, dtype=torch.float32)
                diff = (out[index] - alone).abs().max().item()
                assert diff <= 1e-6, (coeff_name, shape, diff)


def test_muon_expert_stack_param_equals_experts_as_separate_matrices():
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(3, 12, 8, generator=gen)
    stack = init.clone().requires_grad_()
    experts = [init[i].clone().requires_grad_() for i in range(3)]
    kwargs = dict(lr=0.02, ns_dtype="float32", adjust_lr_fn="match_rms_adamw")
    stack_opt = shardopt.Muon([stack], **kwargs)
    # One optimizer per expert so each is orthogonalized alone.
    expert_opts = [shardopt.Muon([expert], **kwargs) for expert in experts]
    for _ in range(10):
        grad = torch.randn(3, 12, 8, generator=gen)
        stack.grad = grad.clone()
        for index, expert in enumerate(experts):
            expert.grad = grad[index].clone()
        stack_opt.step()
        for opt in expert_opts:
            opt.step()
    for index, expert in enumerate(experts):
        assert (stack[index] - expert).abs().max().item() <= 1e-6


def test_conv_weight_is_updated_as_its_2d_view():
    gen = torch.Generator().manual_seed(6)
    init = torch.randn(8, 3, 3, 3, generator=gen)
    conv = init.clone().requires_grad_()
    flat = init.reshape(8, 27).clone().requires_grad_()
    reference = init.reshape(8, 27).clone().requires_grad_()
    conv_opt = shardopt.Muon([conv], lr=0.02)
    flat_opt = shardopt.Muon([flat], lr=0.02)
    torch_opt = torch.optim.Muon([reference], lr=0.02)
    for _ in range(10):
        grad = torch.randn(8, 3, 3, 3, generator=gen)
        conv.grad = grad.clone()
        flat.grad = grad.reshape(8, 27).clone()
        reference.grad = grad.reshape(8, 27).clone()
        conv_opt.step()
        flat_opt.step()
        torch_opt.step()
    assert conv.shape == (8, 3, 3, 3)
    assert torch.equal(conv.reshape(8, 27), flat)
    assert torch.equal(flat, reference)


def test_same_shape_matrices_do_not_change_each_others_update():
    # A matrix's update must not depend on which other matrices share its
    # group: the ZeRO engine gives different ranks different subsets of
    # matrices, and the result must equal the unsharded optimizer's.
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(16, 16, generator=gen) for _ in range(6)]
    together = [t.clone().requires_grad_() for t in init]
    apart = [t.clone().requires_grad_() for t in init]
    together_opt = shardopt.Muon(together, lr=0.02)
    apart_opt = shardopt.Muon([{"params": [p]} for p in apart], lr=0.02)
    for _ in range(40):
        for a, b in zip(together, apart, strict=True):
            grad = torch.randn(16, 16, generator=gen)
            a.grad, b.grad = grad.clone(), grad.clone()
        together_opt.step()
        apart_opt.step()
    for a, b in zip(together, apart, strict=True):
        assert torch.equal(a, b), (a - b).abs().max().item()


def _profiled_step(opt):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return prof.events()


def test_newton_schulz_ranges_count_matrices():
    shapes = [(6, 4), (6, 4), (5, 7), (3, 6, 4), (8, 3, 3, 3)]
    params = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    for ns_dtype in ("bfloat16", "float32"):
        opt = shardopt.Muon(params, lr=0.02, ns_dtype=ns_dtype)
        for param in params:
            param.grad = torch.ones(param.shape)
        events = _profiled_step(opt)
        # 2 + 1 matrices, 3 experts, 1 conv weight.
        assert count_orthogonalized(events) == 7
        ranges = sorted(e.name.removeprefix(NEWTON_SCHULZ_RANGE + " ") for e in events
                        if e.name.startswith(NEWTON_SCHULZ_RANGE))
        # bf16: one parameter per call; fp32: the two 6x4 matrices in one batch.
        pairs = ["1x6x4", "1x6x4"] if ns_dtype == "bfloat16" else ["2x6x4"]
        assert ranges == sorted([*pairs, "1x5x7", "3x6x4", "1x8x27"])
        # Each Newton-Schulz call inside one transform range.
        assert sum(e.name == "shardopt.matrix_transform" for e in events) == len(ranges)
        params[0].grad = None
        assert count_orthogonalized(_profiled_step(opt)) == 6


# A "stack" view of a 4-D kernel is refused (test_stack_view_of_a_4d_kernel_is_refused): not a cost case.
@pytest.mark.parametrize(("shape", "view"), [
    (shape, view)
    for shape in [(16, 4), (4, 16), (9, 9), (3, 8, 16), (3, 16, 8), (4, 4, 3, 3)]
    for view in (None, "flatten", "stack") if not (view == "stack" and len(shape) == 4)], ids=str)
@pytest.mark.parametrize("ns_steps", [1, 5])
def test_transform_cost_is_newton_schulz_multiply_adds_per_step(shape, ns_steps, view):
    rule = shardopt.rules.MuonRule()
    # Per matrix and Newton-Schulz step, with m = min, n = max: X X^T (m m n), A A (m^3)
    # and B X (m m n); a 3-D stack (matrix_view "stack", or no key) has shape[0] matrices;
    # conv kernels and flattened 3-D parameters are (out, in*kh*kw).
    stack = len(shape) == 3 and view != "flatten"
    rows, cols = shape[-2:] if len(shape) == 2 or stack else (shape[0], math.prod(shape[1:]))
    m, n = min(rows, cols), max(rows, cols)
    count = shape[0] if stack else 1
    hp = {**rule.defaults, "ns_steps": ns_steps, **({"matrix_view": view} if view else {})}
    cost = rule.transform_cost(shape, hp)
    assert cost == count * (2 * m * m * n + m**3) * ns_steps
    assert cost == count * newton_schulz_flops(*matrix_shape(shape, view), 1) * ns_steps


def test_stack_view_of_a_4d_kernel_is_refused():
    kernel = torch.zeros(4, 4, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*matrix_view"):
        shardopt.Muon([{"params": [kernel], "matrix_view": "stack"}])
    with pytest.raises(ValueError, match="Invalid matrix_view: 'rows'"):
        shardopt.Muon([{"params": [kernel], "matrix_view": "rows"}])


# ---------------------------------------------------------------------------
# The update scale (adjust_lr_fn)


@pytest.mark.parametrize("shape", [(16, 4), (4, 16), (9, 9)], ids=str)
def test_update_scale_ratio(shape):
    rows, cols = shape
    gen = torch.Generator().manual_seed(8)
    grad = torch.randn(shape, generator=gen)
    deltas = {}
    for fn in (None, "original", "match_rms_adamw"):
        param = torch.zeros(shape, requires_grad=True)
        opt = shardopt.Muon(
            [param], lr=0.01, weight_decay=0.0, adjust_lr_fn=fn, ns_dtype="float32",
            ns_coefficients="polar_express",
        )
        param.grad = grad.clone()
        opt.step()
        deltas[fn] = param.detach().clone()
    assert torch.equal(deltas[None], deltas["original"])
    expected_ratio = 0.2 * math.sqrt(max(rows, cols)) / math.sqrt(max(1.0, rows / cols))
    torch.testing.assert_close(
        deltas["match_rms_adamw"], deltas["original"] * expected_ratio, rtol=1e-5, atol=1e-9
    )
    # match_rms_adamw gives the update AdamW's RMS, 0.2 * lr (Liu et al. 2025),
    # up to the polar_express band around singular value 1.
    rms = deltas["match_rms_adamw"].pow(2).mean().sqrt().item()
    assert rms == pytest.approx(0.2 * 0.01, rel=0.15)


# ---------------------------------------------------------------------------
# The AdamW remainder


def test_use_muon_false_group_is_adamw():
    gen = torch.Generator().manual_seed(9)
    matrix_init = torch.randn(6, 4, generator=gen)
    other_init = [torch.randn(shape, generator=gen) for shape in [(4,), (1,), (10, 3), (2, 3, 5)]]
    matrix = matrix_init.clone().requires_grad_()
    ours = [t.clone().requires_grad_() for t in other_init]
    plain = [t.clone().requires_grad_() for t in other_init]
    adamw_kwargs = dict(lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)
    muon = shardopt.Muon(
        [{"params": [matrix]}, {"params": ours, "use_muon": False, **adamw_kwargs}], lr=0.02
    )
    adamw = shardopt.AdamW(plain, **adamw_kwargs)
    for _ in range(30):
        matrix.grad = torch.randn(6, 4, generator=gen)
        for a, b in zip(ours, plain, strict=True):
            grad = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = grad.clone(), grad.clone()
        muon.step()
        adamw.step()
    for a, b in zip(ours, plain, strict=True):
        assert torch.equal(a, b)
        assert set(muon.state[a]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(muon.state[matrix]) == {"momentum_buffer"}


def test_use_muon_false_group_takes_adamw_defaults():
    gen = torch.Generator().manual_seed(10)
    init = [torch.randn(shape, generator=gen) for shape in [(5,), (3, 2)]]
    ours = [t.clone().requires_grad_() for t in init]
    plain = [t.clone().requires_grad_() for t in init]
    muon = shardopt.Muon(
        [{"params": ours, "use_muon": False}],
        lr=0.5, weight_decay=0.9, eps=1e-3,  # Muon's own values must not leak in
        adamw_lr=1e-2, adamw_betas=(0.85, 0.9), adamw_eps=1e-7, adamw_weight_decay=0.2,
    )
    adamw = shardopt.AdamW(plain, lr=1e-2, betas=(0.85, 0.9), eps=1e-7, weight_decay=0.2)
    group = muon.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        1e-2, (0.85, 0.9), 1e-7, 0.2,
    )
    for _ in range(20):
        for a, b in zip(ours, plain, strict=True):
            grad = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = grad.clone(), grad.clone()
        muon.step()
        adamw.step()
    for a, b in zip(ours, plain, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# muon_param_groups


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.frozen = nn.Linear(8, 8, bias=False)
        self.frozen.weight.requires_grad_(False)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = self.fc2(torch.relu(self.norm(self.fc1(h))))
        return self.lm_head(h + self.frozen(h))


def test_muon_param_groups_placement_and_summary():
    model = TinyLM()
    groups = shardopt.muon_param_groups(model, lr=3e-4, betas=(0.9, 0.95))
    assert len(groups) == 2
    muon_group, adamw_group = groups[0], groups[1]
    assert muon_group["use_muon"] is True
    assert adamw_group["use_muon"] is False
    assert adamw_group["lr"] == 3e-4
    assert adamw_group["betas"] == (0.9, 0.95)

    def ids(params):
        return {id(p) for p in params}

    assert ids(muon_group["params"]) == ids([model.fc1.weight, model.fc2.weight])
    assert ids(adamw_group["params"]) == ids([
        model.embed.weight, model.fc1.bias, model.norm.weight, model.norm.bias,
        model.lm_head.weight,
    ])
    placement = {name: (kind, shape, reason) for name, kind, shape, reason in groups.placement}
    # By module type and shape (names only as overrides; tests/test_muon_grouping.py).
    assert placement == {
        "embed.weight": ("adamw", (11, 8), "embedding (nn.Embedding)"),
        "fc1.weight": ("muon", (16, 8), "hidden matrix (nn.Linear)"),
        "fc1.bias": ("adamw", (16,), "bias"),
        "norm.weight": ("adamw", (16,), "norm (nn.LayerNorm)"),
        "norm.bias": ("adamw", (16,), "norm (nn.LayerNorm)"),
        "fc2.weight": ("muon", (8, 16), "hidden matrix (nn.Linear)"),
        "lm_head.weight": ("adamw", (11, 8), "output head: 11 = embed.num_embeddings outputs"),
    }
    assert "matrix_view" not in muon_group  # all 2-D: the rule's shape rule, torch.optim.Muon's keys
    summary = groups.summary()
    lines = summary.splitlines()
    for name, (kind, shape, _) in placement.items():
        (line,) = [line for line in lines if f" {name} " in line]
        assert line.startswith(kind)
        assert str(shape) in line
    assert "frozen" not in summary
    # fc1 16x8 + fc2 8x16; embed 11x8 + lm_head 8x11 + three 16-vectors.
    assert lines[-1] == "muon: 256 elements; adamw: 224 elements"

    # The groups drive a Muon optimizer and every trainable parameter moves.
    opt = shardopt.Muon(groups, lr=0.02)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(model(tokens).reshape(-1, 11), tokens.reshape(-1))
    loss.backward()
    opt.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == param.requires_grad, name


def test_muon_param_groups_custom_patterns_and_named_input():
    model = TinyLM()
    groups = shardopt.muon_param_groups(model.named_parameters(), adamw_patterns=("fc2",))
    kinds = {name: kind for name, kind, _, _ in groups.placement}
    assert kinds["fc2.weight"] == "adamw"
    assert kinds["embed.weight"] == kinds["lm_head.weight"] == kinds["fc1.weight"] == "muon"
    assert kinds["norm.weight"] == "adamw"


# ---------------------------------------------------------------------------
# Gram Newton-Schulz (ns_method="gram"): the same polynomials through X X^T

GRAM_SHAPES = [(24, 24), (40, 16), (16, 40), (3, 16, 40)]
# Relative Frobenius distance to the standard fp32 result. fp32: measured <= 5e-5
# (square polar_express the worst); bf16: measured <= 0.06, where the standard bf16
# iteration itself is up to 0.045 away. bf16 singular values: measured within 0.06
# of the band.
GRAM_REL_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.08}
GRAM_BAND_TOL = {torch.float32: BAND_TOL, torch.bfloat16: 0.1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=str)
@pytest.mark.parametrize("coeff_name", sorted(COEFFICIENT_SETS))
def test_gram_singular_values_in_band_and_close_to_standard(coeff_name, shape, dtype):
    coefficients = COEFFICIENT_SETS[coeff_name]
    gen = torch.Generator().manual_seed(sum(shape))
    matrix = torch.randn(shape, generator=gen)
    gram = orthogonalize(matrix, coefficients, NS_STEPS, dtype=dtype, method="gram")
    standard = orthogonalize(matrix, coefficients, NS_STEPS, dtype=torch.float32)
    assert gram.shape == shape
    assert gram.dtype == dtype
    distance = (gram.double() - standard.double()).norm() / standard.double().norm()
    assert distance <= GRAM_REL_TOL[dtype], distance
    norms = torch.linalg.matrix_norm(matrix.double()).unsqueeze(-1)  # one per matrix of a stack
    lower = float((torch.linalg.svdvals(matrix.double()) / (coefficients.norm_scale * norms)).min())
    band_low, band_high = singular_value_band(coefficients, NS_STEPS, lower)
    out_s = torch.linalg.svdvals(gram.double())
    assert float(out_s.min()) >= band_low - GRAM_BAND_TOL[dtype]
    assert float(out_s.max()) <= band_high + GRAM_BAND_TOL[dtype]


def test_gram_multiply_adds_and_auto_choice():
    m, n = 64, 256
    # One restart before step 2 of five: 2 m^2 n twice, 14 m^3 (module docstring).
    assert newton_schulz_flops(m, n, 5, "gram") == 2 * 2 * m * m * n + 14 * m**3
    assert newton_schulz_flops(m, n, 5, "gram") < newton_schulz_flops(m, n, 5)
    assert newton_schulz_flops(m, m, 5, "gram") > newton_schulz_flops(m, m, 5)
    assert resolve_ns_method("auto", m, n, 5) == "gram" == resolve_ns_method("auto", n, m, 5)
    assert resolve_ns_method("auto", m, m, 5) == "standard"
    with pytest.raises(ValueError, match="Invalid ns_method"):
        shardopt.Muon([nn.Parameter(torch.randn(4, 4))], ns_method="fast")


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_gram_workspace_is_what_the_rule_declares(ns_dtype):
    from test_matrix_workspace import measured, single_process_update

    rule = shardopt.rules.MuonRule()
    shapes = [(16, 40), (40, 16), (3, 8, 16), (12, 12), (40, 16)]
    hp = {**rule.defaults, "ns_dtype": ns_dtype, "ns_method": "gram"}
    assert measured(single_process_update(rule, shapes, hp, torch.float32)) == rule.workspace_bytes(
        shapes, hp, torch.float32)


def test_gram_muon_in_the_zero_engine_equals_single_process():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48, bias=False), nn.Linear(48, 16, bias=False))
    twin = nn.Sequential(nn.Linear(16, 48, bias=False), nn.Linear(48, 16, bias=False))
    twin.load_state_dict(model.state_dict())
    hp = dict(lr=0.02, ns_dtype="float32", ns_method="gram")
    engine = shardopt.ZeroOptimizer(model.parameters(), shardopt.Muon, stage=1, **hp)
    single = shardopt.Muon(twin.parameters(), **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 16, generator=gen)
        for net, opt in ((model, engine), (twin, single)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert single.state_dict()["param_groups"][0]["ns_method"] == "gram"
