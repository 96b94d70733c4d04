"""A small GPT (decoder-only transformer) for the examples and benchmarks.

Pre-norm blocks with causal self-attention and a GELU MLP, tied to nothing,
as in nanoGPT (Karpathy) and GPT-2 (Radford et al. 2019). Byte-level: the
vocabulary is the 256 byte values, so any text trains without a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 128
    num_layers: int = 4
    num_heads: int = 4
    hidden: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


PRESETS = {
    # about 0.9M parameters: the README's two-minute CPU run
    "tiny": GPTConfig(seq_len=128, num_layers=4, num_heads=4, hidden=128),
    # about 25M parameters: the benchmarks' model
    "bench": GPTConfig(seq_len=128, num_layers=8, num_heads=8, hidden=512),
    # about 82M parameters (57M in hidden matrices): the model on which distributed
    # Muon's bf16 exchange defect was found (docs/design/collectives.md)
    "gpt82m": GPTConfig(vocab_size=16384, seq_len=128, num_layers=8, num_heads=12, hidden=768),
}


class Block(nn.Module):
    """One pre-norm transformer block.

    ``qkv`` stores its output rows head by head (q, k, v of head 0, then of head 1,
    ...), so that a column-wise tensor-parallel split of the rows (contiguous
    chunks) hands each rank whole heads. The forward reads the number of heads from
    the width it receives, so the same code runs on a rank's share of the heads
    (``examples/fsdp_setup.py``) as on all of them.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.attn_norm = nn.LayerNorm(config.hidden)
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden, bias=False)
        self.attn_out = nn.Linear(config.hidden, config.hidden, bias=False)
        self.mlp_norm = nn.LayerNorm(config.hidden)
        self.mlp_up = nn.Linear(config.hidden, 4 * config.hidden)
        self.mlp_down = nn.Linear(4 * config.hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        head_dim = self.config.head_dim
        qkv = self.qkv(self.attn_norm(x))
        heads = qkv.shape[-1] // (3 * head_dim)  # all of them, or this rank's under TP
        q, k, v = qkv.view(batch, seq, heads, 3, head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(att.transpose(1, 2).reshape(batch, seq, heads * head_dim))
        return x + self.mlp_down(F.gelu(self.mlp_up(self.mlp_norm(x))))

    @torch.no_grad()
    def qkv_rows_from_blocks(self) -> None:
        """Reorder ``qkv``'s rows from three blocks (all q, all k, all v) to head by head.

        Applied once after initialisation: the values are drawn in the block order
        the model used to store them, so a seed gives the same network as before
        the storage changed (and the README's measured runs still describe it).
        """
        weight = self.qkv.weight
        heads, head_dim = self.config.num_heads, self.config.head_dim
        weight.copy_(weight.view(3, heads, head_dim, -1).transpose(0, 1).reshape(weight.shape))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.pos_embed = nn.Embedding(config.seq_len, config.hidden)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:
            block.qkv_rows_from_blocks()

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-byte cross-entropy on ``tokens`` of shape (batch, seq_len + 1)."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
