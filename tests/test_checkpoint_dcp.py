"""shardopt.checkpoint: DCP checkpoints of ZeroOptimizer that resume bitwise, reshard, convert
and refuse what does not fit (tests/checkpoint_workers.py runs on the spawned ranks).

Two spawns: 4 ranks save at 2 (a sub-group), load that at 3 and save there,
load that at 4; then 2 new processes load both. World 1 loads in this process
(no process group). The 2-process spawn also runs the interop with FSDP2 +
torch.optim both ways and measures the peak memory of a save and a load.
"""

from __future__ import annotations

import copy

import checkpoint_workers as w
import pytest
import torch
from checkpoint_workers import CONFIGS, RESHARD, N, build, resume, state_of, train
from dist_harness import run_ranks
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from zero_workers import HP, TinyLM, batch, lm_loss

import shardopt
from shardopt import checkpoint

TOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def runs(root):
    out = w.results(run_ranks(w.chain, 4, root, timeout=240)[0])
    out.update(w.results(run_ranks(w.fresh, 2, root, timeout=240)[0]))
    out["from2@1"] = resume(0, 1, root, RESHARD, 2)
    return out


def _equal_states(a: dict, b: dict) -> bool:
    return a["state"].keys() == b["state"].keys() and all(
        a["state"][i].keys() == b["state"][i].keys()
        and all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i])
        for i in a["state"])


def _max_diff(a: list, b: list) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("config", [*CONFIGS, "default"])
def test_resume_in_new_processes_is_bitwise(runs, config):
    before, after = runs["save@2"][config], runs["from2@2"][config]
    assert runs["from2@2"][f"{config}/step"] == N
    assert all(torch.equal(x, y) for x, y in zip(before["params"], after["params"])), config
    assert _equal_states(before["state"], after["state"]), config
    assert after["num_skipped_steps"] == 7


def test_default_configuration_has_buckets_straddlers_and_masters(runs):
    save = runs["save@2"]
    assert save["default/buckets"] >= 2
    assert save["default/straddlers"] >= 1
    assert save["default/master_separate"] is True


def test_async_save_completes_the_directory(runs):
    path = runs["save@2"]["async_path"]
    assert path.endswith(f"step-{N:09d}")
    assert checkpoint.latest(path.rsplit("/", 1)[0]) is not None


@pytest.mark.parametrize(("saved", "loaded"), [(2, 3), (2, 1), (3, 2), (3, 4)])
@pytest.mark.parametrize("config", RESHARD)
def test_reshard_continues_the_uninterrupted_run(runs, saved, loaded, config):
    reference = runs[f"save@{saved}"][config]
    resumed = runs[f"from{saved}@{loaded}"][config]
    diff = _max_diff(reference["params"], resumed["params"])
    assert diff <= TOL, f"{config}: {saved} -> {loaded} ranks: {diff:.3g}"


def test_dcp_to_torch_save_equals_full_state_dict(runs, root, tmp_path):
    target = tmp_path / "full.pt"
    dcp_to_torch_save(checkpoint.latest(f"{root}/w2/adamw-stage2"), target)
    saved = torch.load(target, weights_only=False)
    converted = checkpoint.full_state_dict_from_dcp(saved["optim"])
    full = runs["save@2"]["full_at_save"]
    assert _equal_states(converted, full)
    assert converted["param_groups"] == full["param_groups"]
    # The way back, at another world size (here one process): the file's entry as it is.
    model, opt = build("adamw/stage2", seed=5)
    model.load_state_dict(saved["model"])
    checkpoint.set_optimizer_state_dict(model, opt, saved["optim"])
    assert _equal_states(opt.full_state_dict(), full)
    assert opt.num_skipped_steps == 7


def _snapshot(opt) -> dict:
    return copy.deepcopy(opt.full_state_dict())


