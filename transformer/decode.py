"""Generating translations: greedy and beam search with a key/value cache.

Both searches feed the decoder one new token per step and keep, in each decoder
layer, the keys and values of the tokens already generated (model.new_cache()),
so a step costs one position instead of the whole prefix. `greedy_decode_uncached`
recomputes the prefix each step: it is the reference the cache is tested against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .batching import pad
from .config import DecodeConfig
from .model import Transformer, reorder_cache
from .tokenizer import BOS, EOS, PAD, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    """A finished translation: its ids (without <s> and </s>) and summed log-probability."""

    ids: list[int]
    score: float


def _finish(ys: torch.Tensor, scores: torch.Tensor) -> list[Hypothesis]:
    out = []
    for row, s in zip(ys[:, 1:].tolist(), scores.tolist()):
        out.append(Hypothesis(row[: row.index(EOS)] if EOS in row else
                              [t for t in row if t != PAD], s))
    return out


def encode_source(model: Transformer, src: torch.Tensor):
    """src (B, S) -> memory (B, S, D) and the source mask (B, 1, 1, S), or None.

    The mask is None when no source position is padding (one sentence, or sentences
    of one length): attention with no mask skips a step per call, and every decoding
    step attends to the memory once per decoder layer.
    """
    memory, src_mask = model.encode(src)
    return memory, None if bool(src_mask.all()) else src_mask


@torch.inference_mode()  # no_grad, and no autograd bookkeeping on any tensor
def greedy_decode(model: Transformer, src: torch.Tensor, max_len: int | list[int],
                  use_cache: bool = True) -> list[Hypothesis]:
    """src (B, S) -> the most likely next token, step by step, for each sentence.

    A sentence stops at </s> or after max_len tokens (one limit, or one per sentence).
    """
    model.eval()
    max_lens = max_len if isinstance(max_len, list) else [max_len] * src.size(0)
    limits = torch.tensor(max_lens, device=src.device)
    memory, src_mask = encode_source(model, src)  # (B, S, D), (B, 1, 1, S) or None
    B = src.size(0)
    cache = model.new_cache() if use_cache else None
    ys = torch.full((B, 1), BOS, dtype=torch.long, device=src.device)  # (B, 1)
    scores = torch.zeros(B, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for t in range(max(max_lens)):
        if use_cache:
            logits = model.decode(ys[:, -1:], memory, src_mask, cache)[:, -1]  # (B, V)
        else:
            logits = model.decode(ys, memory, src_mask)[:, -1]  # whole prefix again
        logp = logits.float().log_softmax(dim=-1)  # (B, V)
        best, next_id = logp.max(dim=-1)  # (B,), (B,)
        scores += best.masked_fill(done, 0.0)
        next_id = next_id.masked_fill(done, PAD)  # finished sentences only pad
        ys = torch.cat([ys, next_id[:, None]], dim=1)  # (B, t + 1)
        done |= (next_id == EOS) | (t + 1 >= limits)
        if done.all():
            break
    return _finish(ys, scores)


def greedy_decode_uncached(model: Transformer, src: torch.Tensor, max_len: int | list[int]):
    """Greedy search that recomputes the whole prefix each step (the slow reference)."""
    return greedy_decode(model, src, max_len, use_cache=False)


@torch.inference_mode()
def beam_search(model: Transformer, src: torch.Tensor, max_lens: list[int], beam: int,
                length_penalty: float = 1.0) -> list[Hypothesis]:
    """Batched beam search: src (B, S) -> the best hypothesis of each sentence.

    Each sentence keeps `beam` live hypotheses. A hypothesis that produces </s> is
    set aside as finished; a sentence is done when it has `beam` finished ones, or
    at its maximum length (max_lens[i]), when its live hypotheses are finished as
    they stand. Finished hypotheses are ranked by log-probability / length**alpha.
    """
    model.eval()
    B, k, device = src.size(0), beam, src.device
    memory, src_mask = encode_source(model, src)  # (B, S, D), (B, 1, 1, S) or None
    memory = memory.repeat_interleave(k, dim=0)  # (B*k, S, D): beam j of sentence i at i*k+j
    if src_mask is not None:
        src_mask = src_mask.repeat_interleave(k, dim=0)  # (B*k, 1, 1, S)
    cache = model.new_cache()
    ys = torch.full((B * k, 1), BOS, dtype=torch.long, device=device)  # (B*k, 1)
    # Only the first beam is live at the start, or all k would grow the same prefix.
    scores = torch.full((B, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B

    def normalised(h: Hypothesis) -> float:
        return h.score / max(len(h.ids) + 1, 1) ** length_penalty  # +1 counts </s>

    for t in range(max(max_lens)):
        logits = model.decode(ys[:, -1:], memory, src_mask, cache)[:, -1]  # (B*k, V)
        logp = logits.float().log_softmax(dim=-1)  # (B*k, V)
        V = logp.size(-1)
        cand = (scores.view(B * k, 1) + logp).view(B, k * V)  # (B, k*V)
        top_scores, top_idx = cand.topk(2 * k, dim=-1)  # (B, 2k): enough for k not ending
        top_beam, top_tok = top_idx // V, top_idx % V
        new_rows, new_tokens = [], []
        new_scores = torch.full((B, k), float("-inf"), device=device)
        top_scores_l, top_beam_l, top_tok_l = (top_scores.tolist(), top_beam.tolist(),
                                               top_tok.tolist())
        prefixes = ys[:, 1:].tolist()
        for i in range(B):
            kept = 0
            for s, b, tok in zip(top_scores_l[i], top_beam_l[i], top_tok_l[i]):
                if done[i] or kept == k or s == float("-inf"):
                    break
                if tok == EOS:
                    finished[i].append(Hypothesis(prefixes[i * k + b], s))
                    continue
                new_rows.append(i * k + b)
                new_tokens.append(tok)
                new_scores[i, kept] = s
                kept += 1
            while kept < k:  # padding beams (done sentences) stay dead
                new_rows.append(i * k)
                new_tokens.append(PAD)
                kept += 1
            if not done[i] and (len(finished[i]) >= k or t + 1 >= max_lens[i]):
                if t + 1 >= max_lens[i]:  # out of length: the live beams end here
                    for j in range(k):
                        if new_scores[i, j] > float("-inf"):
                            row = new_rows[i * k + j]
                            finished[i].append(Hypothesis(prefixes[row] + [new_tokens[i * k + j]],
                                                          new_scores[i, j].item()))
                done[i] = True
                new_scores[i] = float("-inf")
        if all(done):
            break
        index = torch.tensor(new_rows, device=device)
        reorder_cache(cache, index)
        ys = torch.cat([ys.index_select(0, index),
                        torch.tensor(new_tokens, device=device)[:, None]], dim=1)
        scores = new_scores
    return [max(f, key=normalised) if f else Hypothesis([], 0.0) for f in finished]


def translate(
    model: Transformer,
    tokenizer: Tokenizer,
    sentences: list[str],
    cfg: DecodeConfig,
    device: torch.device | str = "cpu",
    beam: int | None = None,
) -> list[str]:
    """Translations of sentences, in their order, batched by similar length.

    beam: beam size (default cfg.beam_size); 1 is greedy search.
    """
    beam = cfg.beam_size if beam is None else beam
    model.eval()
    limit = model.cfg.max_positions - 1  # room for </s> (source) and <s> (target)
    ids = tokenizer.encode_src(sentences)
    for i, s in enumerate(ids):
        if len(s) > limit:
            log.warning("a sentence of %d tokens is longer than the model's %d: truncated",
                        len(s), limit)
            ids[i] = s[:limit - 1] + [EOS]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    batch_size = max(1, cfg.batch_size // beam)  # a beam multiplies the rows
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        src = pad([ids[i] for i in chunk]).to(device)
        max_lens = [min(int(cfg.max_len_a * len(ids[i]) + cfg.max_len_b), limit) for i in chunk]
        if beam == 1:
            hyps = greedy_decode(model, src, max_lens)
        else:
            hyps = beam_search(model, src, max_lens, beam, cfg.length_penalty)
        for i, text in zip(chunk, tokenizer.decode_tgt([h.ids for h in hyps])):
            out[i] = text
    return out
