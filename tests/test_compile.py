"""The compiled step: batches of few shapes, and the same loss and gradients as eager."""

import json
import os

import pytest
import torch

import transformer.step as step_mod
from conftest import TINY_CONFIG, tiny_model, toy_pairs
from transformer.batching import BatchIterator, collate
from transformer.config import load_config
from transformer.step import Criterion, batch_loss, compile_criterion
from transformer.tokenizer import PAD


def test_bucketed_batches_come_in_one_shape_per_length_bucket():
    src, tgt = toy_pairs()
    it = BatchIterator(src, tgt, 512, shuffle=True, seed=1, bucket=16)
    batches = list(it.epoch(1))
    shapes = {tuple(b.src.shape) for b in batches} | {tuple(b.tgt_in.shape) for b in batches}
    assert shapes == {(512 // 16, 16), (512 // 32, 32), (512 // 48, 48)}  # lengths up to 41
    # Every pair once, every real target token counted once; the extra rows add none.
    exact = list(BatchIterator(src, tgt, 512, shuffle=True, seed=1).epoch(1))
    assert sum(b.n_tokens for b in batches) == sum(b.n_tokens for b in exact) == \
        sum(len(t) - 1 for t in tgt)
    assert sum(int((b.src[:, 1] != PAD).sum()) for b in batches) == \
        sum(len(s) > 1 for s in src)  # padded rows are a lone </s>


def test_padding_a_batch_to_its_bucket_changes_neither_loss_nor_gradients():
    model = tiny_model(vocab=50, dropout=0.0).train()
    src, tgt = toy_pairs(6, seed=2)
    src = [[min(x, 49) for x in s] for s in src]
    tgt = [[min(x, 49) for x in t] for t in tgt]

    def loss_and_grads(batch, chunk):
        model.zero_grad()
        loss = batch_loss(model, batch, 0.1, chunk)
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()]

    exact, g_exact = loss_and_grads(collate(src, tgt), 512)
    padded, g_padded = loss_and_grads(collate(src, tgt, shape=(9, 48)), 0)
    assert torch.allclose(exact, padded, atol=1e-4)
    for a, b in zip(g_exact, g_padded):
        assert torch.allclose(a, b, atol=1e-5)


def test_compiled_loss_equals_eager_and_compiles_once_per_shape(monkeypatch):
    # aot_eager traces and compiles the graph (forward and backward) as inductor does,
    # then runs PyTorch's own kernels: the test of what we compile, in seconds on a CPU.
    monkeypatch.setattr(step_mod, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    model = tiny_model(vocab=50, dropout=0.0).train()
    forward = compile_criterion(Criterion(model, 0.1, chunk=0))
    src, tgt = toy_pairs(40, seed=3)
    src = [[min(x, 49) for x in s] for s in src]
    tgt = [[min(x, 49) for x in t] for t in tgt]
    batches = list(BatchIterator(src, tgt, 256, shuffle=True, seed=1, bucket=16).epoch(1))
    shapes = {tuple(b.src.shape) for b in batches}
    for batch in batches:
        eager = batch_loss(model, batch, 0.1, 0)
        compiled = forward(batch.src, batch.tgt_in, batch.tgt_out, batch.real)
        assert torch.allclose(compiled, eager, atol=1e-4)
    assert 2 <= len(shapes) < len(batches)
    assert counters["stats"]["unique_graphs"] == len(shapes)


def _compiled_run(tmp_path, device: str, steps: int):
    from transformer.train import Trainer, make_run_dir

    cfg = load_config(TINY_CONFIG, [f"train.runs_dir={tmp_path}", "train.name=c",
                                    f"data.data_dir={tmp_path}/data", f"train.device={device}",
                                    "train.compile=true", f"train.max_steps={steps}",
                                    "train.eval_every=1000", "train.keep_checkpoints=0",
                                    "train.log_every=5"])
    trainer = Trainer(cfg, make_run_dir(cfg))
    trainer.run()
    with open(os.path.join(trainer.run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return trainer, records


def test_compiled_training_runs_with_few_shapes(tmp_path, monkeypatch):
    monkeypatch.setattr(step_mod, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    trainer, records = _compiled_run(tmp_path, "cpu", 30)
    from transformer.batching import COMPILE_BUCKET

    assert all(n % COMPILE_BUCKET == 0 and b == 512 // n for b, n in trainer.shapes)
    assert 1 <= len(trainer.shapes) <= 40 // COMPILE_BUCKET  # toy sentences: up to 40 pieces
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_training_on_cuda_learns(tmp_path):
    torch._dynamo.reset()
    _, records = _compiled_run(tmp_path, "cuda", 600)
    assert [r["valid_bleu"] for r in records if "valid_bleu" in r][-1] > 50
