"""The fast attention path equals the written-out reference, masks included."""

import torch

from transformer.attention import MultiHeadAttention, reference_attention
from transformer.masks import causal_mask, decoder_mask, padding_mask


def _qkv(B=3, H=4, Tq=5, Tk=6, Dh=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, Tq, Dh, generator=g), torch.randn(B, H, Tk, Dh, generator=g),
            torch.randn(B, H, Tk, Dh, generator=g))


def test_reference_weights_are_a_distribution_over_allowed_keys():
    q, k, v = _qkv()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 7, 8, 9, 1], [5, 0, 0, 0, 0, 0]])
    mask = padding_mask(ids, 0)
    _, w = reference_attention(q, k, v, mask)
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, 5))
    assert (w.masked_select(~mask.expand_as(w)) == 0).all()


def test_reference_is_scaled_by_sqrt_dk():
    q, k, v = _qkv(B=1, H=1, Tq=1, Tk=2, Dh=16)
    _, w = reference_attention(q, k, v)
    scores = (q @ k.transpose(-2, -1)) / 4.0  # sqrt(16)
    assert torch.allclose(w, scores.softmax(-1))


def test_fast_path_equals_reference_with_padding_and_causal_masks():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=32, n_heads=4).eval()
    x = torch.randn(3, 6, 32)
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 7, 8, 9, 1], [5, 6, 0, 0, 0, 0]])
    for mask in (None, padding_mask(ids, 0), decoder_mask(ids, 0), causal_mask(6)):
        fast = mha(x, x, x, mask)
        mha.use_reference = True
        ref = mha(x, x, x, mask)
        mha.use_reference = False
        assert torch.allclose(fast, ref, atol=1e-5), mask


def test_fully_masked_rows_give_zeros_on_both_paths():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=16, n_heads=2).eval()
    x = torch.randn(2, 3, 16)
    mask = padding_mask(torch.tensor([[0, 0, 0], [4, 5, 0]]), 0)  # first row: nothing to see
    for reference in (False, True):
        mha.use_reference = reference
        out = mha(x, x, x, mask)
        assert torch.isfinite(out).all()
        # With no key to attend to, the heads output zeros and only W^O's bias is left.
        assert torch.allclose(out[0], mha.w_o.bias.expand(3, 16), atol=1e-6)


def test_causal_mask_is_lower_triangular():
    m = causal_mask(4)[0, 0]
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [True, True, True, False], [True, True, True, True]]
