"""Learning works, checkpoints round-trip, and the user's commands run end to end."""

import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_CONFIG, TOY, tiny_model
from transformer.batching import collate, prepare
from transformer.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    step_checkpoint_name,
    step_checkpoints,
)
from transformer.config import load_config, to_dict
from transformer.decode import greedy_decode, translate
from transformer.step import (
    Totals,
    cosine_schedule,
    inverse_sqrt_schedule,
    loss_fn,
    make_optimizer,
    train_step,
)


def test_overfits_one_tiny_batch():
    torch.manual_seed(0)
    model = tiny_model(vocab=20, dropout=0.0)
    src = [[5, 6, 7, 3], [8, 9, 3], [10, 11, 12, 13, 3]]
    tgt = [[2, 14, 15, 3], [2, 16, 3], [2, 17, 18, 19, 4, 3]]
    batch = collate(src, tgt)
    cfg = load_config(TINY_CONFIG, ["train.label_smoothing=0.0", "train.clip_norm=0",
                                    "train.lr=0.003"]).train
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    totals = Totals.zeros(torch.device("cpu"))
    first = train_step(model, batch, opt, sched, cfg, totals).item()
    for _ in range(150):
        last = train_step(model, batch, opt, sched, cfg, totals).item()
    assert first > 2.5 and last < 0.05
    model.eval()
    decoded = greedy_decode(model, batch.src, max_len=8)
    assert [h.ids for h in decoded] == [t[1:-1] for t in tgt]


def test_the_logged_gradient_norm_is_the_one_before_clipping():
    model = tiny_model(vocab=20, dropout=0.0)
    batch = collate([[5, 6, 7, 3], [8, 9, 3]], [[2, 14, 15, 3], [2, 16, 3]])
    cfg = load_config(TINY_CONFIG, ["train.clip_norm=0.001"]).train
    reference = tiny_model(vocab=20, dropout=0.0).train()
    hidden = reference.hidden(batch.src, batch.tgt_in)
    (loss_fn(hidden, batch.tgt_out, reference.generator, cfg.label_smoothing)
     / batch.n_tokens).backward()
    expected = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for p in reference.parameters()]))
    opt = make_optimizer(model, cfg)
    totals = Totals.zeros(torch.device("cpu"))
    train_step(model, batch, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), cfg,
               totals)
    clipped = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert expected > 0.1 and clipped == pytest.approx(0.001, rel=1e-3)  # it was clipped
    assert totals.read()[3] == pytest.approx(expected.item(), rel=1e-5)  # and logged before


def test_schedule_warms_up_then_decays_as_inverse_sqrt():
    f = inverse_sqrt_schedule(100)
    assert f(0) == pytest.approx(0.01) and f(99) == pytest.approx(1.0)
    assert f(399) == pytest.approx(0.5)  # sqrt(100 / 400)


def test_cosine_schedule_warms_up_then_falls_to_zero_at_max_steps():
    f = cosine_schedule(100, 1100)
    assert f(0) == pytest.approx(0.01) and f(99) == pytest.approx(1.0)
    assert f(599) == pytest.approx(0.5)  # halfway down: cos(pi / 2)
    assert f(1099) == pytest.approx(0.0, abs=1e-12) and f(1500) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(99, 1100))


