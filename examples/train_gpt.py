"""Train a small byte-level GPT data-parallel with shardopt's ZeroOptimizer, or on FSDP2 (x TP).

The text is the Python standard library's own source code, present on every
machine with Python, read as bytes (no tokenizer, no download).

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --config configs/llm_recipe.toml
    python examples/train_gpt.py --optimizer sgd --steps 50      # one process
    mpirun -n 2 python examples/train_gpt.py                      # MPI (needs mpi4py)
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --config configs/fsdp2_muon.toml
    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --config configs/fsdp2_tp_muon.toml

launch/ has the multi-node torchrun, mpirun and Slurm variants. The default
(configs/default.toml) is Muon with its AdamW group, ZeRO-2, 500 steps of 16
sequences of 128 bytes: about 5 minutes on 2 idle CPU cores, ending at a
validation loss of 1.37 nats/byte against 3.15 for byte frequencies alone
(the unigram entropy).

Every rank draws the same global batch and trains on its own slice of it, so
any world size follows the same trajectory as one process on the whole batch.

``parallel = "zero"`` (the default) keeps every parameter whole on every rank and
shards the optimizer (``shardopt.ZeroOptimizer``, ZeRO-1/2). ``parallel = "fsdp2"``
shards the parameters with PyTorch's ``fully_shard``, and ``tp = N`` also splits each
block's matrices over N ranks (a dp x tp mesh; ranks of one dp index share a data
slice); shardopt's optimizer then steps the DTensor shards (``examples/fsdp_setup.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

# Before torch is imported: its thread pool reads this once. A data-parallel rank per
# core with one intra-op thread each; a single process is also 4-5x faster with it
# on a small, shared machine than with torch's default of one thread per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fsdp_setup
from gpt_model import GPT, PRESETS, num_params

import shardopt
from shardopt import checkpoint, schedules
from shardopt.dist import device_for_backend, init_from_env

OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd": (shardopt.SGD, {"lr": 0.3}),
    "momentum": (shardopt.SGD, {"lr": 0.1, "momentum": 0.9}),
    "nesterov": (shardopt.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "adagrad": (shardopt.Adagrad, {"lr": 0.02}),
    "rmsprop": (shardopt.RMSprop, {"lr": 1e-3}),
    "adam": (shardopt.Adam, {"lr": 1e-3}),
    "adamw": (shardopt.AdamW, {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}),
    "lion": (shardopt.Lion, {"lr": 3e-4, "weight_decay": 0.1}),
    # Muon on the hidden matrices, AdamW on embeddings, head, norms and biases.
    "muon": (shardopt.Muon, {"lr": 0.04, "adamw_lr": 3e-3}),
}

DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "optimizer": "muon",
    "stage": 2,
    "matrix_layout": "balanced",  # Muon under ZeRO: "balanced" or "whole" (see the README)
    "parallel": "zero",  # "zero": ZeroOptimizer; "fsdp2": fully_shard + shardopt's optimizer on the shards
    "tp": 1,  # tensor-parallel ranks per data-parallel index (fsdp2 only)
    "steps": 500,
    "batch_size": 16,
    "seq_len": 128,
    "schedule": "warmup_cosine",
    "warmup_steps": 15,
    "min_ratio": 0.1,
    "max_grad_norm": 1.0,
    "seed": 0,
    "plot": "runs/loss.png",
    "data_bytes": 4_000_000,
    "eval_every": 25,
    "hyperparameters": {},
}


def load_config(path: str | None) -> dict[str, Any]:
    config = dict(DEFAULTS)
    if path is None:
        return config
    text = Path(path).read_text()
    if path.endswith(".toml"):
        import tomllib

        loaded = tomllib.loads(text)
    else:
        loaded = json.loads(text)
    unknown = set(loaded) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (valid: {sorted(DEFAULTS)})")
    config.update(loaded)
    return config


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a TOML or JSON file in configs/")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS))
    parser.add_argument("--stage", type=int, choices=(1, 2), help="ZeRO stage (parallel zero)")
    parser.add_argument("--parallel", choices=("zero", "fsdp2"),
                        help="zero: ZeroOptimizer, parameters whole; fsdp2: fully_shard (x TP with --tp)")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (with --parallel fsdp2; divides the heads)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, dest="batch_size", help="global batch (sequences)")
    parser.add_argument("--lr", type=float, help="peak LR (muon: of the Muon group; set adamw_lr in a config)")
    parser.add_argument("--schedule", choices=sorted(schedules.SCHEDULES))
    parser.add_argument("--model", choices=sorted(PRESETS))
    parser.add_argument("--plot", help="loss-curve PNG path ('' to skip)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--seq-len", type=int, dest="seq_len")
    parser.add_argument("--warmup-steps", type=int, dest="warmup_steps")
    parser.add_argument("--eval-every", type=int, dest="eval_every")
    parser.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl when every rank has a GPU")
    parser.add_argument("--save-params", dest="save_params", metavar="PATH",
                        help="rank 0 saves the final parameters here (torch.save of a name -> tensor dict)")
    parser.add_argument("--checkpoint-dir", dest="checkpoint_dir", metavar="DIR",
                        help="distributed checkpoints go to DIR/step-N (shardopt.checkpoint.save)")
    parser.add_argument("--save-every", dest="save_every", type=int, metavar="K",
                        help="save a checkpoint every K steps (needs --checkpoint-dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --checkpoint-dir, at any world size")
    args = parser.parse_args(argv)
    if (args.save_every or args.resume) and not args.checkpoint_dir:
        parser.error("--save-every and --resume need --checkpoint-dir")
    try:
        config = load_config(args.config)
    except (OSError, ValueError) as err:  # a missing file, bad TOML/JSON, an unknown key
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    config["backend"] = config["save_params"] = config["checkpoint_dir"] = config["save_every"] = None
    for key, value in vars(args).items():
        if key not in ("config", "lr", "resume") and value is not None:
            config[key] = value
    config["resume"] = args.resume
    config["hyperparameters"] = dict(config["hyperparameters"])
    if args.lr is not None:
        config["hyperparameters"]["lr"] = args.lr
    problem = check_config(config)
    if problem:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    return config


def check_config(config: dict[str, Any]) -> str | None:
    """The first setting that cannot run, as one line naming it, or None."""
    for key, low in (("steps", 1), ("eval_every", 1), ("batch_size", 1), ("seq_len", 1), ("warmup_steps", 0),
                     ("data_bytes", 1)):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"{key} must be an int >= {low}, got {value!r}"
    if config["parallel"] not in ("zero", "fsdp2"):
        return f"parallel must be 'zero' or 'fsdp2', got {config['parallel']!r}"
    if config["model"] in PRESETS and (problem := fsdp_setup.tp_problem(PRESETS[config["model"]], config["tp"])):
        return problem
    if config["tp"] != 1 and config["parallel"] != "fsdp2":
        return f"tp {config['tp']} needs parallel = 'fsdp2' (ZeroOptimizer keeps every parameter whole)"
    if config["backend"] == "nccl" and not torch.cuda.is_available():
        return "--backend nccl needs a CUDA GPU and this process sees none; use --backend gloo"
    return None


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The standard library's .py files, concatenated in a fixed order, as bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def build_schedule(config: dict[str, Any]) -> schedules.Schedule:
    """The LR multiplier per step; warmup is capped below ``steps`` so short runs work."""
    name, steps, ratio = config["schedule"], config["steps"], config["min_ratio"]
    warmup = min(config["warmup_steps"], steps - 1)
    if name == "warmup_cosine":
        return schedules.warmup_cosine(warmup, steps, min_ratio=ratio)
    if name == "llm_recipe":
        return schedules.llm_recipe(steps, warmup_steps=warmup, min_ratio=ratio)
    if name == "cosine_decay":
        return schedules.cosine_decay(steps, min_ratio=ratio)
    if name == "linear_warmup":
        return schedules.linear_warmup(warmup)
    if name == "warmup_stable_decay":  # the last 20% of the steps cool down
        decay = max(1, steps // 5)
        return schedules.warmup_stable_decay(warmup, max(0, steps - warmup - decay), decay, min_ratio=ratio)
    if name == "step_decay":  # x0.1 after each third of the run
        return schedules.step_decay(max(1, steps // 3))
    return schedules.build_schedule(name)


def build_optimizer(model: torch.nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    """ZeroOptimizer over the whole model, or (fsdp2) shardopt's optimizer on its DTensor shards."""
    optimizer_class, hyperparameters = OPTIMIZERS[config["optimizer"]]
    hyperparameters = {**hyperparameters, **config["hyperparameters"]}
    # TOML and JSON have no tuples: betas = [0.9, 0.95] means (0.9, 0.95).
    hyperparameters = {k: tuple(v) if isinstance(v, list) else v for k, v in hyperparameters.items()}
    if config["parallel"] == "fsdp2":  # clipping is the training loop's there (fsdp_setup.clip)
        return fsdp_setup.build_optimizer(model, optimizer_class, hyperparameters)
    params = shardopt.muon_param_groups(model) if optimizer_class is shardopt.Muon else model.parameters()
    return shardopt.ZeroOptimizer(params, optimizer_class, stage=config["stage"],
                                  matrix_layout=config["matrix_layout"],
                                  max_grad_norm=config["max_grad_norm"] or None, **hyperparameters)


