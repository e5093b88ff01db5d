"""Cached decoding equals recomputing the prefix; beam 1 equals greedy; batches equal singles."""

import pytest
import torch

from conftest import tiny_model
from transformer.batching import pad
from transformer.decode import beam_search, encode_source, greedy_decode, greedy_decode_uncached
from transformer.model import cached_length
from transformer.tokenizer import EOS


@pytest.fixture(scope="module")
def peaked_model():
    """A random model whose output is peaked enough to produce </s> sometimes."""
    m = tiny_model(vocab=17)
    with torch.no_grad():
        m.generator.weight.mul_(3.0)
    return m


def _sources(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, 17, (int(torch.randint(2, 9, (1,), generator=g)),),
                          generator=g).tolist() + [EOS] for _ in range(n)]
    return seqs


def test_cache_steps_match_full_decoding_logits(model):
    src = torch.randint(4, 23, (2, 6))
    tgt = torch.randint(4, 23, (2, 7))
    memory, src_mask = model.encode(src)
    full = model.decode(tgt, memory, src_mask)  # (B, T, V)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t:t + 1], memory, src_mask, cache) for t in range(7)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cached_length(cache) == 7


def test_no_padding_needs_no_mask_and_gives_the_same_logits(model):
    src = torch.randint(4, 23, (2, 6))  # no padding
    tgt = torch.randint(4, 23, (2, 5))
    memory, src_mask = model.encode(src)
    assert bool(src_mask.all())
    assert encode_source(model, src)[1] is None
    assert torch.allclose(model.decode(tgt, memory, None), model.decode(tgt, memory, src_mask),
                          atol=1e-6)
    padded = src.clone()
    padded[1, 4:] = 0
    assert encode_source(model, padded)[1].shape == (2, 1, 1, 6)  # padding keeps its mask


def test_cached_greedy_equals_uncached_tokens_and_scores(peaked_model):
    src = pad(_sources())
    fast = greedy_decode(peaked_model, src, max_len=20)
    slow = greedy_decode_uncached(peaked_model, src, max_len=20)
    assert [h.ids for h in fast] == [h.ids for h in slow]
    for a, b in zip(fast, slow):
        assert abs(a.score - b.score) < 1e-5


def test_beam_one_equals_greedy(peaked_model):
    src = pad(_sources(seed=1))
    greedy = greedy_decode(peaked_model, src, max_len=15)
    beam = beam_search(peaked_model, src, [15] * src.size(0), beam=1)
    assert [h.ids for h in beam] == [h.ids for h in greedy]
    for a, b in zip(beam, greedy):
        assert abs(a.score - b.score) < 1e-4


def test_wider_beam_finds_a_hypothesis_at_least_as_likely(peaked_model):
    # With length penalty 0 both searches rank by summed log-probability, and both take
    # a hypothesis cut at the length limit as it stands: beam 4 keeps greedy's path or a
    # more likely one. (This random model rarely says </s>: most hypotheses are cut.)
    src = pad(_sources(seed=2))
    greedy = greedy_decode(peaked_model, src, max_len=12)
    beam = beam_search(peaked_model, src, [12] * src.size(0), beam=4, length_penalty=0.0)
    assert len(greedy) == len(beam) == 6
    for g, b in zip(greedy, beam):
        assert b.score >= g.score - 1e-4
    assert any(b.score > g.score + 0.1 for g, b in zip(greedy, beam))  # and it searched


@pytest.mark.parametrize("beam", [1, 3])
def test_batch_gives_the_same_output_as_one_by_one(peaked_model, beam):
    seqs = _sources(n=5, seed=3)
    lens = [10] * len(seqs)
    search = (lambda s, m: greedy_decode(peaked_model, s, m)) if beam == 1 else \
        (lambda s, m: beam_search(peaked_model, s, m, beam))
    together = search(pad(seqs), lens)
    alone = [search(pad([s]), [10])[0] for s in seqs]
    assert [h.ids for h in together] == [h.ids for h in alone]


def test_per_sentence_max_length_is_respected(peaked_model):
    src = pad(_sources(n=3, seed=4))
    for hyps in (greedy_decode(peaked_model, src, [1, 2, 3]),
                 beam_search(peaked_model, src, [1, 2, 3], beam=2)):
        assert [len(h.ids) <= n for h, n in zip(hyps, [1, 2, 3])] == [True] * 3


@pytest.mark.parametrize("eos_bias", [0.0, 1.0, 3.0])
def test_beam_search_on_the_device_equals_the_list_reference(eos_bias):
    # Random models, some pushed towards </s> so that sentences finish early, late, all
    # at once, and in the same step as they reach their length limit.
    from reference_beam import reference_beam_search

    for seed in range(30):
        m = tiny_model(vocab=9 if seed % 3 == 0 else 23)
        with torch.no_grad():
            m.generator.weight.mul_(1 + seed % 4)
            m.generator.weight[EOS] += eos_bias * m.generator.weight.mean(0)
        g = torch.Generator().manual_seed(seed)
        V = m.generator.weight.size(0)
        seqs = [torch.randint(4, V, (int(torch.randint(1, 9, (1,), generator=g)),),
                              generator=g).tolist() + [EOS] for _ in range(1 + seed % 5)]
        lens = torch.randint(1, 14, (len(seqs),), generator=g).tolist()
        for k in (2, 3, 5):
            for lp in (0.0, 1.0):
                ours = beam_search(m, pad(seqs), lens, k, lp)
                ref = reference_beam_search(m, pad(seqs), lens, k, lp)
                assert [h.ids for h in ours] == [h.ids for h in ref], (seed, k, lp)
                for a, b in zip(ours, ref):
                    assert abs(a.score - b.score) < 1e-4
