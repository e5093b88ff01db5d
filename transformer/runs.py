"""Run folders, and the errors that end a run.

A run lives in runs/<name>/: config.yaml, the tokenizer, metrics.jsonl and the
checkpoints (last.pt, best.pt, step-*.pt, average.pt).
"""

from __future__ import annotations

import os
import time

from .config import Config


class RunError(RuntimeError):
    """A run that cannot start or go on (an unwritable run folder, ...); one line for the user."""


class Interrupted(RuntimeError):
    """Training stopped by Ctrl-C or SIGTERM after saving last.pt; says how to resume."""


def make_run_dir(cfg: Config) -> str:
    """runs/<name>, created now so that an unwritable place fails before any training."""
    name = cfg.train.name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.train.runs_dir, name)
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise RunError(f"cannot write the run folder {run_dir}: {e.strerror}") from None
    return run_dir
