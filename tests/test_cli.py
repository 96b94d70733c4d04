"""``shardopt plan`` through ``main([...])``: outputs, JSON keys, search, plot and errors."""

from __future__ import annotations

import json

import pytest

from shardopt import planner
from shardopt.planner.cli import main

CATEGORIES = {"params", "grads", "master_params", "optimizer_states", "activations", "buffers", "total"}


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_default_table_has_every_category_in_gb_and_gib_with_sources(capsys):
    code, out, _ = run(capsys, "--model", "llama2-7b", "--optimizer", "adamw", "--zero-stage", "2", "--dp", "8")
    assert code == 0
    assert "GB" in out
    assert "GiB" in out
    assert "6,738,415,616 parameters" in out
    rows = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert {"params", "grads", "master_params", "optimizer_states", "activations", "buffers", "total"} <= rows
    for source in ("ZeRO sec. 5.2", "ZeRO sec. 5.1", "Korthikanti et al. 2022 Table 2", "MAX_IN_FLIGHT"):
        assert source in out
    assert "exp_avg_sq" in out
    assert "fits" in out


def test_json_has_the_documented_keys_and_matches_estimate(capsys):
    code, out, _ = run(capsys, "--model", "llama2-70b", "--optimizer", "muon", "--zero-stage", "1", "--dp", "8",
                       "--gpu", "h200-141gb", "--json")
    data = json.loads(out)
    assert code == 0
    assert {"total_params", "matrix_params", "per_rank_bytes", "fits"} <= set(data)
    assert set(data["per_rank_bytes"]) == CATEGORIES
    per_rank = data["per_rank_bytes"]
    assert per_rank["total"] == sum(v for k, v in per_rank.items() if k != "total")
    assert data["total_params"] == 68_976_648_192
    assert data["matrix_params"] == 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    expected = planner.estimate("llama2-70b", optimizer="muon", zero_stage=1, dp=8, gpu="h200-141gb")
    assert per_rank == expected.per_rank_bytes()
    assert data["fits"] is expected.fits is False
    assert data["optimizer_states"].keys() == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize(("stage", "expected_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_example_from_the_command_line(capsys, stage, expected_gb):
    code, out, _ = run(capsys, "--params", "7.5e9", "--optimizer", "adam", "--precision", "mixed",
                       "--zero-stage", str(stage), "--dp", "64", "--json")
    per_rank = json.loads(out)["per_rank_bytes"]
    model_states = sum(per_rank[k] for k in ("params", "grads", "master_params", "optimizer_states"))
    assert code == 0
    assert round(model_states / 1e9, 1) == expected_gb
    assert per_rank["activations"] == 0


def test_sweep_prints_one_line_per_configuration(capsys):
    code, out, _ = run(capsys, "--model", "llama2-7b", "--optimizer", "adamw,muon,sgd", "--zero-stage", "0,3",
                       "--dp", "8,64")
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip().split()[0] in ("adamw", "muon", "sgd")]
    assert len(lines) == 3 * 2 * 2


def test_search_finds_the_smallest_fitting_dp_per_stage(capsys):
    args = ["--model", "llama2-7b", "--optimizer", "adamw", "--gpu", "a100-40gb", "--seq-len", "2048",
            "--max-dp", "64"]
    code, out, _ = run(capsys, *args, "--search", "--json")
    data = json.loads(out)
    assert code == 0
    for row in data["search"]:
        if row["dp"] is None:
            assert not planner.estimate("llama2-7b", zero_stage=row["zero_stage"], dp=64, gpu="a100-40gb",
                                       seq_len=2048).fits
            continue
        assert row["report"]["fits"]
        if row["dp"] > 1:
            smaller = planner.estimate("llama2-7b", zero_stage=row["zero_stage"], dp=row["dp"] - 1,
                                      gpu="a100-40gb", seq_len=2048)
            assert not smaller.fits
    fitting = [r for r in data["search"] if r["dp"] is not None]
    best = min(fitting, key=lambda r: (r["dp"], r["zero_stage"]))
    assert data["choice"] == {"zero_stage": best["zero_stage"], "dp": best["dp"]}
    code, out, _ = run(capsys, *args, "--search")
    assert f"choice: ZeRO-{best['zero_stage']} at dp={best['dp']}" in out


def test_plot_writes_a_png(capsys, tmp_path):
    path = tmp_path / "plan.png"
    code, _, err = run(capsys, "--model", "llama2-7b", "--max-dp", "8", "--plot", str(path))
    assert code == 0
    assert f"wrote {path}" in err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_in_bytes(capsys):
    code, out, _ = run(capsys, "--model", "llama2-7b", "--dp", "8", "--gpu", "1000", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["gpu_bytes"] == 1000
    assert data["fits"] is False


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "llama9"], "presets: gpt3-175b, llama2-13b, llama2-70b"),
    (["--model", "llama2-70b", "--tp", "3"], "Invalid tp: 3 does not divide num_attention_heads=64"),
    (["--model", "llama2-70b", "--tp", "2", "--pp", "3"], "Invalid pp: 3 does not divide num_hidden_layers=80"),
    (["--model", "llama2-7b", "--sequence-parallel"], "give --tp > 1"),
    (["--params", "1e9", "--optimizer", "muon"], "muon needs parameter shapes"),
    (["--model", "missing/config.json"], "missing/config.json: no such file"),
])
def test_errors_return_2_and_say_what_is_wrong(capsys, args, message):
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in err


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "llama2-7b", "--optimizer", "adamax"], "unknown optimizer 'adamax' (choose from sgd, momentum"),
    (["--model", "llama2-7b", "--precision", "fp8"], "unknown precision 'fp8' (choose from fp32, bf16, mixed)"),
    (["--model", "llama2-7b", "--zero-stage", "4"], "unknown ZeRO stage '4' (choose from 0, 1, 2, 3)"),
    (["--model", "llama2-7b", "--gpu", "h800"], "unknown gpu 'h800' (choose from a100-40gb"),
    (["--params", "lots"], "expected a count such as 7.5e9"),
])
def test_bad_choices_list_the_valid_ones(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_malformed_config_json_names_the_field(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
                                "num_hidden_layers": "32", "intermediate_size": 11008, "vocab_size": 32000}))
    code, _, err = run(capsys, "--model", str(path))
    assert code == 2
    assert "field 'num_hidden_layers' must be a positive integer, got '32'" in err


def test_the_shardopt_command_dispatches_plan_and_checkpoint_convert(capsys, tmp_path):
    from shardopt.cli import main as shardopt_main

    assert shardopt_main([]) == 2
    assert "shardopt checkpoint convert SRC DST" in capsys.readouterr().out
    assert shardopt_main(["--help"]) == 0
    assert shardopt_main(["checkpoint", "merge"]) == 2
    assert "expected 'convert SRC DST'" in capsys.readouterr().err
    assert shardopt_main(["checkpoint", "convert", str(tmp_path / "missing"), str(tmp_path / "x.pt")]) == 2
    assert "Invalid source" in capsys.readouterr().err
    assert shardopt_main(["plan", "--model", "llama2-7b", "--dp", "8"]) == 0
    assert "llama2-7b" in capsys.readouterr().out
