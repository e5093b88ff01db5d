"""Training: the loop with its budgets, evaluations, checkpoints, resuming and signals.

The step itself (forward, backward, update) is in step.py; the device, precision
and random states in device.py; the log lines and metrics.jsonl in logbook.py; where
the run stands (step, epoch, best BLEU, ...) in runs.Position; what a checkpoint holds,
and how a resumed run takes it back, in state.py. This file decides when to log,
evaluate, save and stop, so that a run can go on after an interruption.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from .batching import prefetch, prepare
from .checkpoint import load_checkpoint
from .config import Config, save_config
from .decode import translate
from .device import (
    keep_freed_memory,
    pick_device,
    resolve_precision,
    rng_state,
    set_deterministic,
)
from .distributed import Distributed, Stopped, lost_peer
from .evaluate import score
from .logbook import Logbook
from .model import build_model
from .runs import Interrupted, Position, RunError, make_run_dir, resumed_config, run_lock
from .state import TrainingState
from .step import (
    Criterion,
    Totals,
    compile_criterion,
    default_chunk,
    make_optimizer,
    make_schedule,
    train_step,
    validation_loss,
)
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # stop cleanly, save last.pt


class Trainer:
    """The training loop: budgets, logging, evaluation, checkpoints, resuming, signals.

    Under torchrun one Trainer runs in every process (dist); they train together and
    process 0 alone writes and validates (distributed.py says who does what).
    """

    def __init__(self, cfg: Config, run_dir: str, resume: dict | None = None,
                 dist: Distributed | None = None):
        self.cfg, self.t, self.run_dir = cfg, cfg.train, run_dir
        self.dist = dist or Distributed()
        random.seed(self.t.seed)
        torch.manual_seed(self.t.seed)  # the CPU and every CUDA device
        if self.t.threads:
            torch.set_num_threads(self.t.threads)
        keep_freed_memory()
        self.device = self.dist.device(pick_device(self.t.device))
        self.precision = resolve_precision(self.t.precision, self.device)
        set_deterministic(self.t.deterministic)
        if resume is None and self.dist.main:
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
        # A resumed run keeps the tokenizer its weights were trained with.
        self.data = self.prepare(None if resume is None else
                                 Tokenizer.from_dict(resume["tokenizer"]))
        self.updates_per_epoch = len(self.data.train) // (self.dist.world_size * self.t.accumulate)
        self.model = build_model(cfg, self.data.tokenizer).to(self.device)
        if self.dist.rank:  # all start from process 0's weights (DDP copies them)...
            torch.manual_seed(self.t.seed + self.dist.rank)  # ...and draw their own dropout
        self.optimizer = make_optimizer(self.model, self.t)
        self.scheduler = make_schedule(self.optimizer, self.t)
        # fp16 has too few exponent bits for small gradients: scale the loss up first.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.totals = Totals.zeros(self.device)  # loss and skipped batches, on the device
        self.logbook = Logbook(run_dir, self.totals, self.t.max_bad_steps, self.dist.main)
        self.criterion = self.make_criterion()
        self.shapes: set[tuple[int, ...]] = set()  # batch shapes the step has seen
        self.rngs: list[dict] = []  # every process's random states, gathered for a checkpoint
        self.at = Position()  # where the run stands: step, epoch, best BLEU, ...
        self.state = TrainingState(cfg, run_dir, self.data.tokenizer, self.model, self.optimizer,
                                   self.scheduler, self.scaler, self.dist, self.device)
        if resume is not None:
            self.at = self.state.load(resume)
            if self.dist.main:  # the config the run goes on under, train.* overrides included
                save_config(cfg, os.path.join(run_dir, "config.yaml"))
        self.signals: list[int] = []

    def prepare(self, tokenizer: Tokenizer | None):
        """The data, prepared by process 0 first: it may download the corpus and train the
        tokenizer, which the others then take from it (each machine's first process
        next, as it may download too, then the rest)."""
        d = self.dist

        def first():
            self.data = prepare(self.cfg, tokenizer, d.world_size)
            self.data.tokenizer.save(self.run_dir)
            return self.data.tokenizer.to_dict() if d.world_size > 1 else None

        shared = d.on_main(first)
        for first_on_machine in (True, False):
            if not d.main and (d.local_rank == 0) == first_on_machine:
                self.data = prepare(self.cfg, Tokenizer.from_dict(shared), d.world_size)
            d.barrier()
        return self.data

    def make_criterion(self) -> torch.nn.Module:
        """The model and its loss, as one module: wrapped in DDP under torchrun, compiled
        with train.compile (the whole-batch loss then, one shape per batch shape)."""
        chunk = 0 if self.t.compile else default_chunk(self.device)
        criterion = Criterion(self.model, self.t.label_smoothing, chunk)
        if self.dist.world_size > 1:
            criterion = DistributedDataParallel(
                criterion, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return compile_criterion(criterion) if self.t.compile else criterion

    # --- checkpoints (what goes in them: state.py) -----------------------------------
    def save(self, name: str, full: bool = True) -> str:
        """Write run_dir/name (process 0 only; the others return its path)."""
        return self.state.save(name, self.at, self.rngs, self.minutes() * 60, full)

    # --- evaluation ------------------------------------------------------------------
    def gather_rngs(self) -> None:
        """Every process's random states, for the next checkpoint (all processes call this)."""
        self.rngs = self.dist.gather(rng_state(self.device))

    def valid_bleu(self) -> tuple[float, list[str]]:
        n = self.t.eval_bleu_sentences or len(self.data.valid_src)
        hyps = translate(self.model, self.data.tokenizer, self.data.valid_src[:n],
                         self.cfg.decode, self.device, beam=1, precision=self.precision)
        scores = score(hyps, self.data.valid_ref[:n])
        # a model of lowercased text is judged by the BLEU that ignores case
        return (scores.bleu_lc if self.data.tokenizer.lowercase else scores.bleu), hyps

    def evaluate_and_save(self) -> None:
        """Validation loss and greedy BLEU; last.pt always, best.pt when BLEU improves.

        Every process calls this; process 0 validates and saves while the others wait,
        and all of them learn from it whether BLEU improved (for train.patience).
        """
        self.logbook.check_health(self.at.step)
        self.at.last_eval = self.at.step
        self.gather_rngs()
        self.at.best_bleu, self.at.evals_since_best = self.dist.on_main(self.validate_and_save)

    def validate_and_save(self) -> tuple[float, int]:
        valid_loss = validation_loss(self.model, self.data.valid, self.device, self.precision)
        bleu, hyps = self.valid_bleu()
        at = self.at
        record = {"step": at.step, "epoch": at.epoch, "epochs": round(self.epochs(), 3),
                  "valid_loss": round(valid_loss, 4),
                  "valid_ppl": round(math.exp(min(valid_loss, 50)), 2),
                  "valid_bleu": round(bleu, 2), "minutes": round(self.minutes(), 2)}
        self.logbook.write(record)
        log.info("eval step %d | valid loss %.3f | ppl %.2f | BLEU %.2f | e.g. %r", at.step,
                 valid_loss, record["valid_ppl"], bleu, hyps[0][:80] if hyps else "")
        at.evals_since_best += 1
        if bleu > at.best_bleu:
            at.best_bleu, at.evals_since_best = bleu, 0
            self.save("best.pt")
        self.save("last.pt")
        if not self.t.save_every:
            self.save_step_checkpoint()
        return at.best_bleu, at.evals_since_best

    def save_step_checkpoint(self) -> None:
        self.state.save_step(self.at)

    def average(self) -> None:
        """average.pt: the mean of the kept step checkpoints, with its validation BLEU."""
        n = self.state.average()
        bleu, _ = self.valid_bleu()
        self.logbook.write({"step": self.at.step, "average_of": n, "valid_bleu": round(bleu, 2)})
        log.info("average of the last %d checkpoints: valid BLEU %.2f -> %s", n, bleu,
                 os.path.join(self.run_dir, "average.pt"))

    # --- the loop --------------------------------------------------------------------
    def minutes(self) -> float:
        """Minutes trained, before this process started included."""
        return (self.at.elapsed + time.time() - self.start) / 60

    def epochs(self) -> float:
        """Epochs trained (12.5: half-way through the 13th): the axis on which runs of
        different update sizes compare (`make plot X=epochs`)."""
        return self.at.epoch - 1 + self.at.batch_in_epoch / max(self.updates_per_epoch, 1)

    def time_is_up(self) -> bool:
        return bool(self.t.max_minutes) and self.minutes() >= self.t.max_minutes

    def out_of_budget(self, time_is_up: bool | None = None) -> str | None:
        """Why the run should stop now, if it should; the same in every process."""
        t, at = self.t, self.at
        if time_is_up is None:  # processes' clocks differ: stop when any one's time is up
            (time_is_up,) = self.dist.any(self.time_is_up())
        if t.max_steps and at.step >= t.max_steps:
            return f"train.max_steps={t.max_steps}"
        if time_is_up:
            return f"train.max_minutes={t.max_minutes}"
        if t.patience and at.evals_since_best >= t.patience:
            return f"train.patience={t.patience} (no better validation BLEU)"
        if at.epoch > t.max_epochs:
            return f"train.max_epochs={t.max_epochs}"
        return None

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)  # acted on after the current step

    def train_on(self, update) -> None:
        """One update, and where the run stands after it."""
        train_step(self.model, update, self.optimizer, self.scheduler, self.t, self.totals,
                   self.precision, self.scaler, self.criterion)
        self.shapes.update(tuple(b.tgt_out.shape) for b in update.batches)
        self.at.step += 1
        self.at.batch_in_epoch += 1
        self.logbook.took(update.n_tokens)

    def after_step(self) -> str | None:
        """Save on a signal; log, save and evaluate when due; the reason to stop, if any."""
        t, step = self.t, self.at.step
        # A signal reaches the processes at different moments: they stop together.
        signalled, time_is_up = self.dist.any(bool(self.signals), self.time_is_up())
        if signalled:
            self.gather_rngs()
            path = self.dist.on_main(lambda: self.save("last.pt"))
            raise Interrupted(f"interrupted at step {step}: saved {path}; resume with "
                              f"`make train RESUME={self.run_dir}`")
        if step % t.log_every == 0:
            self.logbook.log_window(step, self.at.epoch, self.epochs(),
                                    self.scheduler.get_last_lr()[0])
        if t.save_every and step % t.save_every == 0:
            self.save_step_checkpoint()
        if step % t.eval_every == 0:
            start = time.time()
            self.evaluate_and_save()
            self.logbook.pause(time.time() - start)  # evaluation is not training time
        return self.out_of_budget(time_is_up)

    def run(self) -> str:
        t = self.t
        self.start = time.time()
        split = self.dist.world_size * t.accumulate
        log.info("run folder %s | device %s, %s | %d threads | %s parameters | %d training "
                 "pairs, %d updates an epoch%s%s", self.run_dir, self.device, self.precision,
                 torch.get_num_threads(), f"{self.model.num_parameters():,}",
                 len(self.data.train.src), self.updates_per_epoch,
                 f" | {self.dist.world_size} processes x {t.accumulate} micro-batches of "
                 f"{self.data.train.batch_tokens} tokens an update" if split > 1 else "",
                 f" | resumed at step {self.at.step}" if self.at.step else "")
        # Ctrl-C, kill, and a closed terminal or dropped SSH session (SIGHUP) alike.
        handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self.logbook.start(self.at.step, t.max_steps)
        try:
            try:
                self.loop()
            finally:
                self.logbook.close()
                for s, h in handlers.items():
                    signal.signal(s, h)
            try:
                self.finish(self.stop)
            except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (cli.py) in the final work
                raise Interrupted(
                    f"interrupted at step {self.at.step} after training, before the final "
                    f"evaluation and averaging ended: {os.path.join(self.run_dir, 'last.pt')} "
                    f"holds every step; `make train RESUME={self.run_dir}` finishes them") from None
        except (Interrupted, RunError) as e:
            if self.dist.main:
                raise
            raise Stopped(130 if isinstance(e, Interrupted) else 2) from None  # 0 said why
        except Exception as e:
            if self.dist.world_size > 1 and lost_peer(e):
                raise RunError(
                    f"process {self.dist.rank}: another process of this run ended at step "
                    f"{self.at.step}; the last checkpoint, "
                    f"{os.path.join(self.run_dir, 'last.pt')}, is intact") from None
            raise
        return self.run_dir

    def loop(self) -> None:
        """Epochs of updates until a budget or a signal stops the run (in self.stop)."""
        at = self.at
        self.stop = self.out_of_budget()
        while self.stop is None:
            updates = self.data.train.updates(at.epoch, at.batch_in_epoch, self.dist.world_size,
                                              self.dist.rank, self.t.accumulate)
            for update in prefetch(updates, self.device):
                self.train_on(update)
                self.stop = self.after_step()
                if self.stop:
                    return
            at.epoch, at.batch_in_epoch = at.epoch + 1, 0  # the epoch ran out
            self.stop = self.out_of_budget()

    def finish(self, stop: str) -> None:
        """The last evaluation and checkpoints, the average, and what the run reached."""
        t, at = self.t, self.at
        if at.last_eval != at.step:
            self.gather_rngs()
            self.save("last.pt")  # every step trained is kept before the evaluation starts
            self.evaluate_and_save()
        if t.save_every and at.step % t.save_every:
            self.save_step_checkpoint()  # the final weights are among those averaged
        if t.average_at_end and t.keep_checkpoints:
            self.dist.on_main(self.average)
        if self.t.compile:
            log.info("compiled step: %d batch shapes (rows x length) in this process: %s",
                     len(self.shapes), ", ".join(f"{b}x{n}" for b, n in sorted(self.shapes)))
        log.info("stopped by %s at step %d, epoch %d, after %.1f minutes; best valid BLEU %.2f",
                 stop, at.step, at.epoch, self.minutes(), at.best_bleu)
        log.info("checkpoints: %s and %s", os.path.join(self.run_dir, "best.pt"),
                 os.path.join(self.run_dir, "last.pt"))


