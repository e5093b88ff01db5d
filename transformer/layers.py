"""The building blocks of the encoder and decoder stacks (paper, section 3.1-3.5).

Shapes: B batch, S source length, T target length, D d_model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .attention import MultiHeadAttention
from .config import ModelConfig
from .dropout import Dropout


class PositionalEncoding(nn.Module):
    """Sinusoidal position encodings added to the embeddings (section 3.5)."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)  # (L, 1)
        # 1 / 10000^(2i / d_model), computed in log space.
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)  # (L, D)

    def forward(self, length: int, start: int = 0) -> torch.Tensor:
        return self.pe[start:start + length]  # (L, D)


class LearnedPositions(nn.Module):
    """Learned position embeddings, the alternative of section 3.5 (Table 3, row E)."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.emb.weight, std=d_model**-0.5)

    def forward(self, length: int, start: int = 0) -> torch.Tensor:
        return self.emb.weight[start:start + length]  # (L, D)


class Embeddings(nn.Module):
    """Token embedding times sqrt(d_model), plus positions, then dropout (sections 3.4, 3.5)."""

    def __init__(self, token: nn.Embedding, positions: nn.Module, dropout: float):
        super().__init__()
        self.token = token  # may be shared between source, target and output
        self.positions = positions
        self.scale = math.sqrt(token.embedding_dim)
        self.dropout = Dropout(dropout)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, L) ids at positions start .. start + L - 1 -> (B, L, D)."""
        x = self.token(ids) * self.scale + self.positions(ids.size(1), start)
        return self.dropout(x)


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied at each position (section 3.3)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.ReLU(), Dropout(dropout), nn.Linear(d_ff, d_model)
        )

    def reset_parameters(self) -> None:
        """Xavier-uniform W1 and W2; biases keep PyTorch's default."""
        for linear in (self.net[0], self.net[3]):
            nn.init.xavier_uniform_(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Residual(nn.Module):
    """A sub-layer wrapped in dropout, a residual connection and LayerNorm (section 3.1).

    Post-LN (the paper): LayerNorm(x + Dropout(Sublayer(x))).
    Pre-LN (Xiong et al., 2020): x + Dropout(Sublayer(LayerNorm(x))); trains
    without warmup troubles, and needs a final LayerNorm after the stack.
    """

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]):
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward network."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, pre_norm = cfg.d_model, cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(D, cfg.n_heads, cfg.attn_dropout, score=cfg.attention)
        self.ff = FeedForward(D, cfg.d_ff, cfg.ff_dropout)
        self.res_attn = Residual(D, cfg.dropout, pre_norm)
        self.res_ff = Residual(D, cfg.dropout, pre_norm)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), src_mask (B, 1, 1, S) -> (B, S, D)."""
        x = self.res_attn(x, lambda y: self.self_attn(y, mask=src_mask))
        return self.res_ff(x, self.ff)


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention over the memory, feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, pre_norm = cfg.d_model, cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(D, cfg.n_heads, cfg.attn_dropout, score=cfg.attention)
        self.cross_attn = MultiHeadAttention(D, cfg.n_heads, cfg.attn_dropout, cross=True,
                                             score=cfg.attention)
        self.ff = FeedForward(D, cfg.d_ff, cfg.ff_dropout)
        self.res_self = Residual(D, cfg.dropout, pre_norm)
        self.res_cross = Residual(D, cfg.dropout, pre_norm)
        self.res_ff = Residual(D, cfg.dropout, pre_norm)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor | None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """x (B, T, D), memory (B, S, D), src_mask (B, 1, 1, S) -> (B, T, D).

        Self-attention is masked (section 3.2.3): position i sees positions 0..i. A
        target's padding sits after its last real token, so no real position ever
        sees padding and the causal mask alone is enough: no mask tensor is built.
        With a cache (incremental decoding) x is the newest position only, (B, 1, D):
        it may see every cached earlier position, the causal rule holds by construction,
        and the encoder-decoder attention reuses the memory projected at the first step.
        """
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x = self.res_self(
            x, lambda y: self.self_attn(y, is_causal=cache is None, cache=self_cache))
        # Queries from the decoder, keys and values from the encoder (section 3.2.3).
        x = self.res_cross(
            x, lambda y: self.cross_attn(y, memory, mask=src_mask, cache=cross_cache))
        return self.res_ff(x, self.ff)
