"""Run folders, where a run stands, and the errors that end a run.

A run lives in runs/<name>/: config.yaml, the tokenizer, metrics.jsonl and the
checkpoints (last.pt, best.pt, step-*.pt, average.pt).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass

from .checkpoint import CheckpointError
from .config import Config, ConfigError, from_dict, load_config, to_dict, with_overrides


class RunError(RuntimeError):
    """A run that cannot start or go on (an unwritable run folder, ...); one line for the user."""


class Interrupted(RuntimeError):
    """Training stopped by Ctrl-C or SIGTERM after saving last.pt; says how to resume."""


@dataclass
class Position:
    """Where a run stands. All of it goes into every checkpoint that a run can resume from,
    so that the resumed run goes on exactly there."""

    step: int = 0  # updates taken (or skipped as non-finite)
    epoch: int = 1  # the epoch in progress
    batch_in_epoch: int = 0  # updates of this epoch already taken
    best_bleu: float = -1.0  # the best validation BLEU so far (best.pt's)
    evals_since_best: int = 0  # evaluations without a better BLEU (for train.patience)
    elapsed: float = 0.0  # seconds trained before this process started
    last_eval: int = -1  # the step of the last evaluation

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict) -> Position:
        fields = {k: state[k] for k in cls.__dataclass_fields__ if k in state}
        fields.setdefault("last_eval", state["step"])  # older checkpoints: at every save
        return cls(**fields)


# What makes a folder hold a run: its metrics or checkpoints. A config.yaml alone is a run
# that failed before its first step (a data error, say): it is started again.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


def make_run_dir(cfg: Config) -> str:
    """runs/<name>, created now so that an unwritable place fails before any training.

    A folder that already holds a run is refused: training into it would replace its
    checkpoints and mix two runs' metrics.
    """
    name = cfg.train.name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.train.runs_dir, name)
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if found:
        raise RunError(f"{run_dir} already holds a run ({', '.join(found)}); resume it with "
                       f"`make train RESUME={run_dir}`, or give this one another "
                       "train.name")
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise RunError(f"cannot write the run folder {run_dir}: {e.strerror}") from None
    return run_dir


@contextlib.contextmanager
def run_lock(run_dir: str):
    """Hold the run folder for this process: a second training of it is refused.

    An advisory lock (flock) on run_dir/.lock, released when the process ends however
    it ends, so a killed run never leaves its folder locked.
    """
    path = os.path.join(run_dir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise RunError(f"{run_dir} is in use by another training (pid {pid}); wait for it "
                       "to end, or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


RESUMABLE = ("train", "data.path")  # what a resumed run may change: budgets, where the data is


def config_edits(cfg: Config, path: str) -> list[str]:
    """The run's config.yaml as edited by hand since it was written, as overrides of cfg.

    Only RESUMABLE keys may differ: any other edit is refused in one line, rather than
    ignored and overwritten (the weights were trained under the checkpoint's config).
    """
    if not os.path.isfile(path):
        return []
    try:
        edited = to_dict(load_config(path, check_paths=False))
    except ConfigError as e:
        raise RunError(f"cannot resume: {e}") from None
    saved, edits = to_dict(cfg), []
    for section, values in edited.items():
        for key, value in values.items():
            if value != saved[section][key]:
                if section != "train" and f"{section}.{key}" not in RESUMABLE:
                    raise RunError(
                        f"{path}: {section}.{key} was changed to {value!r} but the run was "
                        f"trained with {saved[section][key]!r}; a resumed run can change only "
                        "train.* and data.path: put it back, or start a new run")
                edits.append(f"{section}.{key}={json.dumps(value)}")
    return edits


def resumed_config(run_dir: str, state: dict, overrides: list[str]) -> Config:
    """The config a run goes on under: its checkpoint's, with hand edits and overrides."""
    path = os.path.join(run_dir, "last.pt")
    if "optimizer" not in state or not ("rng" in state or "rng_torch" in state):
        raise CheckpointError(f"{path}: has no training state to resume from")
    # The corpus may have moved since (data.path is checked once the overrides are in).
    cfg = from_dict(state["config"], source=f"{path} (saved config)", name=state["name"],
                    check_paths=False)
    edits = config_edits(cfg, os.path.join(run_dir, "config.yaml"))
    return with_overrides(cfg, edits + list(overrides), path, sections=RESUMABLE)
