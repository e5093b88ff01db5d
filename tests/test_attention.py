"""The fast attention path equals the written-out reference, masks included; both scores."""

import pytest
import torch

from conftest import tiny_model
from transformer.attention import MultiHeadAttention, additive_scores, reference_attention
from transformer.masks import causal_mask, padding_mask

IDS = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 7, 8, 9, 1], [5, 0, 0, 0, 0, 0]])


def _qkv(B=3, H=4, Tq=5, Tk=6, Dh=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, Tq, Dh, generator=g), torch.randn(B, H, Tk, Dh, generator=g),
            torch.randn(B, H, Tk, Dh, generator=g))


@pytest.mark.parametrize("score", ["scaled_dot", "additive"])
def test_reference_weights_are_a_distribution_over_allowed_keys(score):
    q, k, v = _qkv()
    mask = padding_mask(IDS, 0)
    scores = additive_scores(q, k, torch.randn(4, 8)) if score == "additive" else None
    _, w = reference_attention(q, k, v, mask, scores=scores)
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, 5))
    assert (w.masked_select(~mask.expand_as(w)) == 0).all()


@pytest.mark.parametrize("score", ["scaled_dot", "additive"])
def test_causal_weights_are_lower_triangular(score):
    q, k, v = _qkv(Tq=6)
    scores = additive_scores(q, k, torch.randn(4, 8)) if score == "additive" else None
    _, w = reference_attention(q, k, v, is_causal=True, scores=scores)
    assert torch.equal(w, w.tril()) and (w.diagonal(dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, 6))


def test_reference_is_scaled_by_sqrt_dk():
    q, k, v = _qkv(B=1, H=1, Tq=1, Tk=2, Dh=16)
    _, w = reference_attention(q, k, v)
    scores = (q @ k.transpose(-2, -1)) / 4.0  # sqrt(16)
    assert torch.allclose(w, scores.softmax(-1))


def test_additive_score_is_v_tanh_of_query_plus_key():
    q, k, _ = _qkv(B=1, H=2, Tq=2, Tk=3, Dh=4)
    v = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    s = additive_scores(q, k, v)
    assert s.shape == (1, 2, 2, 3)
    # atol: a score near 0 is a sum of terms that cancel, with no relative precision to check
    assert torch.allclose(s[0, 1, 0, 2], v[1] @ torch.tanh(q[0, 1, 0] + k[0, 1, 2]), atol=1e-6)


@pytest.mark.parametrize("chunk", [1 << 18, 200, 1])  # one chunk, several, one query each
def test_chunked_additive_scores_equal_the_formula_values_and_gradients(chunk, monkeypatch):
    import transformer.attention as attention

    monkeypatch.setattr(attention, "ADDITIVE_CHUNK", chunk)
    q, k, _ = _qkv(B=3, H=2, Tq=7, Tk=5, Dh=4)
    q, k = 3 * q, 3 * k  # where tanh saturates too
    v = torch.randn(2, 4)
    g = torch.randn(3, 2, 7, 5)
    grads = []
    for fn in (attention.additive_scores_reference, additive_scores):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(g)
        grads.append((out.detach(), *(t.grad for t in leaves)))
    for ref, got in zip(*grads):
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert grads[1][1].abs().max() > 0.1  # the gradients are not all zero


def test_fast_path_equals_reference_with_padding_and_causal_masks():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=32, n_heads=4).eval()
    x = torch.randn(3, 6, 32)
    for mask, causal in ((None, False), (padding_mask(IDS, 0), False), (None, True),
                         (causal_mask(6), False)):
        fast = mha(x, mask=mask, is_causal=causal)
        mha.use_reference = True
        ref = mha(x, mask=mask, is_causal=causal)
        mha.use_reference = False
        assert torch.allclose(fast, ref, atol=1e-5), (mask, causal)


def test_cross_attention_reads_keys_and_values_from_the_memory():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=32, n_heads=4, cross=True).eval()
    x, memory = torch.randn(3, 4, 32), torch.randn(3, 6, 32)
    mask = padding_mask(IDS, 0)
    fast = mha(x, memory, mask=mask)
    mha.use_reference = True
    ref = mha(x, memory, mask=mask)
    assert torch.allclose(fast, ref, atol=1e-5)
    assert mha.last_weights.shape == (3, 4, 4, 6)
    changed = memory.clone()
    changed[0, 4:] += 1.0  # padding of sentence 0: invisible
    assert torch.allclose(mha(x, changed, mask=mask), ref, atol=1e-6)


@pytest.mark.parametrize("score", ["scaled_dot", "additive"])
def test_fully_masked_rows_give_zeros_on_both_paths(score):
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=16, n_heads=2, score=score).eval()
    x = torch.randn(2, 3, 16)
    mask = padding_mask(torch.tensor([[0, 0, 0], [4, 5, 0]]), 0)  # first row: nothing to see
    for reference in (False, True):
        mha.use_reference = reference
        out = mha(x, mask=mask)
        assert torch.isfinite(out).all()
        # With no key to attend to, the heads output zeros and only W^O's bias is left.
        assert torch.allclose(out[0], mha.w_o.bias.expand(3, 16), atol=1e-6)


def test_additive_model_trains_and_decodes_with_the_cache():
    model = tiny_model(attention="additive")
    assert all(m.score == "additive" and m.v.shape == (4, 8) for m in model.attention_modules())
    src, tgt = torch.randint(4, 23, (2, 6)), torch.randint(4, 23, (2, 5))
    full = model(src, tgt)
    memory, src_mask = model.encode(src)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t:t + 1], memory, src_mask, cache) for t in range(5)]
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-5)
    model.train()
    model(src, tgt).logsumexp(-1).mean().backward()
    assert all(m.v.grad is not None for m in model.attention_modules())


def test_causal_mask_is_lower_triangular():
    m = causal_mask(4)[0, 0]
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [True, True, True, False], [True, True, True, True]]
