"""Training: one step, evaluation, and the loop with its budgets and checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .batching import Batch, BatchIterator
from .checkpoint import average_checkpoints, build, save_checkpoint, step_checkpoints
from .config import Config, TrainConfig, save_config, to_dict
from .data import columns, load_corpus
from .decode import translate
from .evaluate import score
from .model import Transformer
from .tokenizer import PAD, Tokenizer, load_or_train

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that cannot start (an unwritable run folder, ...); one line for the user."""


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def inverse_sqrt_schedule(warmup_steps: int):
    """lr factor: linear warmup to 1, then 1 / sqrt(step), the schedule of section 5.3."""
    def factor(step: int) -> float:  # LambdaLR's step counts from 0
        step += 1
        if warmup_steps == 0:
            return 1.0
        return min(step / warmup_steps, math.sqrt(warmup_steps / step))
    return factor


def loss_fn(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Summed cross-entropy over real tokens: logits (B, T, V), target (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=PAD, label_smoothing=label_smoothing, reduction="sum")


def train_step(model: Transformer, batch: Batch, optimizer: torch.optim.Optimizer,
               scheduler, cfg: TrainConfig) -> dict:
    """Forward, backward and update on one batch; the loss is per real target token."""
    model.train()
    n_tokens = batch.n_tokens
    logits = model(batch.src, batch.tgt_in)  # (B, T, V)
    loss = loss_fn(logits, batch.tgt_out, cfg.label_smoothing) / n_tokens
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    optimizer.step()
    scheduler.step()
    return {"loss": loss.item(), "tokens": n_tokens}


@torch.no_grad()
def validation_loss(model: Transformer, batches: BatchIterator, device) -> float:
    """Mean negative log-likelihood per target token, without label smoothing."""
    model.eval()
    total, n = 0.0, 0
    for batch in batches.epoch():
        batch = batch.to(device)
        total += loss_fn(model(batch.src, batch.tgt_in), batch.tgt_out, 0.0).item()
        n += batch.n_tokens
    return total / max(n, 1)


@dataclass
class Prepared:
    """What a run needs from the data: tokenizer, batches and validation text."""

    tokenizer: Tokenizer
    train: BatchIterator
    valid: BatchIterator
    valid_src: list[str]
    valid_ref: list[str]


def prepare(cfg: Config) -> Prepared:
    """Load the corpus, train or load the tokenizer, encode and batch."""
    corpus = load_corpus(cfg.data)
    train_src, train_tgt = columns(corpus["train"])
    tokenizer = load_or_train(cfg.data, train_src, train_tgt)
    src_ids, tgt_ids = tokenizer.encode_src(train_src), tokenizer.encode_tgt(train_tgt)
    limit = cfg.model.max_positions
    if cfg.data.max_tokens:
        limit = min(limit, cfg.data.max_tokens)
    keep = [i for i in range(len(src_ids)) if len(src_ids[i]) <= limit and len(tgt_ids[i]) <= limit]
    if not keep:
        raise RunError(f"data.max_tokens={cfg.data.max_tokens} removes every training pair")
    if len(keep) < len(src_ids):
        log.info("length filter (%d tokens): kept %d of %d training pairs",
                 limit, len(keep), len(src_ids))
    train = BatchIterator([src_ids[i] for i in keep], [tgt_ids[i] for i in keep],
                          cfg.train.batch_tokens, shuffle=True, seed=cfg.train.seed)
    valid_src, valid_ref = columns(corpus["valid"])
    v_src = [s[:limit] for s in tokenizer.encode_src(valid_src)]
    v_tgt = [t[:limit] for t in tokenizer.encode_tgt(valid_ref)]
    valid = BatchIterator(v_src, v_tgt, cfg.train.batch_tokens, shuffle=False)
    return Prepared(tokenizer, train, valid, valid_src, valid_ref)


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


def train(cfg: Config) -> str:
    """Train a model as the config says; returns the run folder."""
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    run_dir = make_run_dir(cfg)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    data = prepare(cfg)
    data.tokenizer.save(run_dir)

    model = build(cfg, data.tokenizer).to(device)
    t = cfg.train
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=t.betas, eps=1e-9,
                                 weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt_schedule(t.warmup_steps))
    log.info("run folder %s | device %s | %d threads | %s parameters | %d training pairs, "
             "%d batches an epoch", run_dir, device, torch.get_num_threads(),
             f"{model.num_parameters():,}", len(data.train.src), len(data.train))

    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    best_bleu = -1.0
    evals_since_best = 0
    step, epoch = 0, 0
    start = time.time()
    window_tokens, window_loss, window_steps, window_start = 0, 0.0, 0, time.time()

    def write_metrics(record: dict) -> None:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint_state() -> dict:
        return {
            "name": cfg.name, "config": to_dict(cfg), "tokenizer": data.tokenizer.to_dict(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
            "best_bleu": best_bleu,
        }

    def evaluate_and_save() -> None:
        nonlocal best_bleu, evals_since_best
        n = t.eval_bleu_sentences or len(data.valid_src)
        valid_loss = validation_loss(model, data.valid, device)
        hyps = translate(model, data.tokenizer, data.valid_src[:n], cfg.decode, device, beam=1)
        bleu = score(hyps, data.valid_ref[:n]).bleu
        record = {"step": step, "epoch": epoch, "valid_loss": round(valid_loss, 4),
                  "valid_ppl": round(math.exp(min(valid_loss, 50)), 2),
                  "valid_bleu": round(bleu, 2), "minutes": round((time.time() - start) / 60, 2)}
        write_metrics(record)
        log.info("eval step %d | valid loss %.3f | ppl %.2f | BLEU %.2f | e.g. %r", step,
                 valid_loss, record["valid_ppl"], bleu, hyps[0][:80] if hyps else "")
        evals_since_best += 1
        if bleu > best_bleu:
            best_bleu, evals_since_best = bleu, 0
            save_checkpoint(os.path.join(run_dir, "best.pt"), checkpoint_state())
        save_checkpoint(os.path.join(run_dir, "last.pt"), checkpoint_state())
        if t.keep_checkpoints:
            weights_only = {k: v for k, v in checkpoint_state().items()
                            if k not in ("optimizer", "scheduler")}
            save_checkpoint(os.path.join(run_dir, f"step-{step:06d}.pt"), weights_only)
            for old in step_checkpoints(run_dir)[:-t.keep_checkpoints]:
                os.unlink(old)

    def out_of_budget() -> str | None:
        if t.max_steps and step >= t.max_steps:
            return f"train.max_steps={t.max_steps}"
        if t.max_minutes and time.time() - start >= 60 * t.max_minutes:
            return f"train.max_minutes={t.max_minutes}"
        if t.patience and evals_since_best >= t.patience:
            return f"train.patience={t.patience} (no better validation BLEU)"
        return None

    progress = tqdm(total=t.max_steps or None, unit="step", dynamic_ncols=True, disable=None)
    stop_reason, last_eval = None, -1
    while stop_reason is None:
        epoch += 1
        for batch in data.train.epoch(epoch):
            m = train_step(model, batch.to(device), optimizer, scheduler, t)
            step += 1
            window_tokens += m["tokens"]
            window_loss += m["loss"]
            window_steps += 1
            progress.update(1)
            if step % t.log_every == 0:
                elapsed = time.time() - window_start
                record = {"step": step, "epoch": epoch,
                          "loss": round(window_loss / window_steps, 4),
                          "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": round(window_tokens / max(elapsed, 1e-9))}
                write_metrics(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                     tok_s=record["tokens_per_s"])
                log.info("step %d | epoch %d | loss %.3f | lr %.2e | %d tokens/s", step, epoch,
                         record["loss"], record["lr"], record["tokens_per_s"])
                window_tokens, window_loss, window_steps, window_start = 0, 0.0, 0, time.time()
            if step % t.eval_every == 0:
                evaluate_and_save()
                last_eval = step
                # Keep evaluation time out of the next tokens/s figure.
                window_tokens, window_loss, window_steps, window_start = 0, 0.0, 0, time.time()
            stop_reason = out_of_budget()
            if stop_reason:
                break
        if stop_reason is None and epoch >= t.max_epochs:
            stop_reason = f"train.max_epochs={t.max_epochs}"
    progress.close()
    if last_eval != step:
        evaluate_and_save()
    if t.average_at_end and t.keep_checkpoints:
        paths = step_checkpoints(run_dir)
        averaged = average_checkpoints(paths)
        save_checkpoint(os.path.join(run_dir, "average.pt"), averaged)
        model.load_state_dict(averaged["model"])
        n = t.eval_bleu_sentences or len(data.valid_src)
        hyps = translate(model, data.tokenizer, data.valid_src[:n], cfg.decode, device, beam=1)
        bleu = score(hyps, data.valid_ref[:n]).bleu
        write_metrics({"step": step, "average_of": len(paths), "valid_bleu": round(bleu, 2)})
        log.info("average of the last %d checkpoints: valid BLEU %.2f -> %s", len(paths), bleu,
                 os.path.join(run_dir, "average.pt"))
    minutes = (time.time() - start) / 60
    log.info("stopped by %s after %d steps, %d epochs, %.1f minutes; best valid BLEU %.2f",
             stop_reason, step, epoch, minutes, best_bleu)
    log.info("checkpoints: %s and %s", os.path.join(run_dir, "best.pt"),
             os.path.join(run_dir, "last.pt"))
    return run_dir
