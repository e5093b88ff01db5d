"""One training step, and the validation loss, without waiting for the device.

On a GPU the host only queues work: a step is fast when Python runs ahead of the
kernels and never stops to read a number back. Anything that turns a device value
into a Python value (`.item()`, `bool(tensor)`, indexing with a boolean mask, whose
result size depends on the data) makes the host wait until every queued kernel has
run. So here:
- the real target positions come from the batch as an index made on the host
  (`Batch.real`), not from a boolean mask of the target;
- a non-finite loss or gradient skips the update on the device: fused Adam reads a
  `found_inf` flag and leaves weights and moments alone where it is 1 (the
  contract torch.amp.GradScaler uses);
- the losses of a logging window are summed on the device (`Totals`) and read once,
  when the loop logs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batching import Batch, BatchIterator
from .config import TrainConfig
from .device import autocast
from .model import Transformer
from .tokenizer import PAD

LOSS_CHUNK = 512  # target positions projected to the vocabulary at a time


def loss_fn(hidden: torch.Tensor, target: torch.Tensor, generator: Callable, label_smoothing: float,
            chunk: int = LOSS_CHUNK, real: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy over real target tokens: hidden (B, T, D), target (B, T).

    generator maps the decoder's output to logits (the model's tied output projection).
    It is applied here to the real positions only (padding has no loss), `chunk`
    positions at a time. The whole batch's logits, 4,096 tokens x 8,000 words = 131 MB,
    would pass through memory about ten times between the projection, the softmax and
    their gradients; a chunk's 16 MB stays in the CPU's cache. Same sum, and on the
    2-core CPU the projection and loss of a batch, forward and backward, run 1.6x
    faster (`python scripts/bench_train.py --loss multi30k`).

    real: the flat indices of the real positions (N,), as `Batch.real` gives them;
    None finds them from the target (a boolean mask: on a GPU that waits for it).
    chunk=0 projects every position at once and lets cross_entropy ignore padding:
    one shape for a compiled step, and fewer, larger kernels for a GPU.
    """
    hidden = hidden.reshape(-1, hidden.size(-1))  # (B*T, D)
    target = target.reshape(-1)  # (B*T,)
    if not chunk:  # all positions at once; padding is ignored by its id
        return F.cross_entropy(generator(hidden).float(), target, ignore_index=PAD,
                               label_smoothing=label_smoothing, reduction="sum")
    if real is None:
        real = (target != PAD).nonzero().squeeze(1)  # (N,)
    hidden, target = hidden.index_select(0, real), target.index_select(0, real)  # (N, D), (N,)
    return sum(F.cross_entropy(generator(h).float(), t, label_smoothing=label_smoothing,
                               reduction="sum")
               for h, t in zip(hidden.split(chunk), target.split(chunk)))


def batch_loss(model: Transformer, batch: Batch, label_smoothing: float,
               chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """The summed loss of a batch: the model's forward pass and loss_fn."""
    hidden = model.hidden(batch.src, batch.tgt_in)  # (B, T, D)
    return loss_fn(hidden, batch.tgt_out, model.generator, label_smoothing, chunk, batch.real)


COMPILE_BACKEND = "inductor"  # torch.compile's default: generated, fused kernels


def compiled_batch_loss() -> Callable:
    """batch_loss compiled by torch.compile (train.compile), for batches of few shapes.

    dynamic=False compiles one graph per batch shape, so the batches must come in few
    shapes (BatchIterator's bucket); the limit of graphs kept is raised to hold them all.
    The whole-batch loss (chunk=0) keeps the graph's shapes those of the batch.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    step = torch.compile(batch_loss, backend=COMPILE_BACKEND, dynamic=False)
    return lambda model, batch, label_smoothing: step(model, batch, label_smoothing, chunk=0)


def default_chunk(device: torch.device) -> int:
    """Chunks of real tokens on the CPU (its cache); the whole batch on a GPU (fewer kernels)."""
    return LOSS_CHUNK if device.type == "cpu" else 0


@dataclass
class Totals:
    """Sums over a logging window, kept on the device and read once per log line."""

    loss: torch.Tensor  # summed per-token loss of the batches that updated
    skipped: torch.Tensor  # batches whose update was skipped (non-finite)
    bad_in_row: torch.Tensor  # non-finite batches in a row, up to now

    @classmethod
    def zeros(cls, device: torch.device) -> Totals:
        return cls(*(torch.zeros((), device=device) for _ in range(3)))

    def read(self) -> tuple[float, int, int]:
        """(loss sum, skipped, bad in a row) as Python numbers: the one wait for the device."""
        loss, skipped, bad = torch.stack([self.loss, self.skipped, self.bad_in_row]).tolist()
        return loss, int(skipped), int(bad)

    def reset(self) -> None:
        """Start a new window (the count of bad batches in a row goes on)."""
        self.loss.zero_()
        self.skipped.zero_()


def train_step(model: Transformer, batch: Batch, optimizer: torch.optim.Optimizer, scheduler,
               cfg: TrainConfig, totals: Totals, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None,
               forward: Callable | None = None) -> torch.Tensor:
    """Forward, backward and update on one batch; returns the loss per real target token
    (a tensor on the device: reading it makes the host wait).

    A non-finite loss or gradient skips the update (counted in totals.skipped), so
    that one bad batch cannot write inf or nan into the weights. The optimizer must
    be fused Adam (`make_optimizer`), which skips on the device. With fp16 the
    gradient scaler does the same, and also lowers its scale. forward(model, batch,
    label_smoothing) -> summed loss: batch_loss (default) or its compiled form.
    """
    model.train()
    device = batch.src.device
    with autocast(device, precision):
        if forward is None:
            loss = batch_loss(model, batch, cfg.label_smoothing, default_chunk(device))
        else:
            loss = forward(model, batch, cfg.label_smoothing)
        loss = loss / batch.n_tokens
    optimizer.zero_grad(set_to_none=True)
    max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        scaler.step(optimizer)  # skips on the device where the gradients are not finite
        scaler.update()
    else:
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        optimizer.found_inf = bad.float()  # fused Adam: no update where this is 1
        optimizer.step()
        del optimizer.found_inf
    scheduler.step()
    totals.loss += torch.where(bad, 0.0, loss.detach().float())
    totals.skipped += bad
    totals.bad_in_row.mul_(bad).add_(bad)  # +1 if bad, else back to 0
    return loss.detach()


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam as in section 5.3, fused: one kernel for every parameter, on the CPU and CUDA.

    Fused Adam is also what lets a non-finite step be skipped without a host wait
    (train_step). On the 2-core CPU a run with it gives the losses of the for-loop Adam it
    replaced, to four decimals, at the same speed (README, "What a run costs").
    """
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-9,
                            weight_decay=cfg.weight_decay, fused=True)


@torch.no_grad()
def validation_loss(model: Transformer, batches: BatchIterator, device: torch.device,
                    precision: str = "fp32") -> float:
    """Mean negative log-likelihood per target token, without label smoothing."""
    model.eval()
    total, n = torch.zeros((), device=device), 0
    for batch in batches.epoch():
        batch = batch.to(device)
        with autocast(device, precision):
            total += batch_loss(model, batch, 0.0, default_chunk(device))
        n += batch.n_tokens
    return total.item() / max(n, 1)
