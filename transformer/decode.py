"""Generating translations: greedy search, and translating lists of sentences."""

from __future__ import annotations

import torch

from .batching import pad
from .config import DecodeConfig
from .model import Transformer
from .tokenizer import BOS, EOS, PAD, Tokenizer


@torch.no_grad()
def greedy_decode(model: Transformer, src: torch.Tensor, max_len: int) -> list[list[int]]:
    """src (B, S) -> for each sentence the ids of its most likely next token, step by step.

    Each step feeds the whole prefix (B, t) back through the decoder and keeps the
    argmax of the last position. Stops when every sentence has produced </s> or
    after max_len tokens. The returned ids exclude <s> and </s>.
    """
    memory, src_mask = model.encode(src)  # (B, S, D), (B, 1, 1, S)
    B = src.size(0)
    ys = torch.full((B, 1), BOS, dtype=torch.long, device=src.device)  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits = model.decode(ys, memory, src_mask)[:, -1]  # (B, V)
        next_id = logits.argmax(dim=-1)  # (B,)
        next_id = next_id.masked_fill(done, PAD)  # finished sentences only pad
        ys = torch.cat([ys, next_id[:, None]], dim=1)  # (B, t + 1)
        done |= next_id == EOS
        if done.all():
            break
    out = []
    for row in ys[:, 1:].tolist():
        out.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD])
    return out


def translate(
    model: Transformer,
    tokenizer: Tokenizer,
    sentences: list[str],
    cfg: DecodeConfig,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Greedy translations of sentences, in their order, batched by similar length."""
    model.eval()
    limit = model.cfg.max_positions - 1  # room for </s> (source) and <s> (target)
    ids = [s[:limit - 1] + [EOS] if len(s) > limit else s for s in tokenizer.encode_src(sentences)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start:start + cfg.batch_size]
        src = pad([ids[i] for i in chunk]).to(device)
        max_len = min(int(cfg.max_len_a * src.size(1) + cfg.max_len_b), limit)
        hyps = greedy_decode(model, src, max_len)
        for i, text in zip(chunk, tokenizer.decode_tgt(hyps)):
            out[i] = text
    return out
