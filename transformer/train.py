"""Training: the loop with its budgets, evaluations, checkpoints, resuming and signals.

The step itself (forward, backward, update) is in step.py; the device, precision
and random states in device.py. This file decides when to log, evaluate, save and
stop, and keeps where the run stands so that it can go on after an interruption.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .batching import prefetch, prepare
from .checkpoint import (
    average_checkpoints,
    build,
    load_checkpoint,
    save_checkpoint,
    step_checkpoints,
)
from .config import Config, save_config, to_dict
from .decode import translate
from .device import pick_device, resolve_precision, rng_state, set_deterministic, set_rng_state
from .distributed import Distributed, Stopped, lost_peer
from .evaluate import score
from .runs import Interrupted, RunError, make_run_dir, resumed_config, run_lock
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
        self.device = self.dist.device(pick_device(self.t.device))
        self.precision = resolve_precision(self.t.precision, self.device)
        set_deterministic(self.t.deterministic)
        if resume is None and self.dist.main:
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
        # A resumed run keeps the tokenizer its weights were trained with.
        self.data = self.prepare(None if resume is None else
                                 Tokenizer.from_dict(resume["tokenizer"]))
        self.model = build(cfg, self.data.tokenizer).to(self.device)
        if self.dist.rank:  # all start from process 0's weights (DDP copies them)...
            torch.manual_seed(self.t.seed + self.dist.rank)  # ...and draw their own dropout
        self.optimizer = make_optimizer(self.model, self.t)
        self.scheduler = make_schedule(self.optimizer, self.t.warmup_steps)
        # fp16 has too few exponent bits for small gradients: scale the loss up first.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.totals = Totals.zeros(self.device)  # loss and skipped batches, on the device
        self.criterion = self.make_criterion()
        self.shapes: set[tuple[int, ...]] = set()  # batch shapes the step has seen
        self.rngs: list[dict] = []  # every process's random states, gathered for a checkpoint
        # Where the run stands: all of it goes into every checkpoint.
        self.step = 0  # updates taken (or skipped as non-finite)
        self.epoch = 1  # the epoch in progress
        self.batch_in_epoch = 0  # updates of this epoch already taken
        self.best_bleu = -1.0
        self.evals_since_best = 0
        self.elapsed = 0.0  # seconds of training before this process started
        self.last_eval = -1  # the step of the last evaluation
        if resume is not None:
            self._load(resume)
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
                "updates_of": [self.dist.world_size, self.t.accumulate],
            })
            rngs = self.rngs if self.dist.world_size > 1 else [rng_state(self.device)]
            state["rng"] = rngs[0]
            if len(rngs) > 1:
                state["rng_ranks"] = rngs  # process r draws from rngs[r]
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
        rng = state.get("rng") or {"python": state["rng_python"], "cpu": state["rng_torch"]}
        ranks = state.get("rng_ranks", [rng])
        if len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank], self.device)
        elif self.dist.main:
            set_rng_state(rng, self.device)
        else:  # more processes than saved states: new dropout masks, from a seed of its own
            torch.manual_seed(self.t.seed + 1_000 * self.step + self.dist.rank)
        split = state.get("updates_of", [1, 1])
        if split != [self.dist.world_size, self.t.accumulate]:
            log.info("resumed with %d processes x %d micro-batches an update, trained with "
                     "%d x %d: the rest of epoch %d is cut into micro-batches anew",
                     self.dist.world_size, self.t.accumulate, *split, self.epoch)

    def save(self, name: str, full: bool = True) -> str:
        """Write a checkpoint (process 0 only; the others return its path)."""
        path = os.path.join(self.run_dir, name)
        if not self.dist.main:
            return path
        try:
            save_checkpoint(path, self.state(full))
        except OSError as e:
            raise RunError(f"cannot write {path}: {e.strerror or e}; the previous "
                           "checkpoint is intact") from None
        return path

    # --- evaluation ------------------------------------------------------------------
    def gather_rngs(self) -> None:
        """Every process's random states, for the next checkpoint (all processes call this)."""
        self.rngs = self.dist.gather(rng_state(self.device))

    def write_metrics(self, record: dict) -> None:
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not self.dist.main:
            return
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
        """Validation loss and greedy BLEU; last.pt always, best.pt when BLEU improves.

        Every process calls this; process 0 validates and saves while the others wait,
        and all of them learn from it whether BLEU improved (for train.patience).
        """
        self.check_health()
        self.last_eval = self.step
        self.gather_rngs()
        self.best_bleu, self.evals_since_best = self.dist.on_main(self.validate_and_save)

    def validate_and_save(self) -> tuple[float, int]:
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
        return self.best_bleu, self.evals_since_best

    def save_step_checkpoint(self) -> None:
        """step-<step>.pt (weights only) for averaging; only the newest keep_checkpoints stay."""
        if self.t.keep_checkpoints and self.dist.main:
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
    def time_is_up(self) -> bool:
        t = self.t
        return bool(t.max_minutes) and self.elapsed + time.time() - self.start >= 60 * t.max_minutes

    def out_of_budget(self, time_is_up: bool | None = None) -> str | None:
        """Why the run should stop now, if it should; the same in every process."""
        t = self.t
        if time_is_up is None:  # processes' clocks differ: stop when any one's time is up
            (time_is_up,) = self.dist.any(self.time_is_up())
        if t.max_steps and self.step >= t.max_steps:
            return f"train.max_steps={t.max_steps}"
        if time_is_up:
            return f"train.max_minutes={t.max_minutes}"
        if t.patience and self.evals_since_best >= t.patience:
            return f"train.patience={t.patience} (no better validation BLEU)"
        if self.epoch > t.max_epochs:
            return f"train.max_epochs={t.max_epochs}"
        return None

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)  # acted on after the current step

    def check_health(self) -> tuple[float, int, float]:
        """Read the window's totals from the device; stop if too many batches were non-finite.

        Read at each log line and before each evaluation: a run whose losses have gone
        non-finite has had every update skipped since, so its weights are still the last
        good ones, but it is stopped before it writes them as a newer checkpoint.
        """
        loss_sum, skipped, bad_in_row, gnorm_sum = self.totals.read()
        if bad_in_row >= self.t.max_bad_steps:
            raise RunError(f"{bad_in_row} non-finite losses in a row at step {self.step}; "
                           f"stopped. The last good checkpoint is "
                           f"{os.path.join(self.run_dir, 'last.pt')}; try a lower train.lr")
        return loss_sum, skipped, gnorm_sum

    def log_window(self) -> None:
        """One log line and metrics record for the steps since the last one."""
        loss_sum, skipped, gnorm_sum = self.check_health()
        steps, tokens = self.step - self.window_step, self.window_tokens
        seconds = time.time() - self.window_start
        updated = max(steps - skipped, 1)
        # gnorm: the mean gradient norm before clipping; a run about to stall shows it first.
        record = {"step": self.step, "epoch": self.epoch,
                  "loss": round(loss_sum / updated, 4), "gnorm": round(gnorm_sum / updated, 3),
                  "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": round(tokens / max(seconds, 1e-9)), "skipped": skipped}
        self.write_metrics(record)
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                  tok_s=record["tokens_per_s"])
        log.info("step %d | epoch %d | loss %.3f | gnorm %.3f | lr %.2e | %d tokens/s%s",
                 self.step, self.epoch, record["loss"], record["gnorm"], record["lr"],
                 record["tokens_per_s"],
                 f" | {skipped} skipped (non-finite)" if skipped else "")
        self.new_window()

    def new_window(self) -> None:
        self.totals.reset()
        self.window_step, self.window_tokens, self.window_start = self.step, 0, time.time()

    def train_on(self, update) -> None:
        """One update, and where the run stands after it."""
        train_step(self.model, update, self.optimizer, self.scheduler, self.t, self.totals,
                   self.precision, self.scaler, self.criterion)
        self.shapes.update(tuple(b.tgt_out.shape) for b in update.batches)
        self.step += 1
        self.batch_in_epoch += 1
        self.window_tokens += update.n_tokens
        self.progress.update(1)

    def after_step(self) -> str | None:
        """Save on a signal; log, save and evaluate when due; the reason to stop, if any."""
        t = self.t
        # A signal reaches the processes at different moments: they stop together.
        signalled, time_is_up = self.dist.any(bool(self.signals), self.time_is_up())
        if signalled:
            self.gather_rngs()
            path = self.dist.on_main(lambda: self.save("last.pt"))
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
        return self.out_of_budget(time_is_up)

    def run(self) -> str:
        t = self.t
        self.start = time.time()
        split = self.dist.world_size * t.accumulate
        log.info("run folder %s | device %s, %s | %d threads | %s parameters | %d training "
                 "pairs, %d updates an epoch%s%s", self.run_dir, self.device, self.precision,
                 torch.get_num_threads(), f"{self.model.num_parameters():,}",
                 len(self.data.train.src), len(self.data.train) // split,
                 f" | {self.dist.world_size} processes x {t.accumulate} micro-batches of "
                 f"{self.data.train.batch_tokens} tokens an update" if split > 1 else "",
                 f" | resumed at step {self.step}" if self.step else "")
        # Ctrl-C, kill, and a closed terminal or dropped SSH session (SIGHUP) alike.
        handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self.progress = tqdm(total=t.max_steps or None, initial=self.step, unit="step",
                             dynamic_ncols=True, disable=None if self.dist.main else True)
        self.new_window()
        try:
            try:
                self.loop()
            finally:
                self.progress.close()
                for s, h in handlers.items():
                    signal.signal(s, h)
            try:
                self.finish(self.stop)
            except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (cli.py) in the final work
                raise Interrupted(
                    f"interrupted at step {self.step} after training, before the final "
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
                    f"{self.step}; the last checkpoint, "
                    f"{os.path.join(self.run_dir, 'last.pt')}, is intact") from None
            raise
        return self.run_dir

    def loop(self) -> None:
        """Epochs of updates until a budget or a signal stops the run (in self.stop)."""
        self.stop = self.out_of_budget()
        while self.stop is None:
            updates = self.data.train.updates(self.epoch, self.batch_in_epoch,
                                              self.dist.world_size, self.dist.rank,
                                              self.t.accumulate)
            for update in prefetch(updates, self.device):
                self.train_on(update)
                self.stop = self.after_step()
                if self.stop:
                    return
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0  # the epoch ran out
            self.stop = self.out_of_budget()

    def finish(self, stop: str) -> None:
        """The last evaluation and checkpoints, the average, and what the run reached."""
        t = self.t
        if self.last_eval != self.step:
            self.gather_rngs()
            self.save("last.pt")  # every step trained is kept before the evaluation starts
            self.evaluate_and_save()
        if t.save_every and self.step % t.save_every:
            self.save_step_checkpoint()  # the final weights are among those averaged
        if t.average_at_end and t.keep_checkpoints:
            self.dist.on_main(self.average)
        if self.t.compile:
            log.info("compiled step: %d batch shapes (rows x length) in this process: %s",
                     len(self.shapes), ", ".join(f"{b}x{n}" for b, n in sorted(self.shapes)))
        log.info("stopped by %s at step %d, epoch %d, after %.1f minutes; best valid BLEU %.2f",
                 stop, self.step, self.epoch, (self.elapsed + time.time() - self.start) / 60,
                 self.best_bleu)
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
