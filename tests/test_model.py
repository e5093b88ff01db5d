"""Shapes, causality, padding invariance and weight tying of the Transformer."""

import torch

from conftest import tiny_model


def test_shapes(model):
    src = torch.randint(4, 23, (3, 7))
    tgt = torch.randint(4, 23, (3, 5))
    memory, src_mask = model.encode(src)
    assert memory.shape == (3, 7, 32)
    assert src_mask.shape == (3, 1, 1, 7)
    assert model.decode(tgt, memory, src_mask).shape == (3, 5, 23)
    assert model(src, tgt).shape == (3, 5, 23)


def test_d_k_is_d_model_over_heads(model):
    for mha in model.attention_modules():
        assert mha.d_k * mha.n_heads == 32 and mha.d_k == 8
    # encoder self, decoder self and encoder-decoder attention in each of 2 layers
    assert len(model.attention_modules()) == 2 + 2 * 2


def test_decoder_is_causal(model):
    src = torch.randint(4, 23, (2, 6))
    tgt = torch.randint(4, 23, (2, 8))
    changed = tgt.clone()
    changed[:, 5:] = torch.randint(4, 23, (2, 3))
    a, b = model(src, tgt), model(src, changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-5)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_encoder_self_attention_sees_every_position_before_and_after(model):
    src = torch.randint(4, 23, (2, 6))
    changed = src.clone()
    changed[:, 5] = (src[:, 5] - 4 + 1) % 19 + 4  # another word at the last position only
    memory, _ = model.encode(src)
    other, _ = model.encode(changed)
    assert not torch.allclose(memory[:, 0], other[:, 0], atol=1e-4)  # the first position saw it


def test_cross_attention_queries_come_from_the_decoder_keys_from_the_encoder(model):
    src, tgt = torch.randint(4, 23, (2, 6)), torch.randint(4, 23, (2, 5))
    from transformer.visualize import attention_weights

    w = attention_weights(model, src, tgt)["encoder-decoder"][0]
    assert w.shape == (2, 4, 5, 6)  # a row per target position, a column per source position
    changed = src.clone()
    changed[:, 3] = (src[:, 3] - 4 + 1) % 19 + 4
    a, b = model(src, tgt), model(changed, tgt)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4)  # every target position reads it


def test_extra_padding_changes_nothing(model):
    src = torch.randint(4, 23, (2, 6))
    tgt = torch.randint(4, 23, (2, 5))
    padded_src = torch.cat([src, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    padded_tgt = torch.cat([tgt, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    out = model(src, tgt)
    assert torch.allclose(model(padded_src, tgt), out, atol=1e-5)
    assert torch.allclose(model(padded_src, padded_tgt)[:, :5], out, atol=1e-5)


def test_padding_in_one_sentence_does_not_change_another(model):
    a = torch.tensor([[5, 6, 7, 8, 3]])
    b = torch.tensor([[9, 3, 0, 0, 0]])
    tgt = torch.tensor([[2, 5, 6]])
    alone = model(b[:, :2], tgt)
    together = model(torch.cat([a, b]), tgt.expand(2, 3))[1:]
    assert torch.allclose(alone, together, atol=1e-5)


def test_all_three_embeddings_share_storage_when_joint():
    m = tiny_model(share=True)
    w = m.generator.weight
    assert m.src_embed.token.weight.data_ptr() == w.data_ptr()
    assert m.tgt_embed.token.weight.data_ptr() == w.data_ptr()


def test_without_sharing_only_target_and_output_are_tied():
    m = tiny_model(share=False)
    assert m.tgt_embed.token.weight.data_ptr() == m.generator.weight.data_ptr()
    assert m.src_embed.token.weight.data_ptr() != m.generator.weight.data_ptr()


def test_pre_norm_and_learned_positions_build_and_run():
    for kw in ({"norm": "pre"}, {"positions": "learned"}):
        m = tiny_model(**kw)
        out = m(torch.randint(4, 23, (2, 5)), torch.randint(4, 23, (2, 4)))
        assert out.shape == (2, 4, 23) and torch.isfinite(out).all()
    assert isinstance(tiny_model(norm="pre").encoder_norm, torch.nn.LayerNorm)
    assert isinstance(tiny_model(norm="post").encoder_norm, torch.nn.Identity)


def test_changing_heads_and_d_model_changes_the_model():
    four, two = tiny_model(n_heads=4), tiny_model(n_heads=2)
    # The heads split d_model (d_k = d_model / n_heads): same parameters, other head sizes.
    assert four.num_parameters() == two.num_parameters()
    assert [m.n_heads for m in four.attention_modules()] == [4] * 6
    assert [m.d_k for m in two.attention_modules()] == [16] * 6
    src, tgt = torch.randint(4, 23, (2, 5)), torch.randint(4, 23, (2, 4))
    assert not torch.allclose(four(src, tgt), two(src, tgt))  # the same init, split otherwise
    wide = tiny_model(d_model=64, n_heads=8)
    assert wide.attention_modules()[0].n_heads == 8
    assert wide.num_parameters() > four.num_parameters()
    assert tiny_model(share=False).num_parameters() > four.num_parameters()


def test_weights_saved_with_separate_projections_still_load(model):
    from transformer.checkpoint import stack_projections
    old = {}
    for key, value in model.state_dict().items():  # the layout before stacking
        if ".w_qkv." in key or ".w_kv." in key:
            prefix, stacked, kind = key.rsplit(".", 2)  # e.g. encoder_layers.0.self_attn
            for n, part in zip(stacked[2:], value.chunk(len(stacked) - 2)):
                old[f"{prefix}.w_{n}.{kind}"] = part
        else:
            old[key] = value
    assert stack_projections(old).keys() == model.state_dict().keys()
    for key, value in stack_projections(old).items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_every_projection_is_xavier_uniform_each_stacked_one_as_its_parts():
    model = tiny_model(d_model=32, d_ff=128)
    bound = (6 / (32 + 32)) ** 0.5  # a 32 x 32 matrix: W^Q, W^K, W^V, W^O
    seen = 0
    for mha in model.attention_modules():
        for linear in ((mha.w_q, mha.w_kv) if mha.cross else (mha.w_qkv,)) + (mha.w_o,):
            for part in linear.weight.split(32):
                # Within the bound of its own shape, and filling it: a stacked (96 x 32)
                # matrix initialised as one would stay within sqrt(6 / 128), half of it.
                assert part.abs().max() <= bound and part.abs().max() > 0.9 * bound
                seen += 1
    assert seen == 2 * (3 + 1) + 2 * (3 + 1 + 1 + 2 + 1)  # 2 encoder, 2 decoder layers
    ff_bound = (6 / (32 + 128)) ** 0.5
    for layer in [*model.encoder_layers, *model.decoder_layers]:
        for linear in (layer.ff.net[0], layer.ff.net[3]):
            assert ff_bound * 0.9 < linear.weight.abs().max() <= ff_bound
