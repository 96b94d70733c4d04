"""Model architectures for the memory planner: Hugging Face ``config.json`` -> parameter shapes.

The planner never multiplies a parameter count by a constant: it lists every
parameter with its real shape, in the order the model registers it (the order
``ZeroOptimizer`` sees), and hands the list to :func:`shardopt.plan_shards`.
This module turns a ``config.json`` (or a preset, :mod:`shardopt.planner.presets`,
which is a minimal ``config.json``) into that list, for one tensor-parallel
rank of one pipeline stage.

Two families are modelled, with Hugging Face ``transformers`` parameter names:

* ``llama`` (LLaMA 2/3, Mistral, Mixtral, Qwen2): RMSNorm (weight only),
  SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``; Mixtral: ``w1, w2, w3``
  per expert and a router), grouped-query attention, RoPE (no position
  parameters), untied output head unless ``tie_word_embeddings``.
* ``gpt2`` (GPT-2 and GPT-3): LayerNorm with bias, GeLU MLP of width
  ``n_inner`` (default 4h), biases everywhere, learned positions, tied head.

Megatron-style splits (Shoeybi et al. 2019, section 3; Narayanan et al. 2021):
tensor parallelism of size ``t`` cuts the query/key/value and MLP-input
matrices by output rows (column parallel, biases too), the attention output
and MLP-output matrices by input columns (row parallel, biases replicated),
and the vocabulary of the embedding and head into ``ceil(v / t)`` rows
(Megatron pads further, to a multiple of 128 t; not counted). Norms and the
MoE router are replicated. Pipeline parallelism of size ``p`` gives each stage
``L / p`` consecutive layers; the first stage also holds the embeddings, the
last the final norm and the head (a copy of the embedding when tied, as
Megatron keeps one).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LLAMA_TYPES = ("llama", "mistral", "mixtral", "qwen2")
GPT2_TYPES = ("gpt2",)
UNSUPPORTED_FIELDS = {
    "kv_lora_rank": "multi-head latent attention (DeepSeek)",
    "q_lora_rank": "multi-head latent attention (DeepSeek)",
    "n_routed_experts": "DeepSeek-style shared/routed experts",
    "num_experts": "Qwen-MoE-style experts",
}


@dataclass(frozen=True)
class Architecture:
    """The dimensions of a decoder-only transformer that determine its parameter shapes."""

    name: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    max_positions: int = 0
    dropout: bool = False

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise ValueError if ``tp``/``pp`` cannot split this model Megatron-style."""
        for label, value in (("tp", tp), ("pp", pp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {label}: {value!r} (expected an int >= 1)")
        checks = [
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
        ]
        for field_name, value in checks:
            if value % tp:
                raise ValueError(
                    f"Invalid tp: {tp} does not divide {field_name}={value} of {self.name} "
                    "(tensor parallelism splits attention heads, key/value groups and the MLP width "
                    "evenly across ranks)"
                )
        if self.num_layers % pp:
            raise ValueError(
                f"Invalid pp: {pp} does not divide num_hidden_layers={self.num_layers} of {self.name} "
                "(each pipeline stage holds the same number of layers)"
            )


def _field(config: Mapping[str, Any], key: str, source: str, default: Any = None, *, kind: str = "int") -> Any:
    if key not in config or config[key] is None:
        if default is None:
            raise ValueError(f"{source}: field {key!r} is missing")
        return default
    value = config[key]
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{source}: field {key!r} must be true or false, got {value!r}")
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise ValueError(f"{source}: field {key!r} must be a number >= 0, got {value!r}")
    return value


def from_config(config: Mapping[str, Any] | str | os.PathLike, name: str | None = None) -> Architecture:
    """Parse a Hugging Face style ``config.json`` (a path or an already loaded dict).

    Errors name the file and the field: ``ValueError("cfg.json: field
    'num_attention_heads' must be a positive integer, got '64'")``.
    """
    if isinstance(config, (str, os.PathLike)):
        source = os.fspath(config)
        if os.path.isdir(source):
            # A Hugging Face model directory (what from_pretrained takes) holds its config.json.
            if not os.path.isfile(os.path.join(source, "config.json")):
                raise ValueError(f"{source}: a directory without a config.json")
            source = os.path.join(source, "config.json")
        try:
            with open(source, encoding="utf-8") as handle:
                config = json.load(handle)
        except FileNotFoundError:
            raise ValueError(f"{source}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from None
        except OSError as err:
            raise ValueError(f"{source}: cannot read ({err.strerror or err})") from None
    else:
        source = name or "config"
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    for key, what in UNSUPPORTED_FIELDS.items():
        if config.get(key):
            raise ValueError(f"{source}: field {key!r} ({what}) is not modelled by the planner")
    model_type = config.get("model_type")
    if model_type is None:
        model_type = "gpt2" if "n_embd" in config else "llama"
    if model_type in GPT2_TYPES:
        return _gpt2(config, source, name)
    if model_type in LLAMA_TYPES:
        return _llama(config, source, name, model_type)
    raise ValueError(
        f"{source}: field 'model_type' is {model_type!r}; supported: {sorted(LLAMA_TYPES + GPT2_TYPES)}"
    )


def _llama(config: Mapping[str, Any], source: str, name: str | None, model_type: str) -> Architecture:
    hidden = _field(config, "hidden_size", source)
    heads = _field(config, "num_attention_heads", source)
    kv_heads = _field(config, "num_key_value_heads", source, heads)
    if heads % kv_heads:
        raise ValueError(
            f"{source}: field 'num_key_value_heads' (= {kv_heads}) must divide num_attention_heads (= {heads})"
        )
    if "head_dim" in config and config["head_dim"] is not None:
        head_dim = _field(config, "head_dim", source)
    elif hidden % heads:
        raise ValueError(
            f"{source}: field 'hidden_size' (= {hidden}) is not divisible by num_attention_heads "
            f"(= {heads}) and no 'head_dim' is given"
        )
    else:
        head_dim = hidden // heads
    experts = _field(config, "num_local_experts", source, 0) if "num_local_experts" in config else 0
    attention_bias = _field(config, "attention_bias", source, False, kind="bool")
    return Architecture(
        name=name or source,
        family="llama",
        hidden_size=hidden,
        num_layers=_field(config, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_field(config, "intermediate_size", source),
        vocab_size=_field(config, "vocab_size", source),
        tie_embeddings=_field(config, "tie_word_embeddings", source, False, kind="bool"),
        # Qwen2 always has q/k/v biases and no output bias (transformers' Qwen2Attention);
        # LLaMA's attention_bias puts a bias on all four projections.
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=attention_bias,
        mlp_bias=_field(config, "mlp_bias", source, False, kind="bool"),
        num_experts=experts,
        experts_per_token=_field(config, "num_experts_per_tok", source, 2) if experts else 0,
        dropout=_field(config, "attention_dropout", source, 0.0, kind="float") > 0,
    )


def _gpt2(config: Mapping[str, Any], source: str, name: str | None) -> Architecture:
    hidden = _field(config, "n_embd", source)
    heads = _field(config, "n_head", source)
    if hidden % heads:
        raise ValueError(f"{source}: field 'n_embd' (= {hidden}) is not divisible by n_head (= {heads})")
    dropout = any(_field(config, k, source, 0.1, kind="float") > 0 for k in ("attn_pdrop", "resid_pdrop"))
    return Architecture(
        name=name or source,
        family="gpt2",
        hidden_size=hidden,
        num_layers=_field(config, "n_layer", source),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=_field(config, "n_inner", source, 4 * hidden),
        vocab_size=_field(config, "vocab_size", source),
        tie_embeddings=_field(config, "tie_word_embeddings", source, True, kind="bool"),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        max_positions=_field(config, "n_positions", source),
        dropout=dropout,
    )


# --------------------------------------------------------------------------- shapes

Shape = tuple[int, ...]


def _llama_layer(arch: Architecture, i: int, tp: int) -> list[tuple[str, Shape]]:
    h, f = arch.hidden_size, arch.intermediate_size // tp
    q, kv = arch.num_heads * arch.head_dim // tp, arch.num_kv_heads * arch.head_dim // tp
    p = f"model.layers.{i}."
    out: list[tuple[str, Shape]] = []
    for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        out.append((f"{p}self_attn.{proj}.weight", (rows, h)))
        if arch.qkv_bias:
            out.append((f"{p}self_attn.{proj}.bias", (rows,)))
    out.append((f"{p}self_attn.o_proj.weight", (h, q)))
    if arch.out_bias:
        out.append((f"{p}self_attn.o_proj.bias", (h,)))
    if arch.num_experts:
        out.append((f"{p}block_sparse_moe.gate.weight", (arch.num_experts, h)))
        for j in range(arch.num_experts):
            e = f"{p}block_sparse_moe.experts.{j}."
            out += [(f"{e}w1.weight", (f, h)), (f"{e}w2.weight", (h, f)), (f"{e}w3.weight", (f, h))]
    else:
        for proj, shape, bias in (("gate_proj", (f, h), f), ("up_proj", (f, h), f), ("down_proj", (h, f), h)):
            out.append((f"{p}mlp.{proj}.weight", shape))
            if arch.mlp_bias:
                out.append((f"{p}mlp.{proj}.bias", (bias,)))
    out += [(f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
    return out


def _gpt2_layer(arch: Architecture, i: int, tp: int) -> list[tuple[str, Shape]]:
    # transformers' GPT-2 uses Conv1D: weights are (in_features, out_features).
    h, f = arch.hidden_size, arch.intermediate_size // tp
    p = f"transformer.h.{i}."
    return [
        (f"{p}ln_1.weight", (h,)), (f"{p}ln_1.bias", (h,)),
        (f"{p}attn.c_attn.weight", (h, 3 * h // tp)), (f"{p}attn.c_attn.bias", (3 * h // tp,)),
        (f"{p}attn.c_proj.weight", (h // tp, h)), (f"{p}attn.c_proj.bias", (h,)),
        (f"{p}ln_2.weight", (h,)), (f"{p}ln_2.bias", (h,)),
        (f"{p}mlp.c_fc.weight", (h, f)), (f"{p}mlp.c_fc.bias", (f,)),
        (f"{p}mlp.c_proj.weight", (f, h)), (f"{p}mlp.c_proj.bias", (h,)),
    ]


def layer_tensor_count(arch: Architecture) -> int:
    """Parameter tensors of one layer, counted without listing them (as ``_llama_layer``/``_gpt2_layer``)."""
    if arch.family == "gpt2":
        return 12
    attention = 4 + 3 * arch.qkv_bias + arch.out_bias
    mlp = 1 + 3 * arch.num_experts if arch.num_experts else 3 + 3 * arch.mlp_bias
    return attention + mlp + 2


def stage_tensor_count(arch: Architecture, *, pp: int = 1) -> int:
    """Parameter tensors the largest pipeline stage holds: an upper bound, checked before listing them."""
    return layer_tensor_count(arch) * (arch.num_layers // pp) + 5


def param_shapes(arch: Architecture, *, tp: int = 1, pp: int = 1, stage: int = 0) -> list[tuple[str, Shape]]:
    """``(name, shape)`` of every parameter one rank holds, in registration order.

    ``tp``/``pp``: tensor/pipeline-parallel sizes; ``stage``: which pipeline stage.
    With ``tp == pp == 1`` this is the whole model, as ``named_parameters()`` lists it.
    """
    arch.check_parallel(tp, pp)
    if not 0 <= stage < pp:
        raise ValueError(f"Invalid stage: {stage} (expected 0 <= stage < pp={pp})")
    per_stage = arch.num_layers // pp
    layers = range(stage * per_stage, (stage + 1) * per_stage)
    first, last = stage == 0, stage == pp - 1
    h, vocab = arch.hidden_size, -(-arch.vocab_size // tp)
    out: list[tuple[str, Shape]] = []
    if arch.family == "gpt2":
        if first:
            out += [("transformer.wte.weight", (vocab, h)), ("transformer.wpe.weight", (arch.max_positions, h))]
        for i in layers:
            out += _gpt2_layer(arch, i, tp)
        if last:
            out += [("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]
            if not first or not arch.tie_embeddings:
                out.append(("lm_head.weight", (vocab, h)))
        return out
    if first:
        out.append(("model.embed_tokens.weight", (vocab, h)))
    for i in layers:
        out += _llama_layer(arch, i, tp)
    if last:
        out.append(("model.norm.weight", (h,)))
        if not first or not arch.tie_embeddings:
            out.append(("lm_head.weight", (vocab, h)))
    return out


def count_params(arch: Architecture) -> int:
    """Parameters of the whole model (tied weights once), from its shapes."""
    return sum(math.prod(shape) for _, shape in param_shapes(arch))


_USE = ("input_layernorm", "ln_1", "q_proj", "k_proj", "v_proj", "c_attn", "o_proj", "attn.c_proj",
        "post_attention_layernorm", "ln_2", "block_sparse_moe.gate.", "experts", "gate_proj", "up_proj", "c_fc",
        "down_proj", "mlp.c_proj")
_OUTER = {"embed_tokens": 0, "wte": 0, "wpe": 0, "norm": 2, "ln_f": 2, "lm_head": 3}


def backward_order(names: list[str]) -> list[str]:
    """``names`` in the order their gradients are assumed complete: the reverse of first use.

    Forward uses the embeddings, then each layer (a pre-norm block uses its norm
    before the projections the norm feeds, though the norm is registered after
    them), then the final norm and the head. A tied embedding's gradient
    completes at its first use, the embedding lookup. Real autograd order may
    differ within a layer (q/k/v, weight/bias); this is an assumption.
    """

    def key(item: tuple[int, str]) -> tuple[int, ...]:
        position, name = item
        parts = name.split(".")
        if len(parts) > 3 and parts[1] in ("layers", "h"):
            rest = ".".join(parts[3:])
            use = next((r for r, token in enumerate(_USE) if token in rest), len(_USE))
            expert = (int(parts[5]), ["w1", "w3", "w2"].index(parts[6])) if "experts." in rest else (0, 0)
            return (1, int(parts[2]), use, *expert, position)
        outer = next((v for k, v in _OUTER.items() if k in name), 1)
        return (outer, 0, 0, 0, 0, position)

    return [name for _, name in sorted(enumerate(names), key=key, reverse=True)]
