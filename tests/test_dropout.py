"""Dropout keeps expected values; the chunked loss equals the loss of the whole batch."""

import torch
import torch.nn.functional as F

from conftest import tiny_model
from transformer.dropout import Dropout, dropout
from transformer.step import loss_fn
from transformer.tokenizer import PAD


def test_dropout_zeroes_p_of_the_elements_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.3)
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - 0.3) < 0.01
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / 0.7)))
    assert abs(y.mean().item() - 1.0) < 0.01
    y.sum().backward()  # the gradient goes through the kept elements, scaled alike
    assert torch.equal(x.grad, y.detach())


def test_dropout_is_the_identity_without_training_or_p():
    x = torch.randn(10)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros(10))


def test_dropout_module_is_skipped_in_evaluation_only():
    drop, x = Dropout(0.5), torch.ones(1000)
    assert (drop(x) == 0).any() and drop(x).max() == 2.0  # training: drops and rescales
    drop.eval()
    assert drop(x) is x  # evaluation: the input itself, no call into PyTorch


def test_chunked_loss_equals_the_whole_batch_loss_and_gradients():
    torch.manual_seed(0)
    model = tiny_model()
    src = torch.randint(4, 23, (3, 7))
    tgt_in, tgt_out = torch.randint(4, 23, (3, 6)), torch.randint(4, 23, (3, 6))
    tgt_out[1, 4:] = PAD  # padding has no loss

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits = model(src, tgt_in)
    whole = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1),
                            ignore_index=PAD, label_smoothing=0.1, reduction="sum")
    g_whole = grads(whole)
    chunked = loss_fn(model.hidden(src, tgt_in), tgt_out, model.generator, 0.1, chunk=4)
    g_chunked = grads(chunked)
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert g_whole.keys() == g_chunked.keys()
    for name in g_whole:
        assert torch.allclose(g_whole[name], g_chunked[name], atol=1e-5), name


def test_loss_of_a_batch_without_real_tokens_is_zero():
    model = tiny_model()
    hidden = torch.randn(2, 3, 32, requires_grad=True)
    loss = loss_fn(hidden, torch.full((2, 3), PAD), model.generator, 0.1)
    assert loss.item() == 0.0
    loss.backward()  # and still a graph: the training step does not special-case it
    assert torch.equal(hidden.grad, torch.zeros(2, 3, 32))
