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

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .batching import Batch, BatchIterator, Update
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


class Criterion(nn.Module):
    """The model and its loss as one module: forward(src, tgt_in, tgt_out, real) -> summed loss.

    This is what training calls, and what the tools that wrap a module wrap:
    DistributedDataParallel averages the gradients of what its module's forward
    computed, and torch.compile (train.compile) compiles it as one graph, from the
    embeddings to the loss.
    """

    def __init__(self, model: Transformer, label_smoothing: float, chunk: int = LOSS_CHUNK):
        super().__init__()
        self.model, self.label_smoothing, self.chunk = model, label_smoothing, chunk

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor,
                real: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden(src, tgt_in)  # (B, T, D)
        return loss_fn(hidden, tgt_out, self.model.generator, self.label_smoothing, self.chunk,
                       real)


COMPILE_BACKEND = "inductor"  # torch.compile's default: generated, fused kernels


def compile_criterion(criterion: nn.Module) -> nn.Module:
    """The criterion compiled by torch.compile (train.compile), for batches of few shapes.

    dynamic=False compiles one graph per batch shape, so the batches must come in few
    shapes (BatchIterator's bucket); the limit of graphs kept is raised to hold them all.
    The criterion should take the whole-batch loss (chunk=0), whose shapes are the batch's.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(criterion, backend=COMPILE_BACKEND, dynamic=False)


def default_chunk(device: torch.device) -> int:
    """Chunks of real tokens on the CPU (its cache); the whole batch on a GPU (fewer kernels)."""
    return LOSS_CHUNK if device.type == "cpu" else 0


@dataclass
class Totals:
    """Sums over a logging window, kept on the device and read once per log line."""

    loss: torch.Tensor  # summed per-token loss of the batches that updated
    skipped: torch.Tensor  # batches whose update was skipped (non-finite)
    bad_in_row: torch.Tensor  # non-finite batches in a row, up to now
    gnorm: torch.Tensor  # summed gradient norms before clipping, of the batches that updated

    @classmethod
    def zeros(cls, device: torch.device) -> Totals:
        return cls(*(torch.zeros((), device=device) for _ in range(4)))

    def read(self) -> tuple[float, int, int, float]:
        """(loss sum, skipped, bad in a row, gradient norm sum) as Python numbers: the one
        wait for the device."""
        loss, skipped, bad, gnorm = torch.stack(
            [self.loss, self.skipped, self.bad_in_row, self.gnorm]).tolist()
        return loss, int(skipped), int(bad), gnorm

    def reset(self) -> None:
        """Start a new window (the count of bad batches in a row goes on)."""
        self.loss.zero_()
        self.skipped.zero_()
        self.gnorm.zero_()


def train_step(model: Transformer, update: Update | Batch, optimizer: torch.optim.Optimizer,
               scheduler, cfg: TrainConfig, totals: Totals, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None,
               criterion: nn.Module | None = None) -> torch.Tensor:
    """Forward, backward and update on one update's micro-batches (or one batch); returns
    the loss per real target token (a tensor on the device: reading it makes the host wait).

    The gradients of the micro-batches are summed, each loss divided by the real tokens
    of the whole update, so that they are the gradients of one big batch. Under
    torchrun the criterion is wrapped in DistributedDataParallel, which averages the
    gradients over the processes during the last micro-batch's backward (the others run
    under `no_sync`); the loss is multiplied by the number of processes to make that
    average a sum.

    A non-finite loss or gradient skips the update (counted in totals.skipped), so
    that one bad batch cannot write inf or nan into the weights. The optimizer must
    be fused Adam (`make_optimizer`), which skips on the device. With fp16 the
    gradient scaler does the same, and also lowers its scale. The decision is the same
    in every process: it is made from the loss and gradient norm of the whole update.
    criterion: Criterion(model, ...) by default, or its wrapped or compiled form.
    """
    if isinstance(update, Batch):
        update = Update([update], update.n_tokens)
    device = update.batches[0].src.device
    if criterion is None:
        criterion = Criterion(model, cfg.label_smoothing, default_chunk(device))
    processes = dist.get_world_size() if dist.is_initialized() else 1
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(update.batches):
        inner = i < len(update.batches) - 1 and hasattr(criterion, "no_sync")
        with criterion.no_sync() if inner else contextlib.nullcontext():
            with autocast(device, precision):
                loss = criterion(batch.src, batch.tgt_in, batch.tgt_out, batch.real)
            scaled = loss * processes / update.n_tokens
            (scaled if scaler is None else scaler.scale(scaled)).backward()
        loss_sum += loss.detach().float()
    if processes > 1:
        dist.all_reduce(loss_sum)  # queued on the device, like the gradients' all-reduce
    loss = loss_sum / update.n_tokens
    max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        scaler.step(optimizer)  # skips on the device where the gradients are not finite
        scaler.update()
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        optimizer.found_inf = bad.float()  # fused Adam: no update where this is 1
        optimizer.step()
        del optimizer.found_inf
    scheduler.step()
    totals.loss += torch.where(bad, 0.0, loss)
    totals.gnorm += torch.where(bad, 0.0, grad_norm.float())  # before clipping, as fairseq's
    totals.skipped += bad
    totals.bad_in_row.mul_(bad).add_(bad)  # +1 if bad, else back to 0
    return loss


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam as in section 5.3, fused: one kernel for every parameter, on the CPU and CUDA.

    Fused Adam is also what lets a non-finite step be skipped without a host wait
    (train_step). On the CPU it gives the losses of the for-loop Adam it replaced
    (README, "On a GPU").
    """
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-9,
                            weight_decay=cfg.weight_decay, fused=True)


def inverse_sqrt_schedule(warmup_steps: int):
    """lr factor: linear warmup to 1, then 1 / sqrt(step), the schedule of section 5.3."""
    def factor(step: int) -> float:  # LambdaLR's step counts from 0
        step += 1
        if warmup_steps == 0:
            return 1.0
        return min(step / warmup_steps, math.sqrt(warmup_steps / step))
    return factor


def cosine_schedule(warmup_steps: int, max_steps: int):
    """lr factor: linear warmup to 1, then half a cosine down to 0 at max_steps.

    For a run of known length (Loshchilov and Hutter, 2017; nanoGPT's schedule): the
    learning rate is still large mid-run and small in the last updates, which settle.
    """
    def factor(step: int) -> float:
        step += 1
        if step < warmup_steps:
            return step / warmup_steps
        done = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return factor


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """The learning rate of each update: train.lr times the factor of train.schedule."""
    if cfg.schedule == "cosine":
        factor = cosine_schedule(cfg.warmup_steps, cfg.max_steps)
    else:
        factor = inverse_sqrt_schedule(cfg.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
