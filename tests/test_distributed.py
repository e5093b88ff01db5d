"""Gradient accumulation and training in several processes (torchrun, gloo on the CPU)."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY_CONFIG
from transformer.batching import BatchIterator, Update, collate, prepare
from transformer.checkpoint import load_checkpoint
from transformer.config import load_config
from transformer.model import build_model
from transformer.step import Totals, inverse_sqrt_schedule, make_optimizer, train_step
from transformer.train import Trainer

# Dropout off and one thread a process: runs that should make the same updates can be
# compared number for number.
COMMON = ["train.device=cpu", "train.threads=1", "model.dropout=0.0", "train.log_every=1",
          "train.eval_every=1000", "train.keep_checkpoints=0", "train.average_at_end=false",
          "train.batch_tokens=1024"]


def _cfg(tmp_path, *overrides):
    return load_config(TINY_CONFIG, [f"train.runs_dir={tmp_path}/runs",
                                     f"data.data_dir={tmp_path}/data", *COMMON, *overrides])


def _bin(name):
    return os.path.join(os.path.dirname(sys.executable), name)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _one_step(model, update, cfg):
    """The gradients of one update (Adam's first step is lr * sign(gradient) wherever the
    gradient is far above eps, so the weights would hide differences in the gradients)."""
    model = copy.deepcopy(model)
    opt = make_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, inverse_sqrt_schedule(0))
    loss = train_step(model, update, opt, sched, cfg.train, Totals.zeros(torch.device("cpu")))
    return loss, {name: p.grad for name, p in model.named_parameters()}


def test_two_micro_batches_make_the_update_of_their_batch(tmp_path):
    cfg = _cfg(tmp_path, "train.clip_norm=0")  # clipping would hide a gradient's scale
    data = prepare(cfg)
    model = build_model(cfg, data.tokenizer)
    src, tgt = data.train.src[:40], data.train.tgt[:40]
    whole = collate(src, tgt)
    halves = [collate(src[:20], tgt[:20]), collate(src[20:], tgt[20:])]
    assert whole.n_tokens == sum(h.n_tokens for h in halves)
    loss_one, one = _one_step(model, whole, cfg)
    loss_two, two = _one_step(model, Update(halves, whole.n_tokens), cfg)
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-6, atol=0)
    for k in one:
        assert one[k].abs().max() > 0, k
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
    # Each micro-batch divided by its own tokens would be another gradient, by about this:
    _, wrong = _one_step(model, Update(halves, halves[0].n_tokens), cfg)
    assert not all(torch.allclose(wrong[k], one[k], rtol=1e-3, atol=1e-7) for k in one)


def test_processes_share_each_update_and_no_pair_comes_twice():
    lengths = [3 + i % 17 for i in range(600)]
    src = [[10 + i] + [5] * (n - 1) for i, n in enumerate(lengths)]  # each pair its own
    tgt = [[1] + [6] * n + [2] for n in lengths]
    it = BatchIterator(src, tgt, 64, shuffle=True, seed=3)
    alone = list(it.updates(2, processes=1, accumulate=4))
    ranks = [list(it.updates(2, processes=2, rank=r, accumulate=2)) for r in range(2)]
    assert len(alone) == len(ranks[0]) == len(ranks[1]) == len(it) // 4 > 10
    seen = []
    for u, (a, b) in enumerate(zip(*ranks)):
        assert a.n_tokens == b.n_tokens == alone[u].n_tokens  # the whole update's tokens
        rows = [x.src.tolist() for x in a.batches + b.batches]
        assert rows == [x.src.tolist() for x in alone[u].batches]  # the same micro-batches
        assert sum(x.n_tokens for x in alone[u].batches) == alone[u].n_tokens
        seen += [r[0] for x in a.batches + b.batches for r in x.src.tolist()]
    assert len(seen) == len(set(seen)) > 0.9 * len(src)  # all but a few left for later
    # Resuming mid-epoch gives the rest of the same updates.
    rest = list(it.updates(2, start=5, processes=2, rank=1, accumulate=2))
    assert [x.src.tolist() for u in rest for x in u.batches] == \
        [x.src.tolist() for u in ranks[1][5:] for x in u.batches]


def test_two_processes_keep_one_model_and_make_the_updates_of_accumulation(tmp_path):
    steps = ["train.max_steps=8", "train.lr=0.001"]
    out = tmp_path / "weights"
    out.mkdir()
    run = tmp_path / "runs" / "two"
    run.mkdir(parents=True)
    overrides = [f"train.runs_dir={tmp_path}/runs", f"data.data_dir={tmp_path}/data",
                 *COMMON, *steps]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         os.path.join(ROOT, "tests", "ddp_worker.py"), str(run), str(out), *overrides],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    w0, w1 = (torch.load(out / f"rank{r}.pt") for r in range(2))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # one model in both processes
    cfg = _cfg(tmp_path, *steps, "train.accumulate=2", "train.name=one")
    (tmp_path / "runs" / "one").mkdir()
    alone = Trainer(cfg, str(tmp_path / "runs" / "one"))
    alone.run()
    w = alone.model.state_dict()
    fresh = build_model(cfg, alone.data.tokenizer).state_dict()
    assert any(not torch.equal(w[k], fresh[k]) for k in w)
    for k in w:
        torch.testing.assert_close(w0[k], w[k], rtol=0, atol=1e-5)
    two, one = _records(run), _records(alone.run_dir)
    assert [r["loss"] for r in two if "loss" in r] == [r["loss"] for r in one if "loss" in r]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_train_nproc_runs_resumes_and_resumes_as_one_process(tmp_path):
    args = [f"train.runs_dir={tmp_path}/runs", f"data.data_dir={tmp_path}/data", *COMMON,
            "train.name=r", "train.eval_every=5", "train.keep_checkpoints=2",
            "train.average_at_end=true", "train.max_steps=10"]
    run = tmp_path / "runs" / "r"
    done = subprocess.run(["make", "--no-print-directory", "train", "CONFIG=configs/tiny.yaml",
                           "NPROC=2", f"ARGS={' '.join(args)}"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines().count(str(run)) == 1  # the run folder, said once
    records = _records(run)
    assert [r["step"] for r in records if "valid_loss" in r] == [5, 10]  # one writer
    assert sorted(os.listdir(run)) == sorted(
        [".lock", "average.pt", "best.pt", "config.yaml", "last.pt", "metrics.jsonl",
         "spm.joint.model", "step-000005.pt", "step-000010.pt"])
    assert load_checkpoint(str(run / "last.pt"))["step"] == 10
    again = subprocess.run([_bin("transformer-train"), "--resume", str(run), "--nproc", "2",
                            "train.max_steps=15"], capture_output=True, text=True, timeout=300,
                           cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    alone = subprocess.run([_bin("transformer-train"), "--resume", str(run),
                            "train.max_steps=20"], capture_output=True, text=True, timeout=300,
                           cwd=ROOT)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "resumed with 1 processes x 1 micro-batches an update, trained with 2 x 1" \
        in alone.stderr
    steps = [r["step"] for r in _records(run) if "loss" in r]
    assert steps == list(range(1, 21))
    assert load_checkpoint(str(run / "last.pt"))["step"] == 20


def _start(tmp_path, name):
    """A long 2-process run, in a process group of its own (as a terminal's job is);
    returns once it has logged its first steps."""
    proc = subprocess.Popen(
        [_bin("transformer-train"), "--config", TINY_CONFIG, "--nproc", "2",
         f"train.runs_dir={tmp_path}/runs", f"data.data_dir={tmp_path}/data", *COMMON,
         f"train.name={name}", "train.max_steps=100000", "train.eval_every=20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True)
    metrics = tmp_path / "runs" / name / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and "valid_loss" in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, tmp_path / "runs" / name


def test_ctrl_c_stops_every_process_with_one_last_checkpoint(tmp_path):
    proc, run = _start(tmp_path, "c")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole job
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and "Traceback" not in err, err[-3000:]  # said once, by process 0
    step = int(said[0].split("interrupted at step ")[1].split(":")[0])
    assert load_checkpoint(str(run / "last.pt"))["step"] == step > 20
    again = subprocess.run([_bin("transformer-train"), "--resume", str(run), "--nproc", "2",
                            f"train.max_steps={step + 3}"], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_checkpoint(str(run / "last.pt"))["step"] == step + 3


def test_a_process_that_dies_ends_the_run_in_one_line_each(tmp_path):
    proc, run = _start(tmp_path, "k")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and "Traceback" not in err, err[-3000:]
    assert "was killed by SIGKILL" in err and "another process of this run ended" in err
    assert load_checkpoint(str(run / "last.pt"))["step"] >= 20  # intact, and loads


def test_one_process_under_torchrun_is_the_plain_run(tmp_path):
    base = [f"train.runs_dir={tmp_path}/runs", f"data.data_dir={tmp_path}/data", *COMMON,
            "train.max_steps=20", "model.dropout=0.1", "train.threads=0"]
    for name, nproc in (("plain", []), ("torchrun", ["--nproc", "1"])):
        done = subprocess.run([_bin("transformer-train"), "--config", TINY_CONFIG, *nproc, *base,
                               f"train.name={name}"], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
    losses = [[r["loss"] for r in _records(tmp_path / "runs" / name) if "loss" in r]
              for name in ("plain", "torchrun")]
    assert losses[0] == losses[1] and len(losses[0]) == 20


def test_more_processes_than_gpus_is_one_line_before_anything_starts(monkeypatch, capsys,
                                                                     tmp_path):
    from transformer import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code = cli.train_main(["--config", TINY_CONFIG, "--nproc", "2", "train.device=cuda",
                           f"train.runs_dir={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "NPROC=2: this machine has 1 GPU(s)" in err
    assert not (tmp_path / "runs").exists()  # nothing started
