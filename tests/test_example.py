"""examples/train_gpt.py end to end, in this process, one rank: every optimizer
trains a few steps on tiny settings and writes its loss plot."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import example_env
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train_gpt  # noqa: E402

TINY = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def single_process():
    with example_env.single_process():
        yield


@pytest.mark.parametrize("optimizer", sorted(train_gpt.OPTIMIZERS))
def test_each_optimizer_trains_and_plots(optimizer, tmp_path, capsys, single_process):
    plot = tmp_path / "loss.png"
    result = train_gpt.main([*TINY, "--optimizer", optimizer, "--plot", str(plot)])
    assert [step for step, _ in result["history"]] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in result["history"])
    assert [step for step, _ in result["evals"]] == [2, 3]
    assert result["world_size"] == 1
    assert len(result["state_bytes_per_rank"]) == 1
    assert plot.stat().st_size > 1000
    assert plot.read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    # the progress bar: step, loss, tokens/s and this rank's optimizer memory
    assert "3/3 loss " in out
    assert " tok/s " in out
    assert " MiB/rank" in out
    assert f"{optimizer} ZeRO-2" in out
    assert f"wrote {plot}" in out


def test_state_bytes_match_the_optimizer(tmp_path, single_process):
    # AdamW keeps exp_avg and exp_avg_sq: 8 fp32 bytes per parameter on one rank
    # (plus a step counter per bucket).
    result = train_gpt.main([*TINY, "--optimizer", "adamw", "--plot", ""])
    params = sum(p.numel() for p in train_gpt.GPT(train_gpt.PRESETS["tiny"]).parameters())
    params -= (128 - 16) * 128  # --seq-len 16 shortens the position embedding
    (state_bytes,) = result["state_bytes_per_rank"]
    assert 8 * params <= state_bytes <= 8 * params + 64
    # SGD without momentum keeps nothing.
    assert train_gpt.main([*TINY, "--optimizer", "sgd", "--plot", ""])["state_bytes_per_rank"] == [0]


def test_save_params_and_no_plot(tmp_path, capsys, single_process):
    path = tmp_path / "out" / "params.pt"
    train_gpt.main([*TINY, "--stage", "1", "--schedule", "constant", "--plot", "", "--save-params", str(path)])
    saved = torch.load(path)
    assert "embed.weight" in saved
    assert saved["pos_embed.weight"].shape == (16, 128)
    assert "wrote" not in capsys.readouterr().out


@pytest.mark.parametrize("schedule", sorted(train_gpt.schedules.SCHEDULES))
def test_every_schedule_name_builds(schedule):
    config = {**train_gpt.DEFAULTS, "schedule": schedule, "steps": 2}
    values = [train_gpt.build_schedule(config)(step) for step in range(4)]
    assert all(0.0 <= v <= 1.0 for v in values)


def test_checkpoints_every_k_steps_and_resume_continues_the_run(tmp_path, capsys, single_process):
    run = [*TINY, "--steps", "4", "--optimizer", "muon", "--plot", "", "--schedule", "warmup_cosine"]
    whole = train_gpt.main([*run, "--save-params", str(tmp_path / "whole.pt")])
    ckpt = str(tmp_path / "ckpt")
    train_gpt.main([*run, "--steps", "4", "--checkpoint-dir", ckpt, "--save-every", "2"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000000002", "step-000000004"]
    # Drop the last checkpoint: resume from step 2 and train steps 3 and 4 again.
    import shutil

    shutil.rmtree(tmp_path / "ckpt" / "step-000000004")
    resumed = train_gpt.main([*run, "--checkpoint-dir", ckpt, "--resume",
                              "--save-params", str(tmp_path / "resumed.pt")])
    assert "resumed from" in capsys.readouterr().out
    assert [step for step, _ in resumed["history"]] == [3, 4]
    assert resumed["history"] == whole["history"][2:]  # the same batches, bit for bit
    a, b = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "resumed.pt")
    assert all(torch.equal(a[name], b[name]) for name in a)
