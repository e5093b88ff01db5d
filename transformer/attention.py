"""Multi-head attention (paper, section 3.2) with two score functions.

How well query i matches key j:
- scaled dot product (the paper):   score = q_i . k_j / sqrt(d_k)
- additive (Bahdanau et al., 2015): score = v^T tanh(q_i + k_j), where q_i and k_j
  are already projected by the head's W^Q and W^K, so this is v^T tanh(W_q q + W_k k).

Two implementations of attention live here:
- `reference_attention`: softmax(scores) V written out, for reading, for returning
  the attention weights, for the additive score (whose scores `AdditiveScores`
  computes a few queries at a time), and for the test that checks the fast path;
- `F.scaled_dot_product_attention`: PyTorch's fused kernel for the dot-product
  score, used in training and translation.

Shapes: B batch, H heads, Tq query length, Tk key length, Dh = d_k = d_model / H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import dropout
from .masks import causal_mask

SCORES = ("scaled_dot", "additive")


def dot_product_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, Tq, Dh), k (B, H, Tk, Dh) -> Q K^T / sqrt(d_k), (B, H, Tq, Tk)."""
    return q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))


def additive_scores_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, Tq, Dh), k (B, H, Tk, Dh), v (H, Dh) -> v^T tanh(q + k), (B, H, Tq, Tk).

    Written as the formula reads: every query added to every key, a (B, H, Tq, Tk, Dh)
    tensor, Dh times the memory of the dot product's scores, which autograd keeps for
    the backward pass. `additive_scores` computes the same without holding it.
    """
    hidden = torch.tanh(q.unsqueeze(3) + k.unsqueeze(2))  # (B, H, Tq, Tk, Dh)
    return torch.einsum("bhqkd,hd->bhqk", hidden, v)


ADDITIVE_CHUNK = 1 << 18  # elements of (B, H, n, Tk, Dh) made at a time: 1 MB of float32


class AdditiveScores(torch.autograd.Function):
    """v^T tanh(q + k) for every query and key, a few query positions at a time.

    The (B, H, Tq, Tk, Dh) sums are made in chunks of about ADDITIVE_CHUNK elements,
    which stay in the CPU's cache, and never all at once: the backward pass makes them
    again instead of keeping them. Two identities make it cheap:
    - tanh(x) = 2 sigmoid(2x) - 1: PyTorch's sigmoid is about 6x faster than its tanh
      on the CPU, and the "2 . - 1" moves out of the sum over Dh;
    - tanh'(x) = 1 - tanh(x)^2 = 4 s (1 - s), with s = sigmoid(2x): the gradients are
      sums of g s (1 - s) and g s (g the gradient of the scores): matrix products.
    Tested equal to `additive_scores_reference`, values and gradients.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, Tq, Dh = q.shape
        n = max(1, min(Tq, ADDITIVE_CHUNK // (B * H * k.size(2) * Dh)))  # queries a chunk
        q2, k2 = (2 * q).unsqueeze(3), (2 * k).unsqueeze(2)  # (B, H, Tq, 1, Dh), (B, H, 1, Tk, Dh)
        sums = torch.empty(B, H, Tq, k.size(2), device=q.device, dtype=q.dtype)
        buf = q.new_empty(B, H, n, k.size(2), Dh)
        for i in range(0, Tq, n):
            s = torch.add(q2[:, :, i:i + n], k2, out=buf[:, :, :min(n, Tq - i)]).sigmoid_()
            sums[:, :, i:i + n] = (s @ v.view(1, H, 1, Dh, 1)).squeeze(-1)  # sum_d v_d s_d
        ctx.save_for_backward(q, k, v)
        return 2 * sums - v.sum(1).view(1, H, 1, 1)  # sum_d v_d (2 s_d - 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        q, k, v = ctx.saved_tensors
        B, H, Tq, Dh = q.shape
        n = max(1, min(Tq, ADDITIVE_CHUNK // (B * H * k.size(2) * Dh)))
        g = g.contiguous()  # (B, H, Tq, Tk)
        q2, k2 = (2 * q).unsqueeze(3), (2 * k).unsqueeze(2)
        buf = q.new_empty(B, H, n, k.size(2), Dh)
        gs = torch.empty_like(q)  # sum over keys of g s, per query: (B, H, Tq, Dh)
        gt_q = torch.empty_like(q)  # sum over keys of g s (1 - s), per query
        gt_k = torch.zeros_like(k)  # sum over queries of g s (1 - s), per key: (B, H, Tk, Dh)
        for i in range(0, Tq, n):
            s = torch.add(q2[:, :, i:i + n], k2, out=buf[:, :, :min(n, Tq - i)]).sigmoid_()
            gi = g[:, :, i:i + n]  # (B, H, n, Tk)
            gs[:, :, i:i + n] = (gi.unsqueeze(3) @ s).squeeze(3)
            t = torch.addcmul(s, s, s, value=-1, out=s)  # s - s^2, in place
            gt_q[:, :, i:i + n] = (gi.unsqueeze(3) @ t).squeeze(3)
            gt_k += (t * gi.unsqueeze(-1)).sum(2)
        v4 = 4 * v.view(1, H, 1, Dh)  # d tanh(q + k) / dq = 4 s (1 - s), times v
        dv = 2 * gs.sum((0, 2)) - g.sum((0, 2, 3)).unsqueeze(-1)  # sum g tanh = sum g (2s - 1)
        return v4 * gt_q, v4 * gt_k, dv


def additive_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, Tq, Dh), k (B, H, Tk, Dh), v (H, Dh) -> v^T tanh(q + k), (B, H, Tq, Tk),
    in chunks that never hold every (query, key) sum at once (`AdditiveScores`)."""
    return AdditiveScores.apply(q, k, v)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, equation (1) of the paper.

    q: (B, H, Tq, Dh), k and v: (B, H, Tk, Dh), mask: bool, broadcastable to
    (B, H, Tq, Tk), True = may attend; is_causal adds the causal mask. scores:
    precomputed (B, H, Tq, Tk) scores of another score function; default Q K^T / sqrt(d_k).
    Returns the output (B, H, Tq, Dh) and the weights (B, H, Tq, Tk). A query row
    with no key it may attend to gets zero weights and a zero output, not a uniform
    average over padding (the same rule as F.scaled_dot_product_attention).
    """
    if scores is None:
        scores = dot_product_scores(q, k)  # (B, H, Tq, Tk)
    if is_causal:
        causal = causal_mask(q.size(2), q.device)  # (1, 1, Tq, Tq); needs Tq == Tk
        mask = causal if mask is None else mask & causal
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        # softmax over a row of only -inf is 0/0 = nan: such rows attend to nothing.
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    weights = dropout(weights, dropout_p)
    return weights @ v, weights  # (B, H, Tq, Dh), (B, H, Tq, Tk)


class MultiHeadAttention(nn.Module):
    """h parallel attention heads over projected queries, keys and values (section 3.2.2).

    Self-attention (cross=False) takes queries, keys and values from the same
    sequence x; encoder-decoder attention (cross=True) takes the queries from x and
    the keys and values from the encoder's output, the memory.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, cross: bool = False,
                 score: str = "scaled_dot"):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be divisible by n_heads"
        assert score in SCORES, score
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.dropout = dropout
        self.cross = cross
        self.score = score
        # The h matrices W_i^Q side by side make one (d_model, d_model) matrix W^Q, and
        # likewise W^K and W^V. Projections of the same input are stacked too, so that
        # one matrix multiply makes all of them: [W^Q W^K W^V] for self-attention,
        # [W^K W^V] for the memory in encoder-decoder attention.
        if cross:
            self.w_q = nn.Linear(d_model, d_model)
            self.w_kv = nn.Linear(d_model, 2 * d_model)
        else:
            self.w_qkv = nn.Linear(d_model, 3 * d_model)
        self.w_o = nn.Linear(d_model, d_model)  # W^O
        if score == "additive":
            self.v = nn.Parameter(torch.empty(n_heads, self.d_k).normal_(0, self.d_k ** -0.5))
        # Set to True to run the explicit reference path and keep its weights in
        # `self.last_weights` (for tests and for looking at attention).
        self.use_reference = False
        self.last_weights: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        """Xavier-uniform projections; a stacked one ([W^Q W^K W^V]) as its d_model x
        d_model parts, each initialised as the matrix it stands for. Biases keep
        PyTorch's default; the additive score's v keeps its own."""
        D = self.n_heads * self.d_k
        for linear in ((self.w_q, self.w_kv) if self.cross else (self.w_qkv,)) + (self.w_o,):
            for part in linear.weight.split(D):
                nn.init.xavier_uniform_(part)

    def _heads(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """(B, L, n * D) -> n tensors (B, H, L, Dh): split the stacked projections and heads."""
        B, L, _ = x.shape
        return list(x.view(B, L, n, self.n_heads, self.d_k).permute(2, 0, 3, 1, 4))

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """x (B, Tq, D), memory (B, S, D) for cross-attention, mask -> (B, Tq, D).

        is_causal: position i attends to positions 0..i only, without a mask tensor.
        cache (incremental decoding): a dict this module fills with its keys and
        values "k", "v" (B, H, L, Dh). Self-attention appends the new positions on
        each call; encoder-decoder attention projects the memory on the first call
        and reuses it after.
        """
        B, Tq, D = x.shape
        if not self.cross:
            q, k, v = self._heads(self.w_qkv(x), 3)  # each (B, H, Tq, Dh)
            if cache is not None:
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)  # (B, H, L + Tq, Dh)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        else:
            (q,) = self._heads(self.w_q(x), 1)  # (B, H, Tq, Dh)
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]  # (B, H, S, Dh), projected once per sentence
            else:
                k, v = self._heads(self.w_kv(memory), 2)  # each (B, H, S, Dh)
                if cache is not None:
                    cache["k"], cache["v"] = k, v
        p = self.dropout if self.training else 0.0
        if self.use_reference or self.score != "scaled_dot":
            scores = additive_scores(q, k, self.v) if self.score == "additive" else None
            out, weights = reference_attention(q, k, v, mask, p, is_causal, scores)
            self.last_weights = weights if self.use_reference else None
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal)
        out = out.transpose(1, 2).reshape(B, Tq, D)  # (B, Tq, H * Dh) = (B, Tq, D)
        return self.w_o(out)
