"""Multi-head scaled dot-product attention (paper, section 3.2).

Two implementations of the same function live here:
- `reference_attention`: softmax(Q K^T / sqrt(d_k)) V written out, for reading, for
  returning the attention weights, and for the test that checks the fast path;
- `F.scaled_dot_product_attention`: PyTorch's fused kernel, used in training.

Shapes: B batch, H heads, Tq query length, Tk key length, Dh = d_k = d_model / H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, equation (1) of the paper.

    q: (B, H, Tq, Dh), k and v: (B, H, Tk, Dh), mask: bool, broadcastable to
    (B, H, Tq, Tk), True = may attend. Returns the output (B, H, Tq, Dh) and the
    weights (B, H, Tq, Tk). A query row with no key it may attend to gets zero
    weights and a zero output, not a uniform average over padding.
    """
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        # softmax over a row of only -inf is 0/0 = nan: such rows attend to nothing.
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # (B, H, Tq, Dh), (B, H, Tq, Tk)


class MultiHeadAttention(nn.Module):
    """h parallel attention heads over projected queries, keys and values (section 3.2.2)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.dropout = dropout
        self.w_q = nn.Linear(d_model, d_model)  # the h matrices W_i^Q side by side
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)  # W^O
        # Set to True to run the explicit reference path and keep its weights in
        # `self.last_weights` (for tests and for looking at attention).
        self.use_reference = False
        self.last_weights: torch.Tensor | None = None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.d_k).transpose(1, 2)  # (B, H, L, Dh)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: dict | None = None,
        static: bool = False,
    ) -> torch.Tensor:
        """query (B, Tq, D), key and value (B, Tk, D), mask -> (B, Tq, D).

        cache (incremental decoding): a dict this module fills with its keys and
        values "k", "v" (B, H, L, Dh). For self-attention (static=False) each call
        appends the new positions; for encoder-decoder attention (static=True) the
        memory is projected on the first call and reused after.
        """
        B, Tq, D = query.shape
        q = self._split_heads(self.w_q(query))  # (B, H, Tq, Dh)
        if cache is not None and static and "k" in cache:
            k, v = cache["k"], cache["v"]  # (B, H, S, Dh), projected once per sentence
        else:
            k = self._split_heads(self.w_k(key))  # (B, H, Tk, Dh)
            v = self._split_heads(self.w_v(value))  # (B, H, Tk, Dh)
            if cache is not None:
                if not static and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)  # (B, H, L + Tk, Dh)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        p = self.dropout if self.training else 0.0
        if self.use_reference:
            out, self.last_weights = reference_attention(q, k, v, mask, p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            if mask is not None:
                # Same rule as the reference: a row with nothing to attend to is zero.
                out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        out = out.transpose(1, 2).reshape(B, Tq, D)  # (B, Tq, H * Dh) = (B, Tq, D)
        return self.w_o(out)
