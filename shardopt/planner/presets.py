"""Published models for the memory planner, and what one rank of each pipeline stage holds.

A preset is a minimal Hugging Face ``config.json`` (dimensions from the model's
own) with its published parameter count; :mod:`shardopt.planner.architectures` turns
it, or any ``config.json``, into parameter shapes. :func:`model_params`
resolves whatever :func:`shardopt.planner.estimate` is given (a preset name, a
``config.json`` path or dict, a bare parameter count or an ``nn.Module``) into
the ``(name, shape, requires_grad)`` lists the planner plans.

The architecture names (``Architecture``, ``from_config``, ``param_shapes``,
``backward_order``, ...) stay importable from here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .architectures import (
    GPT2_TYPES,
    LLAMA_TYPES,
    UNSUPPORTED_FIELDS,
    Architecture,
    Shape,
    backward_order,
    count_params,
    from_config,
    param_shapes,
    stage_tensor_count,
)

__all__ = [
    "GPT2_TYPES", "GPUS", "LLAMA_TYPES", "MAX_TENSORS", "MAX_TENSOR_NUMEL",
    "PRESETS", "UNSUPPORTED_FIELDS", "Architecture", "ModelParams", "Named",
    "Preset", "Shape", "backward_order", "count_params", "from_config", "model_params", "param_shapes", "resolve",
]

# Device memory as nvidia-smi reports it (MiB); the CUDA context and NCCL take some of it.
GPUS: dict[str, int] = {"a100-40gb": 40960 << 20, "a100-80gb": 81920 << 20, "h100-80gb": 81559 << 20,
                        "h200-141gb": 143771 << 20}


# The planner lists the model's parameters and plans them (about 20-50 us per tensor):
# beyond this many it would no longer answer in well under a
# second. The largest preset holds about 1,150; bare counts beyond it are extrapolated
# (shardopt.planner.report), shaped models are refused.
MAX_TENSORS = 20_000
# Meta tensors hold int64 sizes; no device holds a tensor anywhere near this large.
MAX_TENSOR_NUMEL = 1 << 48

# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A published model: its ``config.json`` architecture fields and its exact parameter count."""

    name: str
    config: Mapping[str, Any]
    total_params: int
    source: str

    def architecture(self) -> Architecture:
        return from_config(self.config, self.name)


def _llama_config(h: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, **extra: Any) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ffn, "vocab_size": vocab,
            "tie_word_embeddings": False, **extra}


# Dimensions from each model's Hugging Face config.json; totals are the sums of the
# checkpoint's tensor shapes (tests/test_memory.py re-derives each from its shapes).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llama2-7b", _llama_config(4096, 32, 32, 32, 11008, 32000), 6_738_415_616,
               "meta-llama/Llama-2-7b-hf config.json"),
        Preset("llama2-13b", _llama_config(5120, 40, 40, 40, 13824, 32000), 13_015_864_320,
               "meta-llama/Llama-2-13b-hf config.json"),
        Preset("llama2-70b", _llama_config(8192, 80, 64, 8, 28672, 32000), 68_976_648_192,
               "meta-llama/Llama-2-70b-hf config.json"),
        Preset("llama3-8b", _llama_config(4096, 32, 32, 8, 14336, 128256), 8_030_261_248,
               "meta-llama/Meta-Llama-3-8B config.json"),
        Preset("llama3-70b", _llama_config(8192, 80, 64, 8, 28672, 128256), 70_553_706_496,
               "meta-llama/Meta-Llama-3-70B config.json"),
        Preset("llama3.1-405b", _llama_config(16384, 126, 128, 8, 53248, 128256), 405_853_388_800,
               "meta-llama/Llama-3.1-405B config.json"),
        Preset("qwen2.5-72b", {**_llama_config(8192, 80, 64, 8, 29568, 152064), "model_type": "qwen2"},
               72_706_203_648, "Qwen/Qwen2.5-72B config.json (q/k/v biases)"),
        Preset("mixtral-8x7b",
               {**_llama_config(4096, 32, 32, 8, 14336, 32000), "model_type": "mixtral",
                "num_local_experts": 8, "num_experts_per_tok": 2},
               46_702_792_704, "mistralai/Mixtral-8x7B-v0.1 config.json"),
        # No checkpoint was published: Brown et al. 2020, Table 2.1 (96 layers, d_model
        # 12288, 96 heads, context 2048) with GPT-2's architecture and 50257-token
        # vocabulary; the paper's "175.0B" rounds this count.
        Preset("gpt3-175b",
               {"model_type": "gpt2", "n_embd": 12288, "n_layer": 96, "n_head": 96, "n_positions": 2048,
                "vocab_size": 50257},
               174_604_259_328, "Brown et al. 2020, Table 2.1 (GPT-2 architecture)"),
    )
}


