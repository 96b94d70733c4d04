"""Every file in configs/ loads with the example's load_config and trains two
steps in this process (one rank); the recipes say what they promise."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import example_env
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train_gpt  # noqa: E402

# DeepSpeed configs are the plugin's (tests/test_deepspeed.py translates them), not the example's.
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*") if not p.name.startswith("deepspeed_"))


def test_configs_exist():
    names = {path.name for path in CONFIGS}
    assert {"default.toml", "llm_recipe.toml", "muon.toml"} <= names
    assert all(path.suffix in (".toml", ".json") for path in CONFIGS), names


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_config_loads_and_trains_two_steps(path, tmp_path):
    config = train_gpt.load_config(str(path))
    assert config["optimizer"] in train_gpt.OPTIMIZERS
    assert config["schedule"] in train_gpt.schedules.SCHEDULES
    assert config["batch_size"] % 2 == 0, "the README runs 2 ranks"
    with example_env.single_process():
        plot = tmp_path / "loss.png"
        result = train_gpt.main(["--config", str(path), "--steps", "2", "--plot", str(plot)])
    assert len(result["history"]) == 2
    assert all(math.isfinite(loss) for _, loss in result["history"])
    assert plot.stat().st_size > 0


def test_default_config_is_the_example_default():
    assert train_gpt.load_config(str(ROOT / "configs" / "default.toml")) == train_gpt.load_config(None)


def test_llm_recipe_is_the_chapters():
    # Chapter 10.3: AdamW, beta1 0.9, beta2 0.95, weight decay 0.1, linear warmup, cosine to 10% of the peak.
    config = train_gpt.load_config(str(ROOT / "configs" / "llm_recipe.toml"))
    assert config["optimizer"] == "adamw"
    assert config["schedule"] == "llm_recipe"
    assert config["hyperparameters"]["betas"] == [0.9, 0.95]
    assert config["hyperparameters"]["weight_decay"] == 0.1
    assert config["min_ratio"] == 0.1
    assert 0 < config["warmup_steps"] < config["steps"]
    schedule = train_gpt.build_schedule(config)
    assert schedule(0) == 0.0
    assert schedule(config["warmup_steps"]) == 1.0
    assert math.isclose(schedule(config["steps"]), 0.1)


def test_muon_recipe_has_its_adamw_group():
    config = train_gpt.load_config(str(ROOT / "configs" / "muon.toml"))
    assert config["optimizer"] == "muon"
    model = train_gpt.GPT(train_gpt.PRESETS[config["model"]])
    opt = train_gpt.build_optimizer(model, config)
    groups = opt.param_groups
    assert [g["use_muon"] for g in groups] == [True, False]
    hp = config["hyperparameters"]
    assert groups[0]["lr"] == hp["lr"]
    assert groups[1]["lr"] == hp["adamw_lr"]
    assert groups[1]["betas"] == tuple(hp["adamw_betas"])
    adamw_names = {id(p) for p in groups[1]["params"]}
    assert id(model.embed.weight) in adamw_names
    assert id(model.lm_head.weight) in adamw_names
    assert all(p.ndim == 2 for p in groups[0]["params"])


def test_unknown_keys_are_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('optimizer = "adamw"\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        train_gpt.load_config(str(bad))
