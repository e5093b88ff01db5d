"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

Read in the paper's order: embeddings and positions (3.4, 3.5), the encoder
stack (3.1), the decoder stack (3.1), the output projection and softmax (3.4).

Shape legend, used in the comments of every module:
    B  batch size            S  source length         T  target length
    D  d_model               H  number of heads       Dh head size, d_k = D / H
    V  vocabulary size
Masks are boolean, True = may attend (see masks.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import MultiHeadAttention
from .config import Config, ModelConfig, shares_embeddings
from .layers import (
    DecoderLayer,
    Embeddings,
    EncoderLayer,
    FeedForward,
    LearnedPositions,
    PositionalEncoding,
)
from .masks import padding_mask


def build_model(cfg: Config, tokenizer) -> Transformer:
    """The model a config describes, sized to its tokenizer's vocabularies."""
    return Transformer(cfg.model, tokenizer.src_vocab, tokenizer.tgt_vocab,
                       share_embeddings=shares_embeddings(cfg))


class Transformer(nn.Module):
    """Encoder-decoder Transformer with tied output projection."""

    def __init__(
        self,
        cfg: ModelConfig,
        src_vocab: int,
        tgt_vocab: int,
        pad_id: int = 0,
        share_embeddings: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        D = cfg.d_model

        # 3.4 Embeddings. The target embedding and the pre-softmax projection share
        # one matrix; with a joint vocabulary the source embedding is that matrix too.
        tgt_emb = nn.Embedding(tgt_vocab, D, padding_idx=pad_id)
        if share_embeddings:
            assert src_vocab == tgt_vocab, "shared embeddings need one joint vocabulary"
            src_emb = tgt_emb
        else:
            src_emb = nn.Embedding(src_vocab, D, padding_idx=pad_id)
        for emb in {id(src_emb): src_emb, id(tgt_emb): tgt_emb}.values():
            nn.init.normal_(emb.weight, std=D**-0.5)  # times sqrt(D) in Embeddings: unit scale
            nn.init.zeros_(emb.weight[pad_id])

        # 3.5 Positional encoding, one table shared by encoder and decoder.
        if cfg.positions == "sinusoidal":
            positions = PositionalEncoding(D, cfg.max_positions)
        else:
            positions = LearnedPositions(D, cfg.max_positions)
        self.src_embed = Embeddings(src_emb, positions, cfg.dropout)
        self.tgt_embed = Embeddings(tgt_emb, positions, cfg.dropout)

        # 3.1 Encoder and decoder stacks of N identical layers.
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        # Pre-LN leaves the residual stream un-normalised: normalise once at the top.
        pre_norm = cfg.norm == "pre"
        self.encoder_norm = nn.LayerNorm(D) if pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(D) if pre_norm else nn.Identity()

        # 3.4 Output: a linear map to the vocabulary whose weight is the target embedding.
        self.generator = nn.Linear(D, tgt_vocab, bias=False)
        self.generator.weight = tgt_emb.weight

        # Every projection matrix Xavier-uniform, each module knowing its own layout
        # (stacked projections, the feed-forward's two matrices), in the order the
        # modules were made, once all of them are.
        for module in self.modules():
            if isinstance(module, (MultiHeadAttention, FeedForward)):
                module.reset_parameters()

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) ids -> memory (B, S, D) and the source mask (B, 1, 1, S)."""
        src_mask = padding_mask(src, self.pad_id)
        x = self.src_embed(src)  # (B, S, D)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return self.encoder_norm(x), src_mask

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None,
               cache: list[dict] | None = None) -> torch.Tensor:
        """tgt (B, T) ids, memory (B, S, D), src_mask (B, 1, 1, S) or None -> logits (B, T, V).

        src_mask None: no source position is padding. The logits predict the next token.

        With a cache from `new_cache()`, tgt is only the newest token (B, 1): the
        decoder layers keep the keys and values of earlier steps, so one step costs
        one position, not the whole prefix.
        """
        return self.generator(self.decode_hidden(tgt, memory, src_mask, cache))  # (B, T, V)

    def decode_hidden(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None,
                      cache: list[dict] | None = None) -> torch.Tensor:
        """As `decode`, but the decoder's output (B, T, D) before the output projection."""
        start = 0
        if cache is not None:
            assert tgt.size(1) == 1, "incremental decoding takes one new token at a time"
            start = cached_length(cache)
        x = self.tgt_embed(tgt, start)  # (B, T, D)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, memory, src_mask, None if cache is None else cache[i])
        return self.decoder_norm(x)  # (B, T, D)

    def new_cache(self) -> list[dict]:
        """An empty key/value cache, one dict per decoder layer."""
        return [{} for _ in self.decoder_layers]

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """src (B, S), tgt (B, T) = <bos> y_1 .. y_{T-1} -> logits (B, T, V)."""
        return self.generator(self.hidden(src, tgt))

    def hidden(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """As `forward`, but the decoder's output (B, T, D) before the output projection.

        Training projects it to the vocabulary itself, a chunk at a time (step.loss_fn).
        """
        memory, src_mask = self.encode(src)
        return self.decode_hidden(tgt, memory, src_mask)

    def attention_modules(self):
        """Every MultiHeadAttention in the model, for switching to the reference path."""
        return [m for m in self.modules() if isinstance(m, MultiHeadAttention)]

    def num_parameters(self) -> int:
        """Trainable parameters, each shared matrix counted once."""
        return sum(p.numel() for p in self.parameters())


def cached_length(cache: list[dict]) -> int:
    """How many target positions a decoder cache holds."""
    self_kv = cache[0].get("self", {}) if cache else {}
    return self_kv["k"].size(2) if "k" in self_kv else 0


def reorder_cache(cache: list[dict], index: torch.Tensor, self_only: bool = False) -> None:
    """Keep the rows `index` of every cached tensor (beam search reorders hypotheses).

    self_only: reorder the decoder self-attention's keys and values only. When rows
    move only among the beams of one sentence, the encoder-decoder attention's keys
    and values (the sentence's memory, projected) are the same in every row they move
    between, and need not move.
    """
    for layer in cache:
        for part, kv in layer.items():
            if self_only and part != "self":
                continue
            for name in kv:
                kv[name] = kv[name].index_select(0, index)