def progress(step: int, total: int, loss: float, tokens_per_s: float, lr: float, state_mib: float,
             val: float | None = None, width: int = 24) -> str:
    filled = round(width * step / total)
    bar = "#" * filled + "." * (width - filled)
    val_text = f" val {val:.3f}" if val is not None else ""
    return (f"[{bar}] {step:4d}/{total} loss {loss:.3f}{val_text} lr {lr:.2e} {tokens_per_s:,.0f} tok/s "
            f"optim {state_mib:.2f} MiB/rank")


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """This rank's optimizer memory: its shard of the states plus separate fp32 masters."""
    if not isinstance(opt, shardopt.ZeroOptimizer):
        return fsdp_setup.state_bytes(opt)
    report = opt.memory_report()
    return sum(report["optimizer_states"].values()) + report["master_params"]


def parallel_label(config: dict[str, Any]) -> str:
    if config["parallel"] == "zero":
        return f"ZeRO-{config['stage']}"
    return "FSDP2" if config["tp"] == 1 else f"FSDP2 x TP{config['tp']}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_args(argv)
    joined = dist.is_initialized()  # a caller's process group is used, and left alone
    launched = init_from_env(config["backend"])
    fsdp = config["parallel"] == "fsdp2"
    if fsdp and not dist.is_initialized():
        if config["tp"] > 1:  # one process has no second rank to split matrices with
            print(f"note: one process: tp {config['tp']} needs {config['tp']} ranks; running tp 1")
            config["tp"] = 1
        fsdp_setup.ensure_process_group()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = device_for_backend()
    torch.manual_seed(config["seed"])
    preset = PRESETS[config["model"]]
    model_config = type(preset)(**{**preset.__dict__, "seq_len": config["seq_len"]})
    model = GPT(model_config).to(device)
    # The slice of the global batch this rank trains on: under TP, ranks of one dp index share one.
    slice_index, slices = rank, world
    if fsdp:
        layout = fsdp_setup.shard_model(model, device, config["tp"])
        slice_index, slices = layout.dp_rank, layout.dp_size
    if config["batch_size"] % slices:
        raise ValueError(f"batch_size {config['batch_size']} is not divisible by the {slices} data-parallel ranks")
    opt = build_optimizer(model, config)
    scheduler = schedules.as_lr_scheduler(opt, build_schedule(config))
    data = stdlib_bytes(config["data_bytes"])
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]
    unigram = unigram_entropy(train)
    if rank == 0:
        how = launched.launcher if launched else "single process"
        print(f"shardopt example: {num_params(model):,} parameters, {world} rank(s) via {how}, "
              f"{config['optimizer']} {parallel_label(config)}, {config['steps']} steps, "
              f"{len(data):,} bytes of stdlib source (unigram entropy {unigram:.3f} nats/byte)")
    gen = torch.Generator().manual_seed(config["seed"])
    seq = config["seq_len"] + 1
    # The data generator, the LR scheduler and the step count are saved next to model and
    # optimizer (plain values: every rank holds the same), so a resumed run draws the same batches.
    def state() -> dict[str, Any]:
        # The same for ZeroOptimizer and for shardopt's optimizer on FSDP2 DTensors (one format).
        return {"model": model.state_dict(), "optim": checkpoint.OptimizerState(model, opt),
                "train": {"scheduler": scheduler.state_dict(), "data": gen.get_state()}}

    first = 1
    if config["resume"] and (path := checkpoint.latest(config["checkpoint_dir"])) is not None:
        resumed = state()
        checkpoint.load(resumed, path)
        scheduler.load_state_dict(resumed["train"]["scheduler"])
        gen.set_state(resumed["train"]["data"])
        first = checkpoint.step_of(path) + 1
        if rank == 0:
            print(f"resumed from {path} (step {first - 1})")
    history: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    start = time.perf_counter()
    tokens_seen = 0
    per_rank: list[int] = []
    # A terminal gets a bar redrawn in place each step, keeping every 10th of the
    # run; a log file gets 20 lines.
    keep_every = max(1, config["steps"] // (10 if sys.stdout.isatty() else 20))
    log_every = 1 if sys.stdout.isatty() else keep_every
    for step in range(first, config["steps"] + 1):
        starts = torch.randint(0, len(train) - seq, (config["batch_size"],), generator=gen)
        batch = torch.stack([train[s : s + seq] for s in starts.tolist()])
        local = batch.chunk(slices)[slice_index].to(device)
        loss = model.loss(local)
        loss.backward()
        if fsdp and config["max_grad_norm"]:
            fsdp_setup.clip(model, config["max_grad_norm"])
        opt.step()
        opt.zero_grad()
        scheduler.step()
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        history.append((step, mean_loss.item()))
        tokens_seen += batch.numel() - batch.shape[0]
        if step == first:  # states exist after the first step; one gather, not one per step
            per_rank = [optimizer_state_bytes(opt)] * world
            if world > 1:
                dist.all_gather_object(per_rank, per_rank[0])
        if config["save_every"] and step % config["save_every"] == 0:
            checkpoint.save(state(), config["checkpoint_dir"], step)
        if step % config["eval_every"] == 0 or step == config["steps"]:
            evals.append((step, evaluate(model, val, seq, config["seed"], device)))
        if rank == 0 and (step % log_every == 0 or step == config["steps"]):
            rate = tokens_seen / (time.perf_counter() - start)
            line = progress(step, config["steps"], history[-1][1], rate, opt.param_groups[0]["lr"],
                            max(per_rank) / 2**20, evals[-1][1] if evals else None)
            if sys.stdout.isatty():
                keep = step % keep_every == 0 or step == config["steps"]
                print("\r\x1b[K" + line, end="\n" if keep else "", flush=True)
            else:
                print(line, flush=True)
    elapsed = time.perf_counter() - start
    if config["save_params"]:
        params = fsdp_setup.full_parameters(model)  # whole tensors; a collective under FSDP2
        if rank == 0:
            Path(config["save_params"]).parent.mkdir(parents=True, exist_ok=True)
            torch.save(params, config["save_params"])
    result = {"final_loss": history[-1][1], "val_loss": evals[-1][1], "history": history, "evals": evals,
              "state_bytes_per_rank": per_rank, "comm_bytes": None if fsdp else opt.comm_stats(),
              "world_size": world, "seconds": elapsed}
    if rank == 0:
        rules = opt if fsdp else opt.inner
        unsharded = sum(rules.rule_for_group(g).state_bytes(g, p.numel(), torch.float32)
                        for g in opt.param_groups for p in g["params"])
        print(f"optimizer state per rank: {', '.join(f'{b / 2**20:.2f} MiB' for b in per_rank)} "
              f"(unsharded: {unsharded / 2**20:.2f} MiB); validation loss {evals[-1][1]:.3f} "
              f"(unigram entropy {unigram:.3f}); {elapsed:.1f} s")
        if config["plot"]:
            write_plot(config["plot"], history, evals, config, unigram)
    if dist.is_initialized() and not joined:
        dist.destroy_process_group()
    return result


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, seq: int, seed: int, device: torch.device, batches: int = 4) -> float:
    gen = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, len(val) - seq, (batches * 8,), generator=gen)
    batch = torch.stack([val[s : s + seq] for s in starts.tolist()]).to(device)
    return float(model.loss(batch))


def unigram_entropy(data: torch.Tensor) -> float:
    """Entropy of the byte frequencies (nats/byte): the loss of a model that ignores context."""
    p = torch.bincount(data, minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def write_plot(path: str, history: list, evals: list, config: dict[str, Any], unigram: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'shardopt[dev]'); no plot written")
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*history), label="train (mean over ranks)", lw=1)
    ax.plot(*zip(*evals), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_ylim(top=min(6.0, max(loss for _, loss in history) + 0.2))
    ax.set_title(f"{config['optimizer']} {parallel_label(config)} on stdlib bytes")
    ax.axhline(math.log(256), color="grey", ls=":", lw=1, label="uniform (ln 256)")
    ax.axhline(unigram, color="grey", ls="--", lw=1, label="unigram (byte frequencies)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
