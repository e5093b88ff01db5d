"""What a run saves into its folder, and how a resumed run takes it back.

last.pt and best.pt hold everything a run needs to go on exactly where it stood: the
weights, the optimizer's moments, the schedule, where the run stands (runs.Position),
every process's random states and the gradient scaler. step-<step>.pt hold the weights
only; the newest train.keep_checkpoints of them are averaged into average.pt at the end.
checkpoint.py writes and reads the files (atomically); this file decides what goes in.
"""

from __future__ import annotations

import logging
import os

import torch

from .checkpoint import average_checkpoints, save_checkpoint, step_checkpoint_name, step_checkpoints
from .config import Config, to_dict
from .device import rng_state, set_rng_state
from .distributed import Distributed
from .runs import Position, RunError
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class TrainingState:
    """The model, optimizer, schedule and scaler of a run, and its checkpoints.

    Process 0 writes the files; in the other processes save() only returns the path.
    """

    def __init__(self, cfg: Config, run_dir: str, tokenizer: Tokenizer, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, scaler, dist: Distributed,
                 device: torch.device):
        self.cfg, self.run_dir, self.tokenizer, self.dist, self.device = (
            cfg, run_dir, tokenizer, dist, device)
        self.model, self.optimizer, self.scheduler, self.scaler = (
            model, optimizer, scheduler, scaler)

    def to_dict(self, at: Position, rngs: list[dict], elapsed: float, full: bool = True) -> dict:
        """A self-sufficient checkpoint; full=False leaves out optimizer and position.

        rngs: every process's random states (distributed.gather), or [] for this one's.
        """
        state = {
            "name": self.cfg.name, "config": to_dict(self.cfg),
            "tokenizer": self.tokenizer.to_dict(), "model": self.model.state_dict(),
            "step": at.step, "epoch": at.epoch, "best_bleu": at.best_bleu,
        }
        if full:
            state.update(at.to_dict())
            state.update({
                "elapsed": elapsed,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "updates_of": [self.dist.world_size, self.cfg.train.accumulate],
            })
            rngs = rngs if self.dist.world_size > 1 else [rng_state(self.device)]
            state["rng"] = rngs[0]
            if len(rngs) > 1:
                state["rng_ranks"] = rngs  # process r draws from rngs[r]
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, name: str, at: Position, rngs: list[dict], elapsed: float,
             full: bool = True) -> str:
        """Write run_dir/name; a full disk or a removed folder is one line, not a traceback."""
        path = os.path.join(self.run_dir, name)
        if not self.dist.main:
            return path
        try:
            save_checkpoint(path, self.to_dict(at, rngs, elapsed, full))
        except OSError as e:
            raise RunError(f"cannot write {path}: {e.strerror or e}; the previous "
                           "checkpoint is intact") from None
        return path

    def save_step(self, at: Position) -> None:
        """step-<step>.pt (weights only) for averaging; only the newest keep_checkpoints stay."""
        keep = self.cfg.train.keep_checkpoints
        if keep and self.dist.main:
            self.save(step_checkpoint_name(at.step), at, [], 0.0, full=False)
            for old in step_checkpoints(self.run_dir)[:-keep]:
                os.unlink(old)

    def average(self) -> int:
        """average.pt, the mean of the kept step checkpoints, now also the model's weights.

        Returns how many were averaged.
        """
        paths = step_checkpoints(self.run_dir)
        averaged = average_checkpoints(paths)
        save_checkpoint(os.path.join(self.run_dir, "average.pt"), averaged)
        self.model.load_state_dict(averaged["model"])
        return len(paths)

    def load(self, state: dict) -> Position:
        """Take a checkpoint's training state back; returns where the run stood."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise RunError(f"{self.run_dir}/last.pt: cannot resume: its training state does not "
                           f"fit this model ({str(e).splitlines()[0][:200]})") from None
        at = Position.from_checkpoint(state)
        self.load_rngs(state, at.step)
        split = state.get("updates_of", [1, 1])
        if split != [self.dist.world_size, self.cfg.train.accumulate]:
            log.info("resumed with %d processes x %d micro-batches an update, trained with "
                     "%d x %d: the rest of epoch %d is cut into micro-batches anew",
                     self.dist.world_size, self.cfg.train.accumulate, *split, at.epoch)
        return at

    def load_rngs(self, state: dict, step: int) -> None:
        """Each process draws on from the random states it saved, where there is one."""
        d = self.dist
        # Checkpoints written before the CUDA states were saved hold the first two only.
        rng = state.get("rng") or {"python": state["rng_python"], "cpu": state["rng_torch"]}
        ranks = state.get("rng_ranks", [rng])
        if len(ranks) == d.world_size:
            set_rng_state(ranks[d.rank], self.device)
        elif d.main:
            set_rng_state(rng, self.device)
        else:  # more processes than saved states: new dropout masks, from a seed of its own
            torch.manual_seed(self.cfg.train.seed + 1_000 * step + d.rank)
