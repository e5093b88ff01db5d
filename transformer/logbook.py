"""What a run writes down as it trains: a log line every train.log_every steps, the
progress bar, and metrics.jsonl (one JSON record per log line, evaluation and average).

A logging window is the steps since the last log line. The loss, the gradient norm and
the skipped batches of a window are summed on the device (step.Totals) and read here,
once a window, so that the steps in between never wait for the device.
"""

from __future__ import annotations

import json
import logging
import os
import time

from tqdm import tqdm

from .runs import RunError
from .step import Totals

log = logging.getLogger(__name__)


class Logbook:
    def __init__(self, run_dir: str, totals: Totals, max_bad_steps: int, writes: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.run_dir, self.totals, self.max_bad_steps = run_dir, totals, max_bad_steps
        self.writes = writes  # under torchrun only process 0 writes (and shows a bar)
        self.progress = None

    def start(self, step: int, max_steps: int) -> None:
        self.progress = tqdm(total=max_steps or None, initial=step, unit="step",
                             dynamic_ncols=True, disable=None if self.writes else True)
        self.new_window(step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def write(self, record: dict) -> None:
        """One record in metrics.jsonl."""
        if not self.writes:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise RunError(f"cannot write {self.path}: {e.strerror or e}; the checkpoints in "
                           f"{self.run_dir} are intact") from None

    def new_window(self, step: int) -> None:
        self.totals.reset()
        self.window_step, self.window_tokens, self.window_start = step, 0, time.time()

    def took(self, n_tokens: int) -> None:
        """One update of n_tokens target tokens was trained."""
        self.window_tokens += n_tokens
        self.progress.update(1)

    def pause(self, seconds: float) -> None:
        """Time spent on something else (an evaluation) is not training time."""
        self.window_start += seconds

    def check_health(self, step: int) -> tuple[float, int, float]:
        """Read the window's totals from the device; stop if too many batches were non-finite.

        Read at each log line and before each evaluation: a run whose losses have gone
        non-finite has had every update skipped since, so its weights are still the last
        good ones, but it is stopped before it writes them as a newer checkpoint.
        """
        loss_sum, skipped, bad_in_row, gnorm_sum = self.totals.read()
        if bad_in_row >= self.max_bad_steps:
            raise RunError(f"{bad_in_row} non-finite losses in a row at step {step}; "
                           f"stopped. The last good checkpoint is "
                           f"{os.path.join(self.run_dir, 'last.pt')}; try a lower train.lr")
        return loss_sum, skipped, gnorm_sum

    def log_window(self, step: int, epoch: int, epochs: float, lr: float) -> None:
        """One log line and metrics record for the steps since the last one (epoch: the
        one in progress; epochs: how many were trained, 12.5 half-way through the 13th)."""
        loss_sum, skipped, gnorm_sum = self.check_health(step)
        seconds = time.time() - self.window_start
        updated = max(step - self.window_step - skipped, 1)
        # gnorm: the mean gradient norm before clipping; a run about to stall shows it first.
        record = {"step": step, "epoch": epoch, "epochs": round(epochs, 3),
                  "loss": round(loss_sum / updated, 4), "gnorm": round(gnorm_sum / updated, 3),
                  "lr": lr, "tokens_per_s": round(self.window_tokens / max(seconds, 1e-9)),
                  "skipped": skipped}
        self.write(record)
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}",
                                  tok_s=record["tokens_per_s"])
        log.info("step %d | epoch %d | loss %.3f | gnorm %.3f | lr %.2e | %d tokens/s%s",
                 step, epoch, record["loss"], record["gnorm"], lr, record["tokens_per_s"],
                 f" | {skipped} skipped (non-finite)" if skipped else "")
        self.new_window(step)
