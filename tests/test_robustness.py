"""Runs survive interruption, files are data, and users' input never crashes the tools."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import transformer.logbook as logbook_mod
import transformer.state as state_mod
import transformer.train as train_mod
from conftest import MULTI30K, ROOT, TINY_CONFIG, TOY
from transformer.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from transformer.config import ConfigError, load_config
from transformer.runs import Position
from transformer.step import cosine_schedule
from transformer.train import RunError, Trainer, make_run_dir, resume, train, train_step


def _bin(name):
    return os.path.join(os.path.dirname(sys.executable), name)


def _cfg(tmp_path, *overrides):
    return load_config(TINY_CONFIG, [f"train.runs_dir={tmp_path}/runs",
                                     f"data.data_dir={tmp_path}/data", "model.dropout=0.1",
                                     "train.log_every=1", "train.keep_checkpoints=0",
                                     "train.average_at_end=false", "train.device=cpu",
                                     *overrides])


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_resume_gives_the_same_losses_and_weights(tmp_path, device):
    # With 4096-token batches the toy corpus is a few batches an epoch: 30 steps cross
    # epoch boundaries, and the split at 15 falls inside an epoch. Dropout is on, so the
    # resumed run must draw the same masks as the uninterrupted one (its random states).
    common = ["train.batch_tokens=4096", "train.eval_every=1000", f"train.device={device}",
              "train.deterministic=true", "train.precision=fp32"]
    one = train(_cfg(tmp_path, "train.name=one", "train.max_steps=30", *common))
    two = train(_cfg(tmp_path, "train.name=two", "train.max_steps=15", *common))
    assert load_checkpoint(os.path.join(two, "last.pt"))["step"] == 15
    resume(two, ["train.max_steps=30"])
    assert _losses(one) == _losses(two) and len(_losses(one)) == 30
    with open(os.path.join(two, "config.yaml")) as f:  # the folder says the new budget
        assert yaml.safe_load(f)["train"]["max_steps"] == 30
    a = load_checkpoint(os.path.join(one, "last.pt"))
    b = load_checkpoint(os.path.join(two, "last.pt"))
    assert a["epoch"] == b["epoch"] and a["epoch"] >= 2  # the boundary was crossed
    if device == "cuda":
        assert len(a["rng"]["cuda"]) == torch.cuda.device_count()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_cosine_run_falls_to_zero_at_max_steps_and_resumes_on_its_schedule(tmp_path):
    # The second run stops at its epoch budget, far from max_steps, and is resumed with a
    # larger one: its learning rates (logged after each update: the next update's) are the
    # uninterrupted run's, along the cosine that ends at max_steps.
    common = ["train.batch_tokens=4096", "train.eval_every=1000", "train.schedule=cosine",
              "train.warmup_steps=4", "train.max_steps=20"]
    one = train(_cfg(tmp_path, "train.name=one", *common))
    two = train(_cfg(tmp_path, "train.name=two", "train.max_epochs=1", *common))
    assert 4 < load_checkpoint(os.path.join(two, "last.pt"))["step"] < 20
    resume(two, ["train.max_epochs=100"])
    lr = _cfg(tmp_path).train.lr
    factor = cosine_schedule(4, 20)
    for run in (one, two):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            lrs = {r["step"]: r["lr"] for r in map(json.loads, f) if "lr" in r}
        assert lrs == pytest.approx({step: lr * factor(step) for step in range(1, 21)})
        assert lrs[20] == pytest.approx(0.0, abs=1e-12)
    assert _losses(one) == _losses(two)


def test_where_a_run_stands_round_trips_and_older_checkpoints_still_resume():
    at = Position(step=7, epoch=2, batch_in_epoch=3, best_bleu=1.5, evals_since_best=1,
                  elapsed=9.0, last_eval=5)
    state = {"model": {}, "optimizer": {}, **at.to_dict()}
    assert Position.from_checkpoint(state) == at
    del state["last_eval"]  # written before evaluations were tracked: they came with saves
    assert Position.from_checkpoint(state) == Position(7, 2, 3, 1.5, 1, 9.0, last_eval=7)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_saves_last_checkpoint_and_says_how_to_resume(tmp_path, signum):
    # SIGHUP: the terminal was closed or the SSH session dropped.
    args = [_bin("transformer-train"), "--config", TINY_CONFIG, f"train.runs_dir={tmp_path}",
            "train.name=sig", f"data.data_dir={tmp_path}/data", "train.max_steps=100000",
            "train.log_every=1", "train.device=cpu"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and f"RESUME={tmp_path}/sig" in last
    state = load_checkpoint(str(tmp_path / "sig" / "last.pt"))
    assert state["step"] >= 1 and "optimizer" in state


def test_a_signal_after_the_command_ended_is_not_a_traceback():
    # Under torchrun, process 0 reports a dead peer and exits; torchrun's SIGTERM can come
    # while Python tears down (a progress bar's __del__), where a KeyboardInterrupt from
    # the command's handler printed a traceback. Once the command has ended, the handlers
    # it set are gone, whichever way it ended.
    from transformer.cli import _run

    def fails(argv):
        raise RunError("no")

    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
    for main in (lambda argv: 0, fails):
        _run(main, [])
        assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == before


def test_a_signal_while_the_command_says_how_it_ended_is_not_a_traceback():
    # The same SIGTERM can come a moment earlier, while process 0 prints its error line:
    # here the error's own text sends it, so that it comes at that moment every time.
    code = ("import os, signal, sys\n"
            "from transformer.cli import _run\n"
            "from transformer.runs import RunError\n"
            "class Late(RunError):\n"
            "    def __str__(self):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        return 'a peer died'\n"
            "def main(argv):\n"
            "    raise Late()\n"
            "sys.exit(_run(main, []))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == -signal.SIGTERM, done.stderr  # ended by it, as by default
    assert "Traceback" not in done.stderr, done.stderr


def test_sigkill_while_saving_leaves_a_readable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    writer = (
        "import sys, torch\n"
        "from transformer.checkpoint import save_checkpoint\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    save_checkpoint(sys.argv[1], {'step': i, 'w': torch.full((500_000,), float(i))})\n"
        "    print(i, flush=True)\n"
    )
    for delay in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE)
        proc.stdout.readline()  # the first save is done: now kill it during a later one
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        state = load_checkpoint(str(path))  # the old or the new one, never half of one
        assert torch.equal(state["w"], torch.full((500_000,), float(state["step"])))


def test_non_finite_loss_skips_the_update(tmp_path):
    cfg = _cfg(tmp_path)
    trainer = Trainer(cfg, make_run_dir(_cfg(tmp_path, "train.name=nan")))
    batch = next(trainer.data.train.epoch(1))
    train_step(trainer.model, batch, trainer.optimizer, trainer.scheduler, cfg.train,
               trainer.totals)  # a good step first: Adam's moments are no longer zero
    assert trainer.totals.read()[1:3] == (0, 0)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    with torch.no_grad():
        trainer.model.generator.weight[5, 0] = float("nan")
    train_step(trainer.model, batch, trainer.optimizer, trainer.scheduler, cfg.train,
               trainer.totals)
    loss, skipped, bad_in_row, gnorm = trainer.totals.read()
    assert skipped == 1 and bad_in_row == 1 and math.isfinite(loss) and math.isfinite(gnorm)
    for k, v in trainer.model.state_dict().items():
        if k != "generator.weight" and "embed" not in k:
            assert torch.equal(v, before[k]), k
    for k, v in trainer.optimizer.state_dict()["state"][0].items():  # step count included
        assert torch.equal(v, moments[k]), k


def test_many_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path,
                                                                               monkeypatch):
    cfg = _cfg(tmp_path, "train.name=bad", "train.max_steps=20", "train.eval_every=10",
               "train.max_bad_steps=5")
    run = train(cfg)
    good = load_checkpoint(os.path.join(run, "last.pt"))
    real_step = train_mod.train_step

    def poisoned(model, *args):
        with torch.no_grad():
            model.generator.weight[5, 0] = float("nan")  # every loss from here is nan
        return real_step(model, *args)

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    with pytest.raises(RunError, match="5 non-finite losses in a row at step 25; stopped"):
        resume(run, ["train.max_steps=40"])
    after = load_checkpoint(os.path.join(run, "last.pt"))
    assert after["step"] == good["step"] == 20


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = train(_cfg(tmp_path, "train.name=disk", "train.max_steps=10", "train.eval_every=5"))

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(state_mod, "save_checkpoint", full)
    with pytest.raises(RunError, match="No space left on device; the previous checkpoint"):
        resume(run, ["train.max_steps=20"])
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 10


def test_unwritable_run_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunError, match="cannot write the run folder"):
        make_run_dir(load_config(TINY_CONFIG, [f"train.runs_dir={blocker}"]))


def test_checkpoint_with_wrong_shapes_or_tokenizer_is_refused(tmp_path):
    run = train(_cfg(tmp_path, "train.name=shape", "train.max_steps=2"))
    path = os.path.join(run, "best.pt")
    state = load_checkpoint(path)
    from transformer.checkpoint import save_checkpoint
    state["config"]["model"]["d_ff"] = 128
    save_checkpoint(str(tmp_path / "shape.pt"), state)
    with pytest.raises(CheckpointError, match="weights do not match the saved config"):
        model_from_checkpoint(str(tmp_path / "shape.pt"))
    other = train(_cfg(tmp_path, "train.name=vocab", "train.max_steps=2", "data.vocab_size=30"))
    state = load_checkpoint(path)
    state["tokenizer"] = load_checkpoint(os.path.join(other, "best.pt"))["tokenizer"]
    save_checkpoint(str(tmp_path / "tok.pt"), state)
    with pytest.raises(CheckpointError, match="tokenizer has .* pieces but the weights expect"):
        model_from_checkpoint(str(tmp_path / "tok.pt"))


def test_yaml_anchors_and_aliases_are_rejected(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("model: &m\n  d_model: 32\ndata: *m\n")
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(str(path))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    run = train(_cfg(tmp, "train.name=t", "train.max_steps=200", "train.log_every=50"))
    return os.path.join(run, "best.pt")


def test_translate_survives_strange_input_and_keeps_alignment(tiny_ckpt):
    lines = ["one two", "", "   ", "\x00\x07 control \x1b[31m", "emoji 🙂🚀", "日本語のテキスト",
             "one " * 300, "ünïcödé", "three"]
    r = subprocess.run([_bin("transformer-translate"), "--ckpt", tiny_ckpt],
                       input="\n".join(lines) + "\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")[:-1]
    assert len(out) == len(lines)
    assert out[1] == "" and out[2] == ""
    assert "longer than the model's 63: truncated" in r.stderr


def test_ten_thousand_lines_stream_through(tiny_ckpt):
    lines = ["one two three"] * 10_000
    r = subprocess.run([_bin("transformer-translate"), "--ckpt", tiny_ckpt],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == 10_000 and len(set(out)) == 1


def test_step_checkpoints_on_their_own_cadence_include_the_last_step(tmp_path):
    run = train(_cfg(tmp_path, "train.name=cadence", "train.max_steps=25", "train.eval_every=1000",
                     "train.save_every=10", "train.keep_checkpoints=2",
                     "train.average_at_end=true"))
    names = sorted(p for p in os.listdir(run) if p.startswith("step-"))
    assert names == ["step-000020.pt", "step-000025.pt"]
    assert os.path.exists(os.path.join(run, "average.pt"))


def test_resuming_a_state_that_does_not_fit_is_one_line(tmp_path):
    from transformer.checkpoint import save_checkpoint

    run = train(_cfg(tmp_path, "train.name=misfit", "train.max_steps=3", "train.eval_every=1000"))
    path = os.path.join(run, "last.pt")
    state = load_checkpoint(path)
    state["optimizer"]["param_groups"][0]["params"] = [0]  # one parameter, not the model's
    state.pop("format")
    save_checkpoint(path, state)
    before = open(path, "rb").read()
    config_before = open(os.path.join(run, "config.yaml")).read()
    with pytest.raises(RunError, match="cannot resume: its training state does not fit"):
        resume(run, ["train.max_steps=6"])
    assert open(path, "rb").read() == before
    assert open(os.path.join(run, "config.yaml")).read() == config_before  # still max_steps 3


def test_bytes_that_are_not_utf8_are_replaced_and_lines_stay_aligned(tiny_ckpt):
    r = subprocess.run([_bin("transformer-translate"), "--ckpt", tiny_ckpt],
                       input=b"one two\n\xff\xfe three\nfour\n", capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    assert len(r.stdout.decode().splitlines()) == 3
    assert b"line 2: not UTF-8" in r.stderr
    r = subprocess.run([_bin("transformer-translate"), "--ckpt", tiny_ckpt, b"three \xff four"],
                       capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    assert len(r.stdout.decode().splitlines()) == 1


def test_a_folder_that_holds_a_run_is_refused_and_left_as_it_was(tmp_path):
    run = train(_cfg(tmp_path, "train.name=x", "train.max_steps=5"))
    before = {name: open(os.path.join(run, name), "rb").read() for name in os.listdir(run)}
    with pytest.raises(RunError, match=r"x already holds a run \(last.pt, best.pt, "
                                       r"metrics.jsonl\); resume it with `make train RESUME="):
        train(_cfg(tmp_path, "train.name=x", "train.max_steps=5"))
    after = {name: open(os.path.join(run, name), "rb").read() for name in os.listdir(run)}
    assert after == before


def test_a_run_folder_in_use_is_refused(tmp_path):
    from transformer.runs import run_lock

    run = train(_cfg(tmp_path, "train.name=busy", "train.max_steps=5"))
    with run_lock(run):  # as if another process were training it
        with pytest.raises(RunError, match=rf"busy is in use by another training \(pid "
                                           rf"{os.getpid()}\)"):
            resume(run, ["train.max_steps=10"])
    resume(run, ["train.max_steps=10"])  # free again
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 10


def test_interrupted_final_evaluation_keeps_every_step_and_resume_finishes_it(tmp_path,
                                                                              monkeypatch):
    cfg = _cfg(tmp_path, "train.name=end", "train.max_steps=30", "train.eval_every=20",
               "train.keep_checkpoints=2", "train.average_at_end=true")

    real = train_mod.validation_loss
    calls = []

    def ctrl_c_in_the_final_evaluation(*args):
        calls.append(1)
        if len(calls) == 2:  # the first is at step 20, the second after the last step
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_mod, "validation_loss", ctrl_c_in_the_final_evaluation)
    with pytest.raises(train_mod.Interrupted, match="interrupted at step 30 after training"):
        train(cfg)
    run = os.path.join(tmp_path, "runs", "end")
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 30
    assert not os.path.exists(os.path.join(run, "average.pt"))
    monkeypatch.setattr(train_mod, "validation_loss", real)
    resume(run)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        evals = [r["step"] for r in map(json.loads, f) if "valid_loss" in r]
    assert evals == [20, 30] and os.path.exists(os.path.join(run, "average.pt"))


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="../shared/multi30k is absent")
def test_sigterm_while_the_tokenizer_trains_leaves_nothing_behind(tmp_path):
    # Multi30k's 8,000-piece tokenizer takes seconds to train: long enough to stop it.
    args = [_bin("transformer-train"), "--config", "configs/multi30k.yaml",
            f"data.path={MULTI30K}", f"data.data_dir={tmp_path}/data",
            f"train.runs_dir={tmp_path}/runs", "train.name=tok", "train.device=cpu"]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "training a SentencePiece" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    tokenizers = tmp_path / "data" / "tokenizers"
    assert not tokenizers.exists() or not list(tokenizers.iterdir())


def test_evaluate_with_a_checkpoint_in_a_read_only_folder_prints_the_scores(
        tiny_ckpt, tmp_path, monkeypatch, capsys):
    # Root may write anywhere, so the read-only folder is played by an `open` that refuses it.
    import builtins

    import transformer.cli as cli

    folder = os.path.dirname(tiny_ckpt)

    def read_only_open(path, mode="r", *args, **kwargs):
        if "w" in mode and os.path.dirname(os.path.abspath(path)) == folder:
            raise PermissionError(13, "Permission denied")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(cli, "open", read_only_open, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.evaluate_main(["--ckpt", tiny_ckpt, "--device", "cpu", f"data.path={TOY}"]) == 0
    out, err = capsys.readouterr()
    assert "BLEU           = " in out and "hypotheses: best.test.hyp.txt" in out
    assert f"cannot write the hypotheses to {folder}/best.test.hyp.txt: Permission denied" in err
    assert len((tmp_path / "best.test.hyp.txt").read_text().splitlines()) == 100


def test_a_moved_corpus_can_be_resumed_with_its_new_path(tmp_path):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(TOY, corpus)
    run = train(_cfg(tmp_path, "train.name=moved", "train.max_steps=5", f"data.path={corpus}"))
    corpus.rename(tmp_path / "elsewhere")
    resume(run, ["train.max_steps=8", f"data.path={tmp_path}/elsewhere"])
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 8
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["data"]["path"] == f"{tmp_path}/elsewhere"


def test_hand_edits_of_a_runs_config_are_applied_when_safe_and_refused_otherwise(tmp_path):
    run = train(_cfg(tmp_path, "train.name=edited", "train.max_steps=5"))
    path = os.path.join(run, "config.yaml")
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["train"]["max_steps"] = 7  # a budget: safe
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    resume(run)
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 7
    raw["model"]["d_ff"] = 128  # the model: the weights were not trained for it
    raw["train"]["max_steps"] = 9
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    with pytest.raises(RunError, match=r"config.yaml: model.d_ff was changed to 128 but the run "
                                       r"was trained with 64; a resumed run can change only"):
        resume(run)
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 7


def test_a_full_disk_while_logging_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import builtins

    run = train(_cfg(tmp_path, "train.name=log", "train.max_steps=5"))

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(28, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)
    monkeypatch.setattr(logbook_mod, "open", full, raising=False)
    with pytest.raises(RunError, match="metrics.jsonl: No space left on device; the checkpoints"):
        resume(run, ["train.max_steps=10"])
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 5


def test_a_run_that_failed_before_its_first_step_can_be_started_again(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = subprocess.run([_bin("transformer-train"), "--config", TINY_CONFIG,
                        f"train.runs_dir={tmp_path}/runs", "train.name=again",
                        f"data.data_dir={blocker}", "train.device=cpu"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2  # a folder the system refuses: one line, not a traceback
    assert r.stderr.strip().splitlines()[-1] == \
        f"error: {blocker}/tokenizers: Not a directory"
    assert "Traceback" not in r.stderr
    run = train(_cfg(tmp_path, "train.name=again", "train.max_steps=3"))  # same name: fine
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 3
