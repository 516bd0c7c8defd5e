"""A small BERT-style encoder with attention spelled out as Linear + matmul + softmax.

Written out (not nn.MultiheadAttention) so the exported graph has the plain MatMul, Softmax,
LayerNorm and GELU nodes that per-backend transformer quantization rules talk about.
Post-LN like BERT. Simplifications: no token-type embeddings, no attention mask (every
position is a real token), no dropout (the model is only calibrated or briefly fine-tuned).
The sequence length is fixed at construction: the position table is added whole, so the
forward never reads tensor sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 1000
    seq_len: int = 128
    hidden: int = 128
    heads: int = 2
    intermediate: int = 512
    layers: int = 2
    num_classes: int = 2
    layer_norm_eps: float = 1e-12


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden {cfg.hidden} is not divisible by heads {cfg.heads}")
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.softmax = nn.Softmax(dim=-1)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _split_heads(self, x: Tensor) -> Tensor:
        # (B, S, H*D) -> (B, H, S, D); unflatten needs no size reads.
        return torch.unflatten(x, -1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(x))
        v = self._split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        context = torch.matmul(self.softmax(scores), v)
        return torch.flatten(context.transpose(1, 2), 2)


class EncoderLayer(nn.Module):
    """Attention + output projection, then GELU MLP, each with residual add and LayerNorm."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.attention_output = nn.Linear(cfg.hidden, cfg.hidden)
        self.attention_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden, cfg.intermediate)
        self.gelu = nn.GELU()
        self.output = nn.Linear(cfg.intermediate, cfg.hidden)
        self.output_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        out = self.attention_output(self.attention(x))
        x = self.attention_norm(out + x)
        out = self.output(self.gelu(self.intermediate(x)))
        return self.output_norm(out + x)


class BertTiny(nn.Module):
    """Embeddings, encoder layers, tanh pooler on the first token, linear classifier."""

    def __init__(self, cfg: BertConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or BertConfig()
        self.config = cfg
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Parameter(torch.zeros(cfg.seq_len, cfg.hidden))
        self.embedding_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.layers = nn.Sequential(*(EncoderLayer(cfg) for _ in range(cfg.layers)))
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
        self.pooler_activation = nn.Tanh()
        self.classifier = nn.Linear(cfg.hidden, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT's initializer: N(0, 0.02) weights, zero biases, identity LayerNorm."""
        nn.init.normal_(self.position_embeddings, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.token_embeddings(input_ids) + self.position_embeddings
        x = self.layers(self.embedding_norm(x))
        pooled = self.pooler_activation(self.pooler(x[:, 0]))
        return self.classifier(pooled)


def bert_tiny(layers: int = 2, num_classes: int = 2) -> BertTiny:
    return BertTiny(BertConfig(layers=layers, num_classes=num_classes))