def _trained(config: str, steps: int = 2):
    model, opt = build(config)
    train(model, opt, config, range(steps), 0, 1)
    return model, opt


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_mismatched_model_rule_or_shape_is_refused_naming_the_parameter(tmp_path):
    model, opt = _trained("adamw/stage2")
    checkpoint.save(state_of(model, opt), tmp_path, 2)
    path = checkpoint.latest(tmp_path)

    def attempt(model, opt, match):
        before = _snapshot(opt)
        with pytest.raises(ValueError, match=match):
            checkpoint.load(state_of(model, opt), path)
        assert _equal_states(before, _snapshot(opt))  # nothing was loaded

    other = TinyLM(extra_branch=True)  # one parameter more, after lm_head
    attempt(other, shardopt.ZeroOptimizer(other.parameters(), shardopt.AdamW, **HP), "branch.weight")
    reshaped = TinyLM()
    reshaped.up = torch.nn.Linear(12, 30)
    attempt(reshaped, shardopt.ZeroOptimizer(reshaped.parameters(), shardopt.AdamW, **HP), r"up\.")
    adam_model = TinyLM()
    adam = shardopt.ZeroOptimizer(adam_model.parameters(), shardopt.Adam, lr=0.01)
    attempt(adam_model, adam, "rule 'adamw'.*'adam'")
    # set_optimizer_state_dict checks the same record before it changes anything.
    saved = checkpoint.get_optimizer_state_dict(model, opt)
    with pytest.raises(ValueError, match="rule 'adamw'"):
        checkpoint.set_optimizer_state_dict(adam_model, adam, saved)
    # A state tensor of the wrong shape names its parameter.
    model2, opt2 = _trained("adamw/stage2")
    bad = checkpoint.get_optimizer_state_dict(model, opt)
    bad["state"]["qkv.weight"]["exp_avg"] = torch.zeros(3, 3)
    before = _snapshot(opt2)
    with pytest.raises(ValueError, match=r"qkv\.weight: state 'exp_avg' has shape \(3, 3\)"):
        checkpoint.set_optimizer_state_dict(model2, opt2, bad)
    assert _equal_states(before, _snapshot(opt2))


