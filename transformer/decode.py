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
from .device import autocast
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
        if _all_done(done, t):
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
    set aside as finished; a sentence is done when `beam` hypotheses have finished,
    or at its maximum length (max_lens[i]), when its live hypotheses are finished as
    they stand. Finished hypotheses are ranked by log-probability / length**alpha.

    All the bookkeeping is tensor operations on the model's device: no Python loop
    over sentences or beams, and no value read back to the host inside a step (a GPU
    would wait for it every step). Of the finished hypotheses only the best of each
    sentence is kept, in `best`, since only it is returned.
    """
    model.eval()
    B, k, device = src.size(0), beam, src.device
    memory, src_mask = encode_source(model, src)  # (B, S, D), (B, 1, 1, S) or None
    memory = memory.repeat_interleave(k, dim=0)  # (B*k, S, D): beam j of sentence i at i*k+j
    if src_mask is not None:
        src_mask = src_mask.repeat_interleave(k, dim=0)  # (B*k, 1, 1, S)
    cache = model.new_cache()
    limits, limits_set = torch.tensor(max_lens, device=device), set(max_lens)  # (B,)
    steps = max(max_lens)
    ys = torch.full((B * k, 1), BOS, dtype=torch.long, device=device)  # (B*k, 1)
    # Only the first beam is live at the start, or all k would grow the same prefix.
    scores = torch.full((B, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    first_row = torch.arange(B, device=device)[:, None] * k  # (B, 1): row of beam 0
    best = _Best(B, steps + 1, device)
    n_finished = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    for t in range(steps):
        logits = model.decode(ys[:, -1:], memory, src_mask, cache)[:, -1]  # (B*k, V)
        logp = logits.float().log_softmax(dim=-1)  # (B*k, V)
        V = logp.size(-1)
        cand = (scores.view(B * k, 1) + logp).view(B, k * V)  # (B, k*V)
        top_scores, top_idx = cand.topk(2 * k, dim=-1)  # (B, 2k): enough for k not ending
        top_row, top_tok = first_row + top_idx // V, top_idx % V  # parent row, new token
        alive = top_scores > float("-inf")
        ends = (top_tok == EOS) & alive
        grows = ~ends & alive
        # Candidates are taken best first until k of them grow; the </s> ones met on the
        # way finish, any after the k-th growing one are not reached.
        reached = (grows.cumsum(-1) - grows.long()) < k  # (B, 2k)
        finishing = ends & reached & ~done[:, None]
        n_finished += finishing.sum(-1)
        best.offer(ys[:, 1:], top_row, top_scores, finishing, t, length_penalty)
        # The k growing candidates, best first: a stable sort puts them at the front.
        pick = (~(grows & reached)).long().argsort(dim=-1, stable=True)[:, :k]  # (B, k)
        kept = (grows & reached).gather(1, pick)
        new_scores = torch.where(kept, top_scores.gather(1, pick), float("-inf"))  # (B, k)
        new_rows = top_row.gather(1, pick)  # (B, k)
        new_tokens = torch.where(kept, top_tok.gather(1, pick), PAD)  # dead beams only pad
        new_ys = torch.cat([ys.index_select(0, new_rows.view(-1)),
                            new_tokens.view(-1, 1)], dim=1)  # (B*k, t + 2)
        if t + 1 in limits_set:  # known on the host: no need to ask the device
            # At its length limit a sentence's live hypotheses finish as they stand.
            at_limit = ~done & (t + 1 >= limits)  # (B,)
            best.offer(new_ys[:, 1:], first_row + torch.arange(k, device=device), new_scores,
                       at_limit[:, None] & kept, t + 1, length_penalty)
            done |= at_limit
        done |= n_finished >= k
        scores = new_scores.masked_fill(done[:, None], float("-inf"))
        if _all_done(done, t):
            break
        reorder_cache(cache, new_rows.view(-1), self_only=True)  # within each sentence
        ys = new_ys
    return best.hypotheses()


class _Best:
    """The best finished hypothesis of each of B sentences, by normalised score, on the device."""

    def __init__(self, B: int, max_len: int, device: torch.device):
        self.ids = torch.full((B, max_len), PAD, dtype=torch.long, device=device)  # (B, L)
        self.length = torch.zeros(B, dtype=torch.long, device=device)
        self.score = torch.zeros(B, device=device)  # summed log-probability
        self.norm = torch.full((B,), float("-inf"), device=device)  # score / length**alpha

    def offer(self, prefixes: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor,
              finishing: torch.Tensor, length: int, length_penalty: float) -> None:
        """Candidates (B, C) that finish with `length` tokens: the prefix in row rows[i, c] of
        prefixes (B*k, length), summed log-probability scores[i, c], where finishing[i, c].

        Ties go to the candidate offered first, as they would in a list ranked by max().
        """
        norm = torch.where(finishing, scores / (length + 1) ** length_penalty,  # +1: </s>
                           float("-inf"))  # (B, C)
        top, c = norm.max(dim=-1)  # (B,): the first best candidate of each sentence
        better = top > self.norm  # (B,)
        ids = prefixes.index_select(0, rows.gather(1, c[:, None]).squeeze(1))  # (B, length)
        self.ids[:, :length] = torch.where(better[:, None], ids, self.ids[:, :length])
        self.length = torch.where(better, length, self.length)
        self.score = torch.where(better, scores.gather(1, c[:, None]).squeeze(1), self.score)
        self.norm = torch.where(better, top, self.norm)

    def hypotheses(self) -> list[Hypothesis]:
        """One Hypothesis per sentence, read back to the host once; none finished: empty."""
        ids, length, score, found = (self.ids.tolist(), self.length.tolist(), self.score.tolist(),
                                     (self.norm > float("-inf")).tolist())
        return [Hypothesis(i[:n], s) if f else Hypothesis([], 0.0)
                for i, n, s, f in zip(ids, length, score, found)]


def _all_done(done: torch.Tensor, t: int) -> bool:
    """Whether every sentence is done: read from the device every step on the CPU, every
    8th on a GPU (a read makes the host wait for the GPU; a few extra steps do not)."""
    if done.device.type != "cpu" and t % 8 != 7:
        return False
    return bool(done.all())


def translate(
    model: Transformer,
    tokenizer: Tokenizer,
    sentences: list[str],
    cfg: DecodeConfig,
    device: torch.device | str = "cpu",
    beam: int | None = None,
    precision: str = "fp32",
) -> list[str]:
    """Translations of sentences, in their order, batched by similar length.

    beam: beam size (default cfg.beam_size); 1 is greedy search. precision: fp32, bf16
    or fp16, as device.resolve_precision gives it (the model's weights stay as they are).
    """
    device = torch.device(device)
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
        with autocast(device, precision):
            if beam == 1:
                hyps = greedy_decode(model, src, max_lens)
            else:
                hyps = beam_search(model, src, max_lens, beam, cfg.length_penalty)
        for i, text in zip(chunk, tokenizer.decode_tgt([h.ids for h in hyps])):
            out[i] = text
    return out
