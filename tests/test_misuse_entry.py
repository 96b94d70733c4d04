"""Misuse at the entry points: ``import shardopt``, ``shardopt plan``, the launch helpers, the example.

Each case expects one clear line naming the problem (exit code 2 for the command
lines) or the correct answer, quickly: everything here runs in-process.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import pytest

import shardopt
from shardopt import dist as sdist
from shardopt.planner import report
from shardopt.planner.cli import main as plan_main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def plan(capsys, *args: str) -> tuple[int, str, str]:
    """``shardopt plan ARGS``: (exit code, stdout, stderr), argparse's SystemExit included."""
    try:
        code = plan_main(["plan", *args])
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], err


# ----------------------------------------------------------------- import shardopt


@pytest.mark.parametrize("name", ["dist", "schedules", "planner", "rules", "zero"])
def test_subpackages_are_attributes_after_import_shardopt(name):
    module = getattr(shardopt, name)
    assert module.__name__ == f"shardopt.{name}"
    assert name in dir(shardopt)


def test_memory_alias_warns_only_when_a_name_is_used():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory = shardopt.memory  # the module itself: no warning
    with pytest.warns(DeprecationWarning, match=r"shardopt\.memory\.estimate"):
        memory.estimate  # noqa: B018


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        shardopt.nothing  # noqa: B018


# ----------------------------------------------------------------- shardopt plan: refused in one line


def _config(tmp_path: Path, **fields) -> str:
    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 512, "vocab_size": 1000, **fields}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(("args", "message"), [
    (["--params", "inf"], "argument --params: expected a count such as 7.5e9, got 'inf'"),
    (["--params", "nan"], "argument --params: expected a count such as 7.5e9"),
    (["--params", "1e400"], "argument --params: expected a whole count in [1, 1e18]"),
    (["--params", "1.5"], "expected a whole count"),
    (["--params", "0"], "expected a whole count"),
    (["--params", "1e9", "--dp", ","], "argument --dp: expected a value or a comma list of values, got ','"),
    (["--params", "1e9", "--dp", "1000000000"], "Invalid dp: 1,000,000,000 (the planner plans up to 4,096"),
    (["--params", "1e9", "--dp", "8,1e9"], "argument --dp: expected an int >= 1, got '1e9'"),
    (["--params", "1e9", "--dp", str(1 << 60)], "argument --dp: expected an int in [1, 2**48]"),
    (["--params", "1e9", "--search", "--max-dp", "100000"], "Invalid max_dp: 100,000"),
    (["--params", "1e9", "--seq-len", "-5"], "argument --seq-len: expected an int in [1, 2**48]"),
    (["--params", "1e9", "--gpu", "9" * 30], "argument --gpu: expected a GPU's bytes below 2**64"),
    (["--params", "1e9", "--zero-stage", ""], "argument --zero-stage: expected a value or a comma list"),
    (["--params", "1e9", "--plot", "missing/dir/x.png"], "Invalid plot: 'missing/dir/x.png': folder 'missing/dir'"),
    (["--params", "1e9", "--bogus"], "unrecognized arguments: --bogus"),
    (["--model", "."], "a directory without a config.json"),
])
def test_plan_refuses_in_one_line(capsys, args, message):
    one_line_error(*plan(capsys, *args)[::2], message)


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_hidden_layers": 1_000_000_000}, "about 9,000,000,005 parameter tensors (num_hidden_layers="
                                           "1,000,000,000); the planner lists at most 20,000"),
    ({"num_hidden_layers": 1e9}, "field 'num_hidden_layers' must be a positive integer, got 1000000000.0"),
    ({"num_local_experts": 10**9}, "parameter tensors"),
    ({"hidden_size": 1 << 40, "num_attention_heads": 1}, "more than 2**48 elements"),
    ({"vocab_size": -1}, "field 'vocab_size' must be a positive integer"),
])
def test_plan_refuses_configs_it_cannot_plan_quickly(capsys, tmp_path, fields, message):
    start = time.perf_counter()
    one_line_error(*plan(capsys, "--model", _config(tmp_path, **fields))[::2], message)
    assert time.perf_counter() - start < 5


def test_plot_to_a_directory_is_refused(capsys, tmp_path):
    one_line_error(*plan(capsys, "--params", "1e9", "--plot", str(tmp_path))[::2], "is a directory")


# ----------------------------------------------------------------- shardopt plan: answered


