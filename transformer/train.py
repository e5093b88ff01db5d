"""Training: the loop with its budgets, evaluations, checkpoints, resuming and signals.

The step itself (forward, backward, update) is in step.py; the device, precision
and random states in device.py. This file decides when to log, evaluate, save and
stop, and keeps where the run stands so that it can go on after an interruption.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time

import torch
from tqdm import tqdm

from .batching import prefetch, prepare
from .checkpoint import (
    CheckpointError,
    average_checkpoints,
    build,
    load_checkpoint,
    save_checkpoint,
    step_checkpoints,
)
from .config import Config, from_dict, save_config, to_dict, with_overrides
from .decode import translate
from .device import pick_device, resolve_precision, rng_state, set_deterministic, set_rng_state
from .evaluate import score
from .runs import RESUMABLE, Interrupted, RunError, config_edits, make_run_dir, run_lock
from .step import Totals, compiled_batch_loss, make_optimizer, train_step, validation_loss
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def inverse_sqrt_schedule(warmup_steps: int):
    """lr factor: linear warmup to 1, then 1 / sqrt(step), the schedule of section 5.3."""
    def factor(step: int) -> float:  # LambdaLR's step counts from 0
        step += 1
        if warmup_steps == 0:
            return 1.0
        return min(step / warmup_steps, math.sqrt(warmup_steps / step))
    return factor


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # stop cleanly, save last.pt


class Trainer:
    """The training loop: budgets, logging, evaluation, checkpoints, resuming, signals."""

    def __init__(self, cfg: Config, run_dir: str, resume: dict | None = None):
        self.cfg, self.t, self.run_dir = cfg, cfg.train, run_dir
        random.seed(self.t.seed)
        torch.manual_seed(self.t.seed)  # the CPU and every CUDA device
        if self.t.threads:
            torch.set_num_threads(self.t.threads)
        self.device = pick_device(self.t.device)
        self.precision = resolve_precision(self.t.precision, self.device)
        set_deterministic(self.t.deterministic)
        if resume is None:
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
        # A resumed run keeps the tokenizer its weights were trained with.
        tokenizer = None if resume is None else Tokenizer.from_dict(resume["tokenizer"])
        self.data = prepare(cfg, tokenizer)
        self.data.tokenizer.save(run_dir)
        self.model = build(cfg, self.data.tokenizer).to(self.device)
        self.optimizer = make_optimizer(self.model, self.t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, inverse_sqrt_schedule(self.t.warmup_steps))
        # fp16 has too few exponent bits for small gradients: scale the loss up first.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.totals = Totals.zeros(self.device)  # loss and skipped batches, on the device
        self.forward = compiled_batch_loss() if self.t.compile else None
        self.shapes: set[tuple[int, ...]] = set()  # batch shapes the step has seen
        # Where the run stands: all of it goes into every checkpoint.
        self.step = 0  # training batches taken (an update each, unless skipped as non-finite)
        self.epoch = 1  # the epoch in progress
        self.batch_in_epoch = 0  # batches of this epoch already used
        self.best_bleu = -1.0
        self.evals_since_best = 0
        self.elapsed = 0.0  # seconds of training before this process started
        self.last_eval = -1  # the step of the last evaluation
        if resume is not None:
            self._load(resume)
            # The config the run goes on under: the resume's train.* overrides included.
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
        self.signals: list[int] = []

    # --- checkpoints -----------------------------------------------------------------
    def state(self, full: bool = True) -> dict:
        """A self-sufficient checkpoint; full=False leaves out optimizer and position."""
        state = {
            "name": self.cfg.name, "config": to_dict(self.cfg),
            "tokenizer": self.data.tokenizer.to_dict(), "model": self.model.state_dict(),
            "step": self.step, "epoch": self.epoch, "best_bleu": self.best_bleu,
        }
        if full:
            state.update({
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "batch_in_epoch": self.batch_in_epoch,
                "evals_since_best": self.evals_since_best,
                "elapsed": self.elapsed + time.time() - self.start,
                "last_eval": self.last_eval,
                "rng": rng_state(),
            })
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
        return state

    def _load(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise RunError(f"{self.run_dir}/last.pt: cannot resume: its training state does not "
                           f"fit this model ({str(e).splitlines()[0][:200]})") from None
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.best_bleu, self.evals_since_best = state["best_bleu"], state["evals_since_best"]
        self.elapsed = state["elapsed"]
        self.last_eval = state.get("last_eval", self.step)  # older checkpoints: at every save
        # Checkpoints written before the CUDA states were saved hold the first two only.
        set_rng_state(state.get("rng") or {"python": state["rng_python"],
                                           "cpu": state["rng_torch"]})

    def save(self, name: str, full: bool = True) -> str:
        path = os.path.join(self.run_dir, name)
        try:
            save_checkpoint(path, self.state(full))
        except OSError as e:
            raise RunError(f"cannot write {path}: {e.strerror or e}; the previous "
                           "checkpoint is intact") from None
        return path

    # --- evaluation ------------------------------------------------------------------
    def write_metrics(self, record: dict) -> None:
        path = os.path.join(self.run_dir, "metrics.jsonl")
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise RunError(f"cannot write {path}: {e.strerror or e}; the checkpoints in "
                           f"{self.run_dir} are intact") from None

    def valid_bleu(self) -> tuple[float, list[str]]:
        n = self.t.eval_bleu_sentences or len(self.data.valid_src)
        hyps = translate(self.model, self.data.tokenizer, self.data.valid_src[:n],
                         self.cfg.decode, self.device, beam=1, precision=self.precision)
        return score(hyps, self.data.valid_ref[:n]).bleu, hyps

    def evaluate_and_save(self) -> None:
        """Validation loss and greedy BLEU; last.pt always, best.pt when BLEU improves."""
        self.check_health()
        self.last_eval = self.step
        valid_loss = validation_loss(self.model, self.data.valid, self.device, self.precision)
        bleu, hyps = self.valid_bleu()
        minutes = (self.elapsed + time.time() - self.start) / 60
        record = {"step": self.step, "epoch": self.epoch, "valid_loss": round(valid_loss, 4),
                  "valid_ppl": round(math.exp(min(valid_loss, 50)), 2),
                  "valid_bleu": round(bleu, 2), "minutes": round(minutes, 2)}
        self.write_metrics(record)
        log.info("eval step %d | valid loss %.3f | ppl %.2f | BLEU %.2f | e.g. %r", self.step,
                 valid_loss, record["valid_ppl"], bleu, hyps[0][:80] if hyps else "")
        self.evals_since_best += 1
        if bleu > self.best_bleu:
            self.best_bleu, self.evals_since_best = bleu, 0
            self.save("best.pt")
        self.save("last.pt")
        if not self.t.save_every:
            self.save_step_checkpoint()

    def save_step_checkpoint(self) -> None:
        """step-<step>.pt (weights only) for averaging; only the newest keep_checkpoints stay."""
        if self.t.keep_checkpoints:
            self.save(f"step-{self.step:06d}.pt", full=False)
            for old in step_checkpoints(self.run_dir)[:-self.t.keep_checkpoints]:
                os.unlink(old)

    def average(self) -> None:
        """average.pt: the mean of the kept step checkpoints, with its validation BLEU."""
        paths = step_checkpoints(self.run_dir)
        averaged = average_checkpoints(paths)
        save_checkpoint(os.path.join(self.run_dir, "average.pt"), averaged)
        self.model.load_state_dict(averaged["model"])
        bleu, _ = self.valid_bleu()
        self.write_metrics({"step": self.step, "average_of": len(paths),
                            "valid_bleu": round(bleu, 2)})
        log.info("average of the last %d checkpoints: valid BLEU %.2f -> %s", len(paths), bleu,
                 os.path.join(self.run_dir, "average.pt"))

    # --- the loop --------------------------------------------------------------------
    def out_of_budget(self) -> str | None:
        t = self.t
        if t.max_steps and self.step >= t.max_steps:
            return f"train.max_steps={t.max_steps}"
        if t.max_minutes and self.elapsed + time.time() - self.start >= 60 * t.max_minutes:
            return f"train.max_minutes={t.max_minutes}"
        if t.patience and self.evals_since_best >= t.patience:
            return f"train.patience={t.patience} (no better validation BLEU)"
        if self.epoch > t.max_epochs:
            return f"train.max_epochs={t.max_epochs}"
        return None

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)  # acted on after the current step

    def check_health(self) -> tuple[float, int]:
        """Read the window's totals from the device; stop if too many batches were non-finite.

        Read at each log line and before each evaluation: a run whose losses have gone
        non-finite has had every update skipped since, so its weights are still the last
        good ones, but it is stopped before it writes them as a newer checkpoint.
        """
        loss_sum, skipped, bad_in_row = self.totals.read()
        if bad_in_row >= self.t.max_bad_steps:
            raise RunError(f"{bad_in_row} non-finite losses in a row at step {self.step}; "
                           f"stopped. The last good checkpoint is "
                           f"{os.path.join(self.run_dir, 'last.pt')}; try a lower train.lr")
        return loss_sum, skipped

    def log_window(self) -> None:
        """One log line and metrics record for the steps since the last one."""
        loss_sum, skipped = self.check_health()
        steps, tokens = self.step - self.window_step, self.window_tokens
        seconds = time.time() - self.window_start
        record = {"step": self.step, "epoch": self.epoch,
                  "loss": round(loss_sum / max(steps - skipped, 1), 4),
                  "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": round(tokens / max(seconds, 1e-9)), "skipped": skipped}
        self.write_metrics(record)
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                  tok_s=record["tokens_per_s"])
        log.info("step %d | epoch %d | loss %.3f | lr %.2e | %d tokens/s%s", self.step,
                 self.epoch, record["loss"], record["lr"], record["tokens_per_s"],
                 f" | {skipped} skipped (non-finite)" if skipped else "")
        self.new_window()

    def new_window(self) -> None:
        self.totals.reset()
        self.window_step, self.window_tokens, self.window_start = self.step, 0, time.time()

    def train_on(self, batch) -> None:
        """One step on one batch, and where the run stands after it."""
        train_step(self.model, batch, self.optimizer, self.scheduler, self.t, self.totals,
                   self.precision, self.scaler, self.forward)
        self.shapes.add(tuple(batch.tgt_out.shape))
        self.step += 1
        self.batch_in_epoch += 1
        self.window_tokens += batch.n_tokens
        self.progress.update(1)

    def after_step(self) -> str | None:
        """Save on a signal; log, save and evaluate when due; the reason to stop, if any."""
        t = self.t
        if self.signals:
            path = self.save("last.pt")
            raise Interrupted(f"interrupted at step {self.step}: saved {path}; resume with "
                              f"`make train RESUME={self.run_dir}`")
        if self.step % t.log_every == 0:
            self.log_window()
        if t.save_every and self.step % t.save_every == 0:
            self.save_step_checkpoint()
        if self.step % t.eval_every == 0:
            start = time.time()
            self.evaluate_and_save()
            self.window_start += time.time() - start  # evaluation is not training time
        return self.out_of_budget()

    def run(self) -> str:
        t = self.t
        self.start = time.time()
        log.info("run folder %s | device %s, %s | %d threads | %s parameters | %d training "
                 "pairs, %d batches an epoch%s", self.run_dir, self.device, self.precision,
                 torch.get_num_threads(), f"{self.model.num_parameters():,}",
                 len(self.data.train.src), len(self.data.train),
                 f" | resumed at step {self.step}" if self.step else "")
        # Ctrl-C, kill, and a closed terminal or dropped SSH session (SIGHUP) alike.
        handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self.progress = tqdm(total=t.max_steps or None, initial=self.step, unit="step",
                             dynamic_ncols=True, disable=None)
        self.new_window()
        try:
            stop = self.out_of_budget()
            while stop is None:
                epoch = self.data.train.epoch(self.epoch, start=self.batch_in_epoch)
                for batch in prefetch(epoch, self.device):
                    self.train_on(batch)
                    stop = self.after_step()
                    if stop:
                        break
                else:  # the epoch ran out
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    stop = self.out_of_budget()
        finally:
            self.progress.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        try:
            self.finish(stop)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (cli.py) in the final work
            raise Interrupted(
                f"interrupted at step {self.step} after training, before the final evaluation "
                f"and averaging ended: {os.path.join(self.run_dir, 'last.pt')} holds every "
                f"step; `make train RESUME={self.run_dir}` finishes them") from None
        return self.run_dir

    def finish(self, stop: str) -> None:
        """The last evaluation and checkpoints, the average, and what the run reached."""
        t = self.t
        if self.last_eval != self.step:
            self.save("last.pt")  # every step trained is kept before the evaluation starts
            self.evaluate_and_save()
        if t.save_every and self.step % t.save_every:
            self.save_step_checkpoint()  # the final weights are among those averaged
        if t.average_at_end and t.keep_checkpoints:
            self.average()
        if self.t.compile:
            log.info("compiled step: %d batch shapes (rows x length) in this process: %s",
                     len(self.shapes), ", ".join(f"{b}x{n}" for b, n in sorted(self.shapes)))
        log.info("stopped by %s at step %d, epoch %d, after %.1f minutes; best valid BLEU %.2f",
                 stop, self.step, self.epoch, (self.elapsed + time.time() - self.start) / 60,
                 self.best_bleu)
        log.info("checkpoints: %s and %s", os.path.join(self.run_dir, "best.pt"),
                 os.path.join(self.run_dir, "last.pt"))


def train(cfg: Config) -> str:
    """Train a model as the config says; returns the run folder."""
    run_dir = make_run_dir(cfg)
    with run_lock(run_dir):
        return Trainer(cfg, run_dir).run()


def resume(run_dir: str, overrides: list[str] = ()) -> str:
    """Continue the run in run_dir from its last.pt, exactly where it stopped.

    overrides, and hand edits of the run's config.yaml, may change train.* keys (say, a
    larger train.max_steps) and data.path (the corpus moved); nothing else.
    """
    path = os.path.join(run_dir, "last.pt")
    state = load_checkpoint(path)
    if "optimizer" not in state or not ("rng" in state or "rng_torch" in state):
        raise CheckpointError(f"{path}: has no training state to resume from")
    # The corpus may have moved since (data.path is checked once the overrides are in).
    cfg = from_dict(state["config"], source=f"{path} (saved config)", name=state["name"],
                    check_paths=False)
    edits = config_edits(cfg, os.path.join(run_dir, "config.yaml"))
    cfg = with_overrides(cfg, edits + list(overrides), path, sections=RESUMABLE)
    with run_lock(run_dir):
        return Trainer(cfg, run_dir, resume=state).run()
