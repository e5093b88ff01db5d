"""Beam search written with Python lists, one sentence and one candidate at a time.

The reference that transformer.decode.beam_search, which does the same bookkeeping
with tensor operations on the device, is tested against (test_decode.py).
"""

import torch

from transformer.decode import Hypothesis, encode_source
from transformer.model import Transformer, reorder_cache
from transformer.tokenizer import BOS, EOS, PAD


@torch.inference_mode()
def reference_beam_search(model: Transformer, src: torch.Tensor, max_lens: list[int], beam: int,
                length_penalty: float = 1.0) -> list[Hypothesis]:
    """Beam search as plain Python lists: src (B, S) -> the best hypothesis of each sentence.

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