def resolve(model: str | Mapping[str, Any] | os.PathLike) -> tuple[Architecture, int | None]:
    """An architecture and its published parameter count (``None`` for a user config)."""
    if isinstance(model, str) and model in PRESETS:
        preset = PRESETS[model]
        return preset.architecture(), preset.total_params
    if isinstance(model, Mapping):
        return from_config(model), None
    path = os.fspath(model)
    if not os.path.exists(path) and not path.endswith(".json"):
        raise ValueError(
            f"Invalid model: {path!r} is neither a preset nor a config.json file "
            f"(presets: {', '.join(sorted(PRESETS))})"
        )
    return from_config(path), None


# --------------------------------------------------------------------------- what each stage holds

Named = list[tuple[str, Shape, bool]]


@dataclass(frozen=True)
class ModelParams:
    """The parameters one tensor-parallel rank of each candidate pipeline stage holds.

    ``stages`` maps a stage index to ``(name, shape, requires_grad)`` in
    registration order; only the first and last stages are listed (a middle
    stage holds the same layers as the first, without the embedding, and fewer
    in-flight micro-batches). ``full`` is the whole unsplit model.
    """

    name: str
    arch: Architecture | None
    total_params: int
    stages: dict[int, Named]
    full: Named
    has_shapes: bool
    notes: tuple[str, ...] = ()


def model_params(model: Any, *, tp: int = 1, pp: int = 1, bucket_numel: int) -> ModelParams:
    """Resolve a preset name, config.json path/dict, bare count (int) or ``nn.Module``."""
    from torch import nn  # the rest of this module needs no torch

    if isinstance(model, nn.Module):
        if tp > 1 or pp > 1:
            raise ValueError("Invalid tp/pp: splitting an nn.Module needs its architecture; "
                             "pass a preset or a config.json")
        name = type(model).__name__
        config = getattr(model, "config", None)
        arch = from_config(config.to_dict(), name) if hasattr(config, "to_dict") else None
        named = [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]
        notes = () if arch else ("activations: not modelled for a module without a config attribute",)
        return ModelParams(name, arch, sum(math.prod(s) for _, s, _ in named), {0: named}, named, True, notes)
    if isinstance(model, int) and not isinstance(model, bool):
        if model < 1:
            raise ValueError(f"Invalid params: {model} (expected a parameter count >= 1)")
        for label, value in (("tp", tp), ("pp", pp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {label}: {value!r} (expected an int >= 1)")
        share = -(-model // (tp * pp))
        if -(-share // bucket_numel) > MAX_TENSORS:
            raise ValueError(f"Invalid params: {model:,} is more than {MAX_TENSORS:,} tensors of bucket_numel="
                             f"{bucket_numel:,} elements per rank (shardopt.planner.estimate extrapolates such "
                             "counts)")
        named = [(f"params.{i}", (min(bucket_numel, share - i * bucket_numel),), True)
                 for i in range(-(-share // bucket_numel))]
        notes = ["bare parameter count: planned as 1-D tensors of bucket_numel elements; no activations "
                 "(give --model for shapes)"]
        if tp * pp > 1:
            notes.append(f"tp x pp = {tp * pp}: parameters assumed split evenly")
        return ModelParams(f"{model:,} parameters", None, model, {0: named}, named, False, tuple(notes))
    arch, published = resolve(model)
    arch.check_parallel(tp, pp)
    # The whole model is listed too (its hidden-matrix count), so the limit is on the whole model.
    tensors = stage_tensor_count(arch)
    if tensors > MAX_TENSORS:
        raise ValueError(f"Invalid model: {arch.name} has about {tensors:,} parameter tensors "
                         f"(num_hidden_layers={arch.num_layers:,}); the planner lists at most {MAX_TENSORS:,}")
    stages = {s: [(n, shape, True) for n, shape in param_shapes(arch, tp=tp, pp=pp, stage=s)]
              for s in sorted({0, pp - 1})}
    full = [(n, shape, True) for n, shape in param_shapes(arch)]
    largest = max(full, key=lambda item: math.prod(item[1]))
    if math.prod(largest[1]) > MAX_TENSOR_NUMEL:
        raise ValueError(f"Invalid model: {arch.name}'s {largest[0]} would have shape {largest[1]}, more than "
                         f"2**48 elements; check the config's dimensions")
    total = sum(math.prod(s) for _, s, _ in full)
    # An internal invariant: tests check every preset's shapes against its published total.
    assert published is None or published == total, (arch.name, total, published)
    return ModelParams(arch.name, arch, total, stages, full, True)