def test_full_state_dict_keeps_per_parameter_steps_or_refuses():
    torch.manual_seed(0)
    ref = TinyLM()
    ref_opt = torch.optim.AdamW(ref.parameters(), **HP)
    for step in range(2):
        lm_loss(ref, batch(step)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    saved = copy.deepcopy(ref_opt.state_dict())
    model = copy.deepcopy(ref)
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, bucket_numel=97, **HP)
    opt.load_state_dict(saved)
    assert all(float(entry["step"]) == 2.0 for entry in opt.full_state_dict()["state"].values())
    # One parameter that missed a step (torch.optim skips parameters without a gradient).
    saved["state"][3]["step"] = torch.tensor(1.0)
    before = _snapshot(opt)
    lr = opt.param_groups[0]["lr"]
    saved["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match=r"#3 .*have step (1 and 2|2 and 1).*per-parameter step"):
        opt.load_state_dict(saved)
    assert _equal_states(before, _snapshot(opt))
    assert opt.param_groups[0]["lr"] == lr  # hyperparameters restored too
    # A state of the wrong size is refused before anything changes.
    saved["state"][3]["step"] = torch.tensor(2.0)
    saved["state"][5]["exp_avg"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"#5 .*exp_avg"):
        opt.load_state_dict(saved)
    assert _equal_states(before, _snapshot(opt))


def test_latest_skips_incomplete_checkpoints(tmp_path):
    assert checkpoint.latest(tmp_path / "missing") is None
    (tmp_path / "step-000000005").mkdir()
    (tmp_path / "step-000000005" / ".metadata").write_bytes(b"")
    (tmp_path / "step-000000009.tmp").mkdir()  # a save that died
    (tmp_path / "step-000000007").mkdir()  # no metadata: not complete
    assert checkpoint.latest(tmp_path) == tmp_path / "step-000000005"
    assert checkpoint.step_of(checkpoint.latest(tmp_path)) == 5


def test_interop_with_fsdp2_and_torch_optim_both_ways(runs):
    """ZeroOptimizer's checkpoint into FSDP2 + torch.optim.AdamW (torch's dcp.load and
    set_optimizer_state_dict) and FSDP2's into ZeroOptimizer (checkpoint.load), both continued
    N steps at 2 ranks and compared with the saving side's uninterrupted run."""
    out = runs["interop"]
    assert out["zero->fsdp2/step"] == [float(N)] * len(out["zero->fsdp2/step"])
    assert _max_diff(out["zero"], out["zero->fsdp2"]) <= TOL
    for config in ("adamw/stage1", "adamw/stage2"):
        assert _max_diff(out["fsdp2"], out[f"fsdp2->{config}"]) <= TOL, config


def test_save_and_load_allocate_at_most_one_rank_area(runs):
    """Measured (profiler allocator events): a save copies at most a box at a time, a load reads
    into the areas (the largest transient is one replicated model parameter)."""
    measured = runs["memory"]  # rank 0's
    assert measured["equal"]
    assert 0 < measured["save"] <= measured["area"], measured
    assert 0 < measured["load"] <= measured["area"], measured


def _torch_checkpoint(tmp_path, steps: int = 2):
    """A single-process torch.optim.AdamW checkpoint in DCP, saved with torch's state-dict functions."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), **HP)
    for step in range(steps):
        lm_loss(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
    checkpoint.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                    tmp_path, steps)
    return model, opt, checkpoint.latest(tmp_path)


def test_torch_optim_checkpoint_loads_checked_into_zero_optimizer(tmp_path):
    ref, ref_opt, path = _torch_checkpoint(tmp_path)
    model, opt = build("adamw/stage2", seed=5)
    checkpoint.load(state_of(model, opt), path)
    for step in range(2, 4):
        for m, o in ((ref, ref_opt), (model, opt)):
            lm_loss(m, batch(step)).backward()
            o.step()
            o.zero_grad()
    assert max((a - b).abs().max().item() for a, b in zip(ref.parameters(), model.parameters())) <= TOL
    # Checked from the checkpoint's metadata and param-group names before anything is read.
    reshaped = TinyLM()
    reshaped.up = torch.nn.Linear(12, 30)
    other = shardopt.ZeroOptimizer(reshaped.parameters(), shardopt.AdamW, **HP)
    with pytest.raises(ValueError, match=r"up\.weight has shape \(31, 12\) in the checkpoint"):
        checkpoint.load(state_of(reshaped, other), path)
    extra = TinyLM(extra_branch=True)
    other = shardopt.ZeroOptimizer(extra.parameters(), shardopt.AdamW, **HP)
    with pytest.raises(ValueError, match=r"param group 0 .* 'branch\.weight'"):
        checkpoint.load(state_of(extra, other), path)
    sgd_model = TinyLM()
    sgd = shardopt.ZeroOptimizer(sgd_model.parameters(), shardopt.SGD, lr=0.1, momentum=0.9)
    checkpoint.get_optimizer_state_dict(sgd_model, sgd)  # allocates the states (initial values)
    before = _snapshot(sgd)
    keeps = r"has states \['exp_avg', 'exp_avg_sq', 'step'\] in the checkpoint, this optimizer's rule keeps"
    with pytest.raises(ValueError, match=keeps + r" \['momentum_buffer'\]"):
        checkpoint.load(state_of(sgd_model, sgd), path)
    assert _equal_states(before, _snapshot(sgd))


def test_torch_optim_checkpoint_gives_master_weights_from_the_parameters(tmp_path):
    """bf16 parameters with separate fp32 master weights: a torch checkpoint has none; they start
    from the loaded parameters."""
    _, _, path = _torch_checkpoint(tmp_path)
    torch.manual_seed(3)
    model = TinyLM().to(torch.bfloat16)
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, **HP)
    assert any(s.master_separate() for s in opt.storages)
    checkpoint.load(state_of(model, opt), path)
    for buffers in opt.sharded_state().storages:
        for piece in buffers.storage.pieces(0):
            param = list(model.parameters())[piece.param].detach().reshape(-1).float()
            master = buffers.master[piece.offset : piece.offset + piece.numel]
            assert torch.equal(master, param[piece.param_offset : piece.param_offset + piece.numel])


def test_convert_command_both_ways(tmp_path, capsys):
    """``python -m shardopt.checkpoint.convert``'s ``main``: a root of checkpoints -> one file (its
    newest complete one), and the file -> a DCP directory that loads into a ZeroOptimizer."""
    from shardopt.checkpoint.convert import main

    model, opt = _trained("adamw/stage2")
    checkpoint.save(state_of(model, opt), tmp_path / "ckpt", 2)
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "full.pt")]) == 0
    saved = torch.load(tmp_path / "full.pt", weights_only=False)
    assert _equal_states(checkpoint.full_state_dict_from_dcp(saved["optim"]), opt.full_state_dict())
    assert main([str(tmp_path / "full.pt"), str(tmp_path / "back" / "step-000000002")]) == 0
    other, other_opt = build("adamw/stage2", seed=5)
    checkpoint.load(state_of(other, other_opt), checkpoint.latest(tmp_path / "back"))
    assert _equal_states(other_opt.full_state_dict(), opt.full_state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    capsys.readouterr()
    assert main([str(tmp_path / "missing"), str(tmp_path / "x.pt")]) == 2
    assert "Invalid source" in capsys.readouterr().err
