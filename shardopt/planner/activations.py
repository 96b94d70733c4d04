"""Activation memory of transformer training, after Korthikanti et al. 2022.

Korthikanti, Casper, Lym, McAfee, Andersch, Shoeybi & Catanzaro, "Reducing
Activation Recomputation in Large Transformer Models" (MLSys 2023,
arXiv:2205.05198), section 4, count the bytes a GPT block stores for its
backward pass with 16-bit activations (``s`` sequence, ``b`` micro-batch,
``h`` hidden, ``a`` heads, ``t`` tensor-parallel size). Table 2, per layer::

    no parallelism                           sbh (34 + 5as/h)
    tensor parallel (baseline)               sbh (10 + 24/t + 5as/(ht))
    tensor + sequence parallel               sbh (34/t + 5as/(ht))
    tensor parallel + selective recompute    sbh (10 + 24/t)
    tensor + sequence parallel + selective   sbh (34/t)
    full recompute                           sbh (2)

The 34 is 4 (two LayerNorm inputs) + 11 (attention: QKV input 2, Q and K 4,
V 2, output-projection input 2, dropout mask 1) + 19 (MLP: fc1 input 2, GeLU
input 8, fc2 input 8, dropout mask 1); the 5as/h is the softmax output (2),
its dropout mask (1) and the dropout output (2), each ``a s^2 b`` large. Of the
34, 10 are not split by tensor parallelism alone (LayerNorm, QKV and fc1
inputs, the two dropout masks); sequence parallelism splits them too.
Selective recomputation recomputes the attention core and drops the 5as/h.

The same count, generalised to the shapes of the model, not a new formula
(assumptions, so that a GPT block reproduces Table 2 exactly):

* **Grouped-query attention**: K and V are stored at their own width,
  ``2 s b kv_heads head_dim`` each, instead of ``2sbh``.
* **SwiGLU** (``down(silu(gate x) * up x)``, width ``f``): the gate and up
  outputs and the down-projection input are stored, ``3 * 2sbf``, in place of
  GeLU's input and fc2's input, ``2 * 2sbf`` (= 16sbh at f = 4h).
* **No dropout** (LLaMA, Mistral, Qwen: dropout 0): no masks (-2sbh, -as^2b),
  and the softmax output is the attention-over-V input (the 5 becomes 2).
* **Mixture of experts** (dropless): each token's input is copied to each of
  its top-k experts (``2sbh`` per copy, not split by tensor parallelism), and
  each expert stores its SwiGLU activations for its tokens (``k * 3 * 2sbf``).
* **Flash attention** stores no ``s^2`` tensor: it is in memory what
  ``selective`` is here.
* **Full recompute** keeps each layer's input (2sbh; split by ``t`` under
  sequence parallelism, as Megatron keeps it) and, during the backward of one
  layer, that layer's activations again (one layer of the ``none`` row).
* **Pipeline parallelism** (1F1B, Narayanan et al. 2021, section 2.2): stage
  ``i`` of ``p`` holds ``p - i`` micro-batches in flight, each of its ``L/p``
  layers, so the first stage stores ``L`` layers' worth (section 4.2.3 of
  Korthikanti et al.). Assumes at least ``p`` micro-batches per step.
* **Outside the layers** (section 4.3): the embedding-dropout mask (sbh, first
  stage), and on the last stage the final norm and head inputs (2sbh each)
  and the fp32 logits for the cross-entropy (4sbv/t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .architectures import Architecture

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class LayerTerms:
    """One layer's stored bytes split by how parallelism divides them (units of bytes).

    ``replicated``: not split by tensor parallelism unless sequence parallel;
    ``split``: split by tensor parallelism; ``quadratic``: the ``a s^2 b`` terms.
    """

    replicated: int
    split: int
    quadratic: int


def layer_terms(arch: Architecture, seq_len: int, micro_batch: int) -> LayerTerms:
    s, b, h = seq_len, micro_batch, arch.hidden_size
    sb = s * b
    q_width = arch.num_heads * arch.head_dim
    kv_width = arch.num_kv_heads * arch.head_dim
    f = arch.intermediate_size
    dropout = 2 * sb * h if arch.dropout else 0  # the attention- and MLP-output dropout masks
    mlp_inputs = 2 * sb * h * (1 + arch.experts_per_token)  # router/fc1 input (+ one copy per expert choice)
    replicated = 4 * sb * h + 2 * sb * h + mlp_inputs + dropout
    attention = 2 * sb * q_width + 4 * sb * kv_width + 2 * sb * q_width  # Q; K and V; output-projection input
    mlp = (3 if arch.gated_mlp else 2) * 2 * sb * f * max(1, arch.experts_per_token)
    quadratic = (5 if arch.dropout else 2) * arch.num_heads * s * s * b
    return LayerTerms(replicated, attention + mlp, quadratic)


def layer_bytes(
    arch: Architecture,
    *,
    seq_len: int,
    micro_batch: int = 1,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: str = "none",
) -> int:
    """Bytes one transformer layer stores for backward (Korthikanti et al. 2022, Table 2)."""
    check_recompute(recompute)
    terms = layer_terms(arch, seq_len, micro_batch)
    if recompute == "full":
        kept = Fraction(2 * seq_len * micro_batch * arch.hidden_size, tp if sequence_parallel else 1)
        return math.ceil(kept)
    quadratic = 0 if recompute == "selective" else terms.quadratic
    replicated = Fraction(terms.replicated, tp) if sequence_parallel else terms.replicated
    return math.ceil(replicated + Fraction(terms.split + quadratic, tp))


def check_recompute(recompute: str) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"Invalid recompute: {recompute!r} (expected one of {', '.join(RECOMPUTE)})")


def activation_bytes(
    arch: Architecture,
    *,
    seq_len: int,
    micro_batch: int = 1,
    tp: int = 1,
    pp: int = 1,
    stage: int = 0,
    sequence_parallel: bool = False,
    recompute: str = "none",
) -> dict[str, int]:
    """Activation bytes on one rank of pipeline ``stage``, by component (see the module doc)."""
    for label, value in (("seq_len", seq_len), ("micro_batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {label}: {value!r} (expected an int >= 1)")
    if sequence_parallel and tp > 1 and seq_len % tp:
        raise ValueError(f"Invalid seq_len: {seq_len} is not divisible by tp={tp} (sequence parallelism splits it)")
    in_flight = pp - stage
    layers = arch.num_layers // pp
    per_layer = layer_bytes(arch, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                            sequence_parallel=sequence_parallel, recompute=recompute)
    sbh = seq_len * micro_batch * arch.hidden_size
    shard = tp if sequence_parallel else 1
    out = {"layers": in_flight * layers * per_layer}
    if recompute == "full":
        out["recomputed layer"] = layer_bytes(arch, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                              sequence_parallel=sequence_parallel, recompute="none")
    if stage == 0 and arch.dropout:
        out["embedding dropout mask"] = in_flight * math.ceil(Fraction(sbh, shard))
    if stage == pp - 1:
        vocab = -(-arch.vocab_size // tp)
        out["head inputs"] = in_flight * math.ceil(Fraction(4 * sbh, shard))
        out["fp32 logits"] = in_flight * 4 * seq_len * micro_batch * vocab
    return out