def test_model_directory_reads_its_config_json_and_ignores_unknown_keys(capsys, tmp_path):
    _config(tmp_path, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", rope_theta=1e4)
    code, out, err = plan(capsys, "--model", str(tmp_path), "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads(plan(capsys, "--model", str(tmp_path / "config.json"), "--json")[1])


@pytest.mark.parametrize("params", ["1e15", "1e18", "123456789012345678"])
def test_huge_bare_counts_are_arithmetic(capsys, params):
    start = time.perf_counter()
    code, out, err = plan(capsys, "--params", params, "--dp", "4096", "--json")
    assert time.perf_counter() - start < 5
    assert code == 0, err
    data = json.loads(out)
    assert data["total_params"] == int(float(params)) if "e" in params else int(params)
    assert data["per_rank_bytes"]["params"] >= 2 * data["total_params"]  # bf16 parameters, padding included


def test_bare_count_extrapolation_equals_the_exact_plan(monkeypatch):
    # 40 tensors of 1,000 elements (the last 700): extrapolated from 15 and 16, and planned whole.
    for stage in (0, 1, 2, 3):
        for dp in (1, 3, 8):
            for precision in ("mixed", "fp32"):
                options = dict(optimizer="adamw", precision=precision, zero_stage=stage, dp=dp, tp=2, pp=1,
                               bucket_numel=1000)
                monkeypatch.setattr(report, "BARE_EXACT_TENSORS", 16)
                extrapolated = report.estimate(2 * 39_700, **options)
                monkeypatch.setattr(report, "BARE_EXACT_TENSORS", 10**9)
                exact = report.estimate(2 * 39_700, **options)
                assert extrapolated.ranks == exact.ranks, (stage, dp, precision)
                assert extrapolated.rank == exact.rank
                if stage == 3:  # FSDP2: no buckets; one fully_shard group per tensor, and the root
                    assert extrapolated.num_buckets == exact.num_buckets == 0
                    assert extrapolated.fsdp_groups == exact.fsdp_groups == 41
                else:
                    assert extrapolated.num_buckets == exact.num_buckets == 40


def test_header_states_the_largest_bucket_not_a_false_bound(capsys):
    # llama2-7b's embedding (131,072,000 elements) is larger than bucket_numel: its own bucket.
    code, out, _ = plan(capsys, "--model", "llama2-7b", "--zero-stage", "1", "--dp", "2")
    assert code == 0
    header = out.splitlines()[2]
    assert "buckets of <=" not in header
    assert "the largest 131,072,000 elements with padding (bucket_numel=4,194,304" in header


def test_muon_notes_name_their_zero_stage(capsys):
    code, out, _ = plan(capsys, "--model", "llama2-7b", "--optimizer", "muon", "--zero-stage", "1,2", "--dp", "8")
    assert code == 0
    notes = [line for line in out.splitlines() if "note: Muon" in line]
    assert [n.split("(")[0].split()[-1] for n in notes] == ["ZeRO-1", "ZeRO-2"]


class _ClosedPipe:
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_json_into_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    # `shardopt plan ... --json | head`: the reader left; no traceback.
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert plan_main(["plan", "--params", "1e9", "--json"]) == 0
    monkeypatch.undo()
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------- launch environment


def test_nccl_without_a_gpu_is_named(monkeypatch):
    monkeypatch.setattr(sdist.torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="Invalid backend: nccl needs a CUDA GPU"):
        sdist.check_backend("nccl")
    sdist.check_backend("gloo")


def test_nccl_from_the_environment_is_refused_before_anything_starts(monkeypatch):
    monkeypatch.setattr(sdist.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SHARDOPT_BACKEND", "nccl")
    for name, value in {"RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="nccl needs a CUDA GPU"):
        sdist.init_from_env()
    assert not sdist.dist.is_initialized()


@pytest.mark.parametrize(("timeout_s", "env", "expected"), [
    (None, {}, 600.0),
    (None, {"SHARDOPT_TIMEOUT_S": "30"}, 30.0),
    (5, {"SHARDOPT_TIMEOUT_S": "30"}, 5.0),
    (None, {"SHARDOPT_TIMEOUT_S": "0"}, "Invalid SHARDOPT_TIMEOUT_S: '0'"),
    (None, {"SHARDOPT_TIMEOUT_S": "soon"}, "Invalid SHARDOPT_TIMEOUT_S: 'soon'"),
    (float("inf"), {}, "Invalid timeout_s: inf"),
    (-1, {}, "Invalid timeout_s: -1"),
])
def test_collective_timeout(timeout_s, env, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
            sdist.collective_timeout_s(timeout_s, env)
    else:
        assert sdist.collective_timeout_s(timeout_s, env) == expected


# ----------------------------------------------------------------- the example's arguments


@pytest.fixture(scope="module")
def train_gpt():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_gpt
    finally:
        sys.path.remove(str(EXAMPLES))
    return train_gpt


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "steps must be an int >= 1, got 0"),
    (["--eval-every", "0"], "eval_every must be an int >= 1, got 0"),
    (["--batch-size", "-2"], "batch_size must be an int >= 1, got -2"),
    (["--warmup-steps", "-1"], "warmup_steps must be an int >= 0, got -1"),
    (["--config", "missing.toml"], "missing.toml"),
])
def test_example_refuses_bad_arguments(train_gpt, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.parse_args(args)
    one_line_error(exit_info.value.code, capsys.readouterr().err, message)


def test_example_unknown_config_key_names_it_and_the_valid_keys(train_gpt, capsys, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('stpes = 10\n')
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.parse_args(["--config", str(path)])
    one_line_error(exit_info.value.code, capsys.readouterr().err, "unknown keys ['stpes'] (valid: ['batch_size'")


def test_example_nccl_without_a_gpu(train_gpt, capsys, monkeypatch):
    monkeypatch.setattr(train_gpt.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.parse_args(["--backend", "nccl"])
    one_line_error(exit_info.value.code, capsys.readouterr().err, "--backend nccl needs a CUDA GPU")


def test_example_sets_omp_num_threads_before_importing_torch():
    source = (EXAMPLES / "train_gpt.py").read_text()
    assert source.index('os.environ.setdefault("OMP_NUM_THREADS"') < source.index("\nimport torch\n")