def train(cfg: Config) -> str:
    """Train a model as the config says; returns the run folder.

    Under torchrun, every process calls this: process 0 makes and holds the run folder.
    """
    dist = Distributed.from_env()
    dist.start()
    run_dir = dist.on_main(lambda: make_run_dir(cfg))
    with contextlib.ExitStack() as held:
        dist.on_main(lambda: held.enter_context(run_lock(run_dir)))
        Trainer(cfg, run_dir, dist=dist).run()
    dist.end()  # not after an error: the others may be gone
    return run_dir


def resume(run_dir: str, overrides: list[str] = ()) -> str:
    """Continue the run in run_dir from its last.pt, exactly where it stopped.

    overrides, and hand edits of the run's config.yaml, may change train.* keys (say, a
    larger train.max_steps) and data.path (the corpus moved); nothing else.
    """
    dist = Distributed.from_env()
    dist.start()
    path, state = os.path.join(run_dir, "last.pt"), {}

    def check() -> Config:
        state.update(load_checkpoint(path))
        return resumed_config(run_dir, state, overrides)

    cfg = dist.on_main(check)
    if not dist.main:  # on several machines, the run folder must be on each
        state = load_checkpoint(path)
    with contextlib.ExitStack() as held:
        dist.on_main(lambda: held.enter_context(run_lock(run_dir)))
        Trainer(cfg, run_dir, resume=state, dist=dist).run()
    dist.end()
    return run_dir