def _trained_tiny(tmp_path, steps=40):
    """A model trained briefly in-process on the toy corpus, and what built it."""
    cfg = load_config(TINY_CONFIG, [f"data.data_dir={tmp_path}/data"])
    data = prepare(cfg)
    from transformer.model import build_model
    torch.manual_seed(0)
    model = build_model(cfg, data.tokenizer)
    opt = make_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    totals = Totals.zeros(torch.device("cpu"))
    for i, batch in enumerate(data.train.epoch(1)):
        if i == steps:
            break
        train_step(model, batch, opt, sched, cfg.train, totals)
    state = {"name": cfg.name, "config": to_dict(cfg), "tokenizer": data.tokenizer.to_dict(),
             "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "step": steps, "epoch": 1, "best_bleu": 0.0}
    return model, data.tokenizer, cfg, state


def test_save_load_translate_gives_identical_output(tmp_path):
    model, tokenizer, cfg, state = _trained_tiny(tmp_path)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, state)
    loaded, loaded_tok, loaded_cfg, loaded_state = model_from_checkpoint(path)
    assert to_dict(loaded_cfg) == to_dict(cfg) and loaded_state["step"] == 40
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    sentences = ["one two three", "nine", "four four five six seven"]
    assert translate(loaded, loaded_tok, sentences, cfg.decode) == \
        translate(model, tokenizer, sentences, cfg.decode)
    # Tied weights stay tied after loading.
    assert loaded.generator.weight.data_ptr() == loaded.src_embed.token.weight.data_ptr()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary file left


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_refuses_a_checkpoint_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "x": _RunsCode()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    model, tokenizer, cfg, state = _trained_tiny(tmp_path, steps=1)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(path))


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _make(*args, **kw):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_end_to_end_train_translate_evaluate_with_make(tmp_path):
    runs = tmp_path / "runs"
    args = f"train.runs_dir={runs} train.name=e2e data.data_dir={tmp_path}/data train.device=cpu"
    r = _make("train", "CONFIG=configs/tiny.yaml", f"ARGS={args}")
    assert r.returncode == 0, r.stderr[-2000:]
    run = runs / "e2e"
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "spm.joint.model"):
        assert (run / name).exists(), name
    ckpt = str(run / "best.pt")

    r = _make("translate", f"CKPT={ckpt}", "SENTENCE=one two three four")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "eins zwei drei vier\n"

    r = _make("translate", f"CKPT={ckpt}", input="five six\n\nseven\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "fünf sechs\n\nsieben\n"  # line alignment kept, empty stays empty

    r = _make("evaluate", f"CKPT={ckpt}")
    assert r.returncode == 0, r.stderr
    lines = {line.split("=")[0].strip(): line for line in r.stdout.splitlines() if " = " in line}
    assert float(lines["BLEU"].split("=")[1].split()[0]) > 50  # untrained: about 0
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in lines["BLEU"]
    assert "case:lc" in lines["BLEU lowercase"]
    assert "chrF" in lines
    assert len((run / "best.test.hyp.txt").read_text().splitlines()) == 100

    # Three step checkpoints kept, averaged at the end and again by `make average`.
    assert len(list(run.glob("step-*.pt"))) == 3 and (run / "average.pt").exists()
    (run / "average.pt").unlink()
    r = _make("average", f"RUN={run}", "LAST=2")
    assert r.returncode == 0 and "the average of 2 checkpoints" in r.stdout, r.stderr
    # UPTO: only those at or before that step, into a file beside average.pt.
    first, middle, _ = sorted(run.glob("step-*.pt"))
    upto = int(middle.stem[len("step-"):])
    r = _make("average", f"RUN={run}", f"UPTO={upto}")
    assert r.returncode == 0, r.stderr
    assert f"the average of 2 checkpoints ({first.name} .. {middle.name})" in r.stdout
    assert (run / f"average-upto-{upto}.pt").exists() and (run / "average.pt").exists()
    before = int(first.stem[len("step-"):]) - 1
    r = _make("average", f"RUN={run}", f"UPTO={before}")
    assert r.returncode != 0 and [line for line in r.stderr.splitlines()
                                  if not line.startswith("make")] == [
        f"error: {run}: no step checkpoint at or before step {before}; "
        f"the first kept is {first.name}"]
    r = _make("evaluate", f"CKPT={run / 'average.pt'}", "BEAM=3")
    assert r.returncode == 0, r.stderr
    assert "beam 3" in r.stdout and (run / "average.test.beam3.hyp.txt").exists()
    r = _make("evaluate", f"CKPT={run / 'average.pt'}", "BEAM=3", "ARGS=decode.length_penalty=1.5")
    assert r.returncode == 0, r.stderr
    assert "length penalty 1.5" in r.stdout
    assert (run / "average.test.beam3.lp1.5.hyp.txt").exists()
    assert (run / "average.test.beam3.hyp.txt").exists()  # length penalty 1's, kept


def test_missing_corpus_is_one_line_before_any_work(tmp_path):
    r = subprocess.run([_bin("transformer-train"), "--config", "configs/multi30k.yaml",
                        "data.path=/no/such/multi30k", f"train.runs_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: configs/multi30k.yaml (with overrides): data.path: expected a folder holding the "
        "corpus, but '/no/such/multi30k' does not exist"]
    assert not os.listdir(tmp_path)


def test_translate_with_a_broken_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([_bin("transformer-translate"), "--ckpt", str(bad), "hello"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "not a readable checkpoint" in r.stderr


def test_step_checkpoints_come_in_step_order_and_stop_at_upto(tmp_path):
    for step in (1_000_000, 999_999, 1000, 100):  # past six digits names stop sorting
        (tmp_path / step_checkpoint_name(step)).write_bytes(b"")
    (tmp_path / "step-000100 copy.pt").write_bytes(b"")  # a user's copy: not the run's
    names = [os.path.basename(p) for p in step_checkpoints(str(tmp_path))]
    assert names == [step_checkpoint_name(s) for s in (100, 1000, 999_999, 1_000_000)]
    assert [os.path.basename(p) for p in step_checkpoints(str(tmp_path), upto=999_999)] == [
        step_checkpoint_name(s) for s in (100, 1000, 999_999)]


def test_average_of_checkpoints_is_the_mean_of_their_weights(tmp_path):
    from transformer.checkpoint import average_checkpoints
    _, _, _, state = _trained_tiny(tmp_path, steps=2)
    a, b = dict(state), dict(state)
    b["model"] = {k: v + 1.0 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(str(tmp_path / "step-000001.pt"), a)
    save_checkpoint(str(tmp_path / "step-000002.pt"), b)
    avg = average_checkpoints([str(tmp_path / "step-000001.pt"), str(tmp_path / "step-000002.pt")])
    for k, v in state["model"].items():
        if v.is_floating_point():
            assert torch.allclose(avg["model"][k], v + 0.5), k
    assert "optimizer" not in avg


def test_toy_corpus_is_what_the_generator_writes(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from make_toy_corpus import main
    main(str(tmp_path))
    for name in os.listdir(TOY):
        assert (tmp_path / name).read_text() == open(os.path.join(TOY, name)).read(), name


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["translate", "attention"])
def test_make_passes_the_sentence_as_typed(tmp_path, target):
    # A stand-in for the commands that prints the arguments it was given.
    for name in ("transformer-translate", "transformer-attention"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '[%s]\\n' \"$a\"; done\n")
        fake.chmod(0o755)
    sentence = "Pay $100 to Moses. $(HOME) ${PATH} \"quoted\" it's `date` \\n 100%"
    r = _make(target, f"BIN={tmp_path}", f"SENTENCE={sentence}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"[{sentence}]"
