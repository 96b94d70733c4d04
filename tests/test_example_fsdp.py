"""examples/train_gpt.py on FSDP2 and FSDP2 x TP (``--parallel fsdp2``, ``--tp``), in spawned gloo ranks.

The reference is the example's default path, ZeRO-2, run here in this process (one
rank: ZeRO's trajectory does not depend on the world size). One spawn of 4 ranks
then runs the example's ``main`` on tiny settings: FSDP2 over the 4 ranks (fp32
Newton-Schulz) and a 2 x 2 mesh (dp 2 x tp 2, the default bf16), with Muon and its
AdamW group, clipping on. Every path
draws the same global batches from the same weights, so the losses of the first
steps must agree closely. The FSDP2 x TP run also checkpoints, and a run resumed
from its step 2 must continue it bitwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import example_env
import pytest
import torch
from dist_harness import run_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train_gpt  # noqa: E402

STEPS = 3
TINY = ["--steps", str(STEPS), "--batch-size", "4", "--seq-len", "16", "--eval-every", str(STEPS), "--plot", ""]
# The paths sum the same gradients in other orders (reduce-scatter vs ZeRO's buckets,
# TP's split matmuls): last-bit differences, which a bf16 Newton-Schulz rounding or
# Adam's update where a gradient is near zero can amplify. Measured on the losses of
# steps 1-4: 0.0 (FSDP2) and <= 1e-5 (FSDP2 x TP).
LOSS_TOL = 1e-3


def _write_configs(tmp: Path) -> None:
    for ns_dtype in ("bfloat16", "float32"):
        config = {"optimizer": "muon", "data_bytes": 200_000, "hyperparameters": {"ns_dtype": ns_dtype}}
        (tmp / f"muon_{ns_dtype}.json").write_text(json.dumps(config))


def _config(tmp: Path, ns_dtype: str) -> list[str]:
    """The example's arguments: Muon with ``ns_dtype`` Newton-Schulz (a config from _write_configs)."""
    return ["--config", str(tmp / f"muon_{ns_dtype}.json"), *TINY]


def _ranks_main(rank: int, world: int, tmp: str) -> dict:
    """The FSDP2 paths in this rank, on the harness's process group (which ``main`` joins)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # no launcher: main() must use the group it is handed
    bf16, fp32 = _config(Path(tmp), "bfloat16"), _config(Path(tmp), "float32")
    ckpt = ["--checkpoint-dir", f"{tmp}/ckpt"]
    out = {}
    for name, args in (("fsdp2_tp", [*bf16, "--parallel", "fsdp2", "--tp", "2", *ckpt, "--save-every", "2",
                                     "--save-params", f"{tmp}/whole.pt"]),
                       ("fsdp2_fp32", [*fp32, "--parallel", "fsdp2"])):
        result = train_gpt.main(args)
        out[name] = {"history": result["history"], "state_bytes": result["state_bytes_per_rank"]}
    # Saved at step 2 only (of 3): the resumed run continues from there.
    resumed = train_gpt.main([*bf16, "--parallel", "fsdp2", "--tp", "2", *ckpt, "--resume",
                              "--save-params", f"{tmp}/resumed.pt"])
    out["resumed"] = {"history": resumed["history"]}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], Path]:
    """Each rank's histories and state sizes, and the directory the runs wrote to (one spawn)."""
    tmp = tmp_path_factory.mktemp("example_fsdp")
    _write_configs(tmp)
    return run_ranks(_ranks_main, 4, str(tmp), timeout=120), tmp


@pytest.fixture(scope="module")
def zero(tmp_path_factory) -> dict[str, dict]:
    """ZeRO-2 (the example's default path) in this process, with bf16 and fp32 Newton-Schulz."""
    tmp = tmp_path_factory.mktemp("example_zero")
    _write_configs(tmp)
    with example_env.single_process():
        return {ns: train_gpt.main(_config(tmp, ns)) for ns in ("bfloat16", "float32")}


def _worst(history: list, reference: list) -> float:
    assert [step for step, _ in history] == [step for step, _ in reference]
    return max(abs(a - b) for (_, a), (_, b) in zip(history, reference))


def test_fsdp2_tp_follows_the_zero_path(runs, zero):
    out, _ = runs
    reference = zero["bfloat16"]["history"]
    assert [step for step, _ in reference] == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) for _, loss in reference)
    assert reference[-1][1] < reference[0][1]  # it trains
    history = out[0]["fsdp2_tp"]["history"]
    assert _worst(history, reference) <= LOSS_TOL, (history, reference)
    # Every rank logs the same mean loss.
    assert all(o["fsdp2_tp"]["history"] == out[0]["fsdp2_tp"]["history"] for o in out)


def test_fsdp2_with_fp32_newton_schulz_follows_the_zero_path(runs, zero):
    """fp32 Newton-Schulz batches a rank's owned matrices of one shape together: the owner
    must assemble each from its own pieces, whatever order the batches take them in."""
    out, _ = runs
    assert _worst(out[0]["fsdp2_fp32"]["history"], zero["float32"]["history"]) <= LOSS_TOL


def test_optimizer_state_is_sharded(runs, zero):
    out, _ = runs
    (whole,) = zero["bfloat16"]["state_bytes_per_rank"]
    fsdp, tp = (out[0][name]["state_bytes"] for name in ("fsdp2_fp32", "fsdp2_tp"))
    # FSDP2 over 4 ranks: the Muon and AdamW states of one process, cut 4 ways evenly.
    assert abs(sum(fsdp) - whole) <= 0.01 * whole
    assert max(fsdp) <= 1.01 * whole / 4
    # 2 x 2: TP's matrices are cut 4 ways, the parameters left out of TP (embeddings, head,
    # norms) only 2 (over dp; the tp ranks hold the same shard).
    assert whole / 4 < min(tp)
    assert max(tp) < whole / 2


def test_fsdp2_tp_resumes_bitwise(runs):
    out, tmp = runs
    assert out[0]["resumed"]["history"] == out[0]["fsdp2_tp"]["history"][2:]
    whole, resumed = torch.load(tmp / "whole.pt"), torch.load(tmp / "resumed.pt")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert whole["blocks.0.qkv.weight"].shape == (384, 128)  # saved whole, not a shard


@pytest.mark.parametrize(("argv", "message"), [
    (["--parallel", "fsdp2", "--tp", "3"], "tp 3 does not divide the model's 4 attention heads"),
    (["--tp", "2"], "tp 2 needs parallel = 'fsdp2'"),
    (["--parallel", "fsdp2", "--tp", "0"], "tp must be an int >= 1, got 0"),
])
def test_bad_tp_is_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
