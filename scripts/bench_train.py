"""Training speed, measured side by side in one process (make bench).

On the CPU, or on a GPU when there is one (--device), at train.precision's choice
(--precision; auto is bf16 on a GPU, fp32 on the CPU):
1. Training-step throughput (step time, target tokens/s, forward + backward + fused
   Adam step) of our model against a reference of identical size built on
   torch.nn.Transformer (same embeddings, vocabulary, batches, precision), for the
   default and multi30k sizes, ours also with the reference's dropout placement (the
   like-for-like ratio); on a GPU also the peak GPU memory.
2. Achieved FLOP/s of our step (counted by torch.utils.flop_counter) as a fraction of
   this device's matmul peak at the same precision, measured in the same run.
3. Batching on Multi30k: real over padded target tokens of our token-budget batches
   against batches of a fixed number of random sentences, and the epoch time of both.
4. Peak resident memory of `transformer-train` on the default config (a short run).

    python scripts/bench_train.py [--quick] [--device cuda] [--precision bf16]
    python scripts/bench_train.py --profile multi30k   # where a training step's time goes
    python scripts/bench_train.py --profile default --reference --dropout 0.1   # and the reference
    python scripts/bench_train.py --loss multi30k      # the loss: whole batch against chunks
    python scripts/bench_train.py --additive           # the two score functions' step time
    python scripts/bench_train.py --keep-memory        # training steps with freed memory kept
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from transformer.batching import COMPILE_BUCKET, BatchIterator, collate
from transformer.config import ModelConfig, TrainConfig, load_config
from transformer.data import columns, load_corpus
from transformer.device import (
    DTYPES,
    keep_freed_memory,
    pick_device,
    resolve_precision,
    synchronize,
)
from transformer.layers import PositionalEncoding
from transformer.model import Transformer
from transformer.step import LOSS_CHUNK, Totals, loss_fn, make_optimizer, train_step
from transformer.tokenizer import PAD, load_or_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI30K = os.path.join(os.path.dirname(ROOT), "shared", "multi30k")


class Reference(nn.Module):
    """The same model on torch.nn.Transformer: shared embeddings, sinusoids, tied output."""

    def __init__(self, cfg: ModelConfig, vocab: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, cfg.d_model, padding_idx=PAD)
        self.pe = PositionalEncoding(cfg.d_model, cfg.max_positions)
        self.drop = nn.Dropout(cfg.dropout)
        with warnings.catch_warnings():  # pre-LN: "enable_nested_tensor is True, but ..."
            warnings.filterwarnings("ignore", message="enable_nested_tensor")
            self.core = nn.Transformer(cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.n_layers,
                                       cfg.d_ff, cfg.dropout, batch_first=True,
                                       norm_first=cfg.norm == "pre")
        self.scale = math.sqrt(cfg.d_model)

    def embed(self, ids):
        return self.drop(self.emb(ids) * self.scale + self.pe(ids.size(1)))

    def hidden(self, src, tgt):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), device=tgt.device,
                                                                dtype=torch.bool)
        return self.core(self.embed(src), self.embed(tgt), tgt_mask=causal,
                         src_key_padding_mask=src == PAD, tgt_key_padding_mask=tgt == PAD,
                         memory_key_padding_mask=src == PAD, tgt_is_causal=True)

    def generator(self, hidden):
        return F.linear(hidden, self.emb.weight)


def size_config(name: str, dropout: float | None = None) -> ModelConfig:
    """The model section of configs/<name>.yaml, with one dropout rate if given."""
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"),
                      [f"data.path={MULTI30K}"] if name == "multi30k" else []).model
    return cfg if dropout is None else dataclasses.replace(cfg, dropout=dropout)


def with_reference_dropout(cfg: ModelConfig) -> ModelConfig:
    """cfg with nn.Transformer's dropout placement: its one rate on the attention weights
    and inside the feed-forward layer too (the like-for-like model)."""
    return dataclasses.replace(cfg, attn_dropout=cfg.dropout, ff_dropout=cfg.dropout)


def step_fn(model, device: torch.device, precision: str):
    """One training step, the project's own `train_step` (loss, clipping, fused Adam,
    precision), for either model: both have `hidden` and `generator`."""
    cfg = TrainConfig(lr=1e-4)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    totals = Totals.zeros(device)
    return lambda batch: train_step(model, batch, optimizer, scheduler, cfg, totals, precision,
                                    scaler)


def matmul_peak(device: torch.device, precision: str, repeats: int = 10) -> float:
    """FLOP/s of a large square matrix multiply at the step's precision, on this device."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = DTYPES[precision]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def timed(step, batches: list, device: torch.device) -> float:
    """Seconds for step over the batches, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    for b in batches:
        step(b)
    synchronize(device)
    return time.perf_counter() - start


def throughput(cfg: ModelConfig, vocab: int, batches: list, rounds: int, device: torch.device,
               precision: str) -> dict:
    """Ours and the reference on the same batches, interleaved round by round.

    nn.Transformer applies its one dropout on the attention weights and inside the
    feed-forward layer too; ours, as the configs have it, only on the sublayers' outputs
    and the embeddings. So ours is timed twice: as configured, and with the reference's
    dropout placement ("same dropout"), which is the like-for-like ratio.
    """
    torch.manual_seed(0)
    ours = Transformer(cfg, vocab, vocab, share_embeddings=True).to(device).train()
    ours_same = Transformer(with_reference_dropout(cfg), vocab, vocab,
                            share_embeddings=True).to(device).train()
    ref = Reference(cfg, vocab).to(device).train()
    steps = {"ours": step_fn(ours, device, precision),
             "same_dropout": step_fn(ours_same, device, precision),
             "reference": step_fn(ref, device, precision)}
    tokens = sum(b.n_tokens for b in batches)
    for step in steps.values():  # warm up
        step(batches[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds[name].append(timed(step, batches, device))
    with FlopCounterMode(display=False) as counter:
        steps["ours"](batches[0])
    flops_per_token = counter.get_total_flops() / batches[0].n_tokens
    out = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    result = {"ours_tokens_per_s": out["ours"], "reference_tokens_per_s": out["reference"],
              "same_dropout_tokens_per_s": out["same_dropout"],
              "ratio": out["same_dropout"] / out["reference"],
              "configured_ratio": out["ours"] / out["reference"],
              "ours_step_ms": 1000 * statistics.median(seconds["ours"]) / len(batches),
              "params": ours.num_parameters(), "flops_per_token": flops_per_token,
              "achieved_flops": flops_per_token * out["ours"]}
    if device.type == "cuda":  # both models' peak, the larger of the two
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


ADDITIVE_SIZE = dict(d_model=128, n_heads=4, n_layers=3, d_ff=512, dropout=0.1)
SCORE_VARIANTS = {"dot product": "scaled_dot", "additive": "additive",
                  "additive, formula": "additive"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def step_memory(variant: str, batch, vocab: int) -> float:
    """MB that the first training step of a score variant adds to this process at its peak
    (the high-water mark is reset first: /proc/self/clear_refs; Adam's moments, 15 MB, are
    made in it too); run in a fresh process for each."""
    import transformer.attention as attention

    if variant == "additive, formula":
        attention.additive_scores = attention.additive_scores_reference
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**ADDITIVE_SIZE, attention=SCORE_VARIANTS[variant]),
                        vocab, vocab, share_embeddings=True).train()
    step = step_fn(model, torch.device("cpu"), "fp32")
    before = _status_kb("VmRSS")  # the first step: nothing cached by the allocator yet
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    step(batch)
    return (_status_kb("VmHWM") - before) / 1024


def additive_speed(vocab: int, batches: list, rounds: int, device: torch.device,
                   precision: str) -> dict:
    """Training step time of the two score functions at the sweep's size (d_model 128, 4
    heads): the dot product, the additive score (`AdditiveScores`), and the additive
    score as the formula reads (`additive_scores_reference`, every (query, key) sum at
    once, which the model used before), interleaved round by round on the same batches."""
    import transformer.attention as attention

    formula, chunked = attention.additive_scores_reference, attention.additive_scores
    steps, seconds = {}, {name: [] for name in SCORE_VARIANTS}
    for name, score in SCORE_VARIANTS.items():
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**ADDITIVE_SIZE, attention=score), vocab, vocab,
                            share_embeddings=True).to(device).train()
        steps[name] = step_fn(model, device, precision)
    for _ in range(rounds + 1):  # the first round warms up
        for name, step in steps.items():
            attention.additive_scores = formula if name == "additive, formula" else chunked
            try:
                seconds[name].append(timed(step, batches, device))
            finally:
                attention.additive_scores = chunked
    return {name: 1000 * statistics.median(s[1:]) / len(batches) for name, s in seconds.items()}


def random_batches(src, tgt, sentences: int, seed: int = 0):
    order = list(range(len(src)))
    random.Random(seed).shuffle(order)
    for i in range(0, len(order), sentences):
        idx = order[i:i + sentences]
        yield collate([src[j] for j in idx], [tgt[j] for j in idx])


def epoch_time(cfg: ModelConfig, vocab: int, batches, device: torch.device,
               precision: str) -> tuple[float, float]:
    """Seconds for one epoch over batches, and the share of it spent making batches."""
    torch.manual_seed(0)
    model = Transformer(cfg, vocab, vocab, share_embeddings=True).to(device).train()
    step = step_fn(model, device, precision)
    start, batching = time.perf_counter(), 0.0
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        batching += time.perf_counter() - t0
        if batch is None:
            break
        step(batch.to(device))
    synchronize(device)
    total = time.perf_counter() - start
    return total, batching / total


def peak_memory_of_train() -> float:
    """Peak RSS (MB) of transformer-train on the default config, 60 steps.

    The child reports its own high-water mark (VmHWM): the rusage of a child counts the
    pages it shared with this large process before exec, which is not its own memory.
    """
    code = ("import sys\n"
            "from transformer.cli import train_main\n"
            "rc = train_main(sys.argv[1:])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
            "print('PEAK_KB', hwm[0].split()[1] if hwm else -1)\n"
            "sys.exit(rc)\n")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as runs:  # a new run each time
        r = subprocess.run([sys.executable, "-c", code, "--config",
                            os.path.join(ROOT, "configs", "default.yaml"), "train.max_steps=60",
                            "train.eval_every=60", "train.eval_bleu_sentences=50",
                            f"train.runs_dir={runs}", "train.name=memory"],
                           cwd=ROOT, check=True, capture_output=True, text=True)
    kb = int(r.stdout.split("PEAK_KB")[-1].split()[0])
    if kb < 0:  # no /proc: fall back to rusage, an upper bound
        kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kb / 1024


def profile(name: str, vocab: int, batches: list, device: torch.device, precision: str,
            dropout: float | None = None, reference: bool = False) -> int:
    """torch.profiler's table of three training steps, operators by their own time on the
    device (CPU or GPU); with reference, a table for ours with nn.Transformer's dropout
    placement and one for nn.Transformer, the two models of the like-for-like ratio."""
    from torch.profiler import profile as torch_profile

    cfg = size_config(name, dropout)
    if reference:
        models = {"ours, nn.Transformer's dropout placement":
                  Transformer(with_reference_dropout(cfg), vocab, vocab, share_embeddings=True),
                  "nn.Transformer": Reference(cfg, vocab)}
    else:
        models = {"ours": Transformer(cfg, vocab, vocab, share_embeddings=True)}
    batches = [b.to(device) for b in batches[:5]]
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for title, model in models.items():
        step = step_fn(model.to(device).train(), device, precision)
        for b in batches[:2]:
            step(b)
        synchronize(device)
        with torch_profile() as prof:
            for b in batches[2:5]:
                step(b)
            synchronize(device)
        print(f"{title}, {name} size, dropout {cfg.dropout}, three steps:")
        print(prof.key_averages().table(sort_by=key, row_limit=15))
    return 0


def loss_speed(name: str, vocab: int, batches: list, rounds: int = 5) -> int:
    """The output projection and loss of a batch, forward and backward: the logits of the
    whole batch at once against train.loss_fn's chunks of real tokens, interleaved."""
    cfg = size_config(name)
    model = Transformer(cfg, vocab, vocab, share_embeddings=True).train()
    torch.manual_seed(0)
    work = [(torch.randn(*b.tgt_out.shape, cfg.d_model, requires_grad=True), b.tgt_out)
            for b in batches]  # decoder outputs of the right shape

    def whole(hidden, target):
        logits = model.generator(hidden)  # (B, T, V) at once
        return F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=PAD,
                               label_smoothing=0.1, reduction="sum")

    def chunked(hidden, target):
        return loss_fn(hidden, target, model.generator, 0.1)

    seconds = {"whole": [], "chunked": []}
    for r in range(rounds + 1):  # the first round warms up
        for name_, fn in (("whole", whole), ("chunked", chunked)):
            start = time.perf_counter()
            for hidden, target in work:
                fn(hidden, target).backward()
                hidden.grad = model.generator.weight.grad = None
            if r:
                seconds[name_].append((time.perf_counter() - start) / len(work))
    whole_s, chunked_s = (statistics.median(seconds[k]) for k in ("whole", "chunked"))
    print(f"{name}: output projection + loss, forward and backward, a batch of "
          f"{sum(b.n_tokens for b in batches) // len(batches)} target tokens, {vocab} words: "
          f"whole batch {whole_s * 1000:.0f} ms, chunks of {LOSS_CHUNK} real tokens "
          f"{chunked_s * 1000:.0f} ms ({whole_s / chunked_s:.2f}x)")
    return 0


def kept_memory_steps(how: str, vocab: int, batches: list) -> None:
    """In this fresh process, training steps of the multi30k model with freed memory given
    back to the kernel as glibc does by default (plain) or kept (keep_freed_memory, as
    transformer-train does); prints ms a step, page faults and the kernel's seconds."""
    if how == "keep":
        keep_freed_memory()
    torch.manual_seed(0)
    model = Transformer(size_config("multi30k"), vocab, vocab, share_embeddings=True).train()
    step = step_fn(model, torch.device("cpu"), "fp32")
    for b in batches[:4]:
        step(b)
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = timed(step, batches[4:], torch.device("cpu"))
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"step_ms": 1000 * seconds / len(batches[4:]),
                      "page_faults": after.ru_minflt - before.ru_minflt,
                      "system_s": after.ru_stime - before.ru_stime}))


def kept_memory(rounds: int = 2) -> int:
    """Training steps with and without keep_freed_memory, each in a fresh process,
    alternated: the cost of page faults in a step."""
    print("multi30k model, 12 training steps of 8,192-token Multi30k batches, "
          f"{torch.get_num_threads()} threads, each run a fresh process:")
    print(f"{'freed memory':14} {'step ms':>8} {'page faults':>12} {'kernel s':>9}")
    ms = {"plain": [], "keep": []}
    for _ in range(rounds):
        for how in ("plain", "keep"):
            r = subprocess.run([sys.executable, __file__, "--kept-memory-steps", how], cwd=ROOT,
                               check=True, capture_output=True, text=True)
            row = json.loads(r.stdout.splitlines()[-1])
            ms[how].append(row["step_ms"])
            print(f"{'kept' if how == 'keep' else 'given back':14} {row['step_ms']:8.0f} "
                  f"{row['page_faults']:12,} {row['system_s']:9.2f}")
    print(f"kept: {statistics.median(ms['plain']) / statistics.median(ms['keep']):.2f}x "
          "as fast (medians)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer batches and rounds")
    p.add_argument("--json", default="runs/bench_train.json")
    p.add_argument("--skip-epochs", action="store_true", help="skip the two epoch timings")
    p.add_argument("--dropout", type=float, default=None,
                   help="the dropout rate of both sizes in the throughput table (default: "
                        "each config's)")
    p.add_argument("--profile", choices=["default", "multi30k"],
                   help="only profile one training step of this model size and print where "
                        "the time goes")
    p.add_argument("--reference", action="store_true",
                   help="with --profile: profile ours with nn.Transformer's dropout placement "
                        "and nn.Transformer, one after the other")
    p.add_argument("--loss", choices=["default", "multi30k"],
                   help="only time the output projection and loss, whole batch against chunks")
    p.add_argument("--additive", action="store_true",
                   help="only time a training step with the dot product, the additive score, "
                        "and the additive score as the formula reads")
    p.add_argument("--step-memory", choices=list(SCORE_VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--keep-memory", action="store_true",
                   help="only time training steps with freed memory kept and given back")
    p.add_argument("--kept-memory-steps", choices=["plain", "keep"], help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="as train.precision (auto: bf16 on a GPU that has it, else fp32)")
    args = p.parse_args()
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout: expected a value in [0, 1), got {args.dropout}")
    if args.reference and not args.profile:
        p.error("--reference: only with --profile default or --profile multi30k")
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "precision": precision, "dropout": args.dropout}  # None: each config's

    if args.additive:  # the sweep's point: the default config (the Bible) at d_model 128
        from transformer.batching import prepare

        data = prepare(load_config(os.path.join(ROOT, "configs", "default.yaml")))
        batches = [b.to(device) for b in list(data.train.epoch(1))[:4]]
        ms = additive_speed(data.tokenizer.src_vocab, batches, 2 if args.quick else 3, device,
                            precision)
        print(f"training step, d_model 128, 4 heads, {len(batches)} batches of the default "
              f"config (the Bible, {data.train.batch_tokens:,} tokens a batch):")
        for name, t in ms.items():
            print(f"  {name:18} {t:7.0f} ms  ({t / ms['dot product']:.1f}x the dot product)")
        print(f"the additive score: {ms['additive, formula'] / ms['additive']:.1f}x faster than "
              "the formula")
        if device.type == "cpu" and os.path.exists("/proc/self/clear_refs"):
            print("memory one training step adds at its peak, on the first batch "
                  f"({tuple(batches[0].src.shape)} source), each in a fresh process:")
            for name in SCORE_VARIANTS:
                r = subprocess.run([sys.executable, __file__, "--step-memory", name],
                                   cwd=ROOT, check=True, capture_output=True, text=True)
                print(f"  {name:18} {float(r.stdout.split()[-1]):7.0f} MB")
        return 0
    if args.step_memory:  # one variant, in this fresh process (see step_memory)
        from transformer.batching import prepare

        data = prepare(load_config(os.path.join(ROOT, "configs", "default.yaml")))
        first = next(data.train.epoch(1))
        print(f"{step_memory(args.step_memory, first, data.tokenizer.src_vocab):.1f}")
        return 0

    data_cfg = load_config(os.path.join(ROOT, "configs", "multi30k.yaml"),
                           [f"data.path={MULTI30K}"]).data
    corpus = load_corpus(data_cfg)
    src_text, tgt_text = columns(corpus["train"])
    tok = load_or_train(data_cfg, src_text, tgt_text)
    src, tgt = tok.encode_src(src_text), tok.encode_tgt(tgt_text)
    vocab = tok.src_vocab

    if args.kept_memory_steps:  # one run of kept_memory, in this fresh process
        kept_memory_steps(args.kept_memory_steps, vocab,
                          list(BatchIterator(src, tgt, 8192, True).epoch(1))[:16])
        return 0
    if args.keep_memory:
        return kept_memory()
    keep_freed_memory()  # as transformer-train does

    if args.profile:
        return profile(args.profile, vocab, list(BatchIterator(src, tgt, 4096, True).epoch(1)),
                       device, precision, args.dropout, args.reference)
    if args.loss:
        return loss_speed(args.loss, vocab, list(BatchIterator(src, tgt, 4096, True).epoch(1))[:8])

    peak = matmul_peak(device, precision)
    result["matmul_peak_flops"] = peak
    where = result["device"] if device.type == "cuda" else f"{result['threads']} threads"
    print(f"{precision} matmul peak: {peak / 1e9:.0f} GFLOP/s ({where})")

    ours_batches = BatchIterator(src, tgt, 4096, shuffle=True, seed=0)
    sample = [b.to(device) for b in list(ours_batches.epoch(1))[: 4 if args.quick else 12]]
    gpu = device.type == "cuda"
    print("\ntarget tokens/s: ours as configured, ours with nn.Transformer's dropout placement "
          "(same dropout), nn.Transformer;\nratio: same dropout / nn.Transformer (like for "
          "like), then ours as configured / nn.Transformer")
    print(f"{'model':10} {'params':>8} {'step ms':>8} {'ours tok/s':>11} {'same dropout':>13} "
          f"{'nn.Transformer':>15} {'ratio':>6} {'config':>6} {'GFLOP/s':>8} {'of peak':>8}"
          + (f" {'peak GB':>8}" if gpu else ""))
    for name in ("default", "multi30k"):
        r = throughput(size_config(name, args.dropout), vocab, sample, 2 if args.quick else 3,
                       device, precision)
        r["fraction_of_peak"] = r["achieved_flops"] / peak
        result[name] = r
        print(f"{name:10} {r['params'] / 1e6:7.2f}M {r['ours_step_ms']:8.1f} "
              f"{r['ours_tokens_per_s']:11.0f} {r['same_dropout_tokens_per_s']:13.0f} "
              f"{r['reference_tokens_per_s']:15.0f} {r['ratio']:6.2f} {r['configured_ratio']:6.2f} "
              f"{r['achieved_flops'] / 1e9:8.1f} {r['fraction_of_peak']:8.0%}"
              + (f" {r['peak_gpu_memory_gb']:8.2f}" if gpu else ""))

    def efficiency(batches):
        real = padded = 0
        for b in batches:
            real += b.n_tokens
            padded += b.tgt_out.numel()
        return real / padded

    ours_eff = efficiency(ours_batches.epoch(1))
    random_eff = efficiency(random_batches(src, tgt, 128))
    # train.compile pads each batch to one of a few shapes: what that costs in padding.
    compiled = BatchIterator(src, tgt, 4096, shuffle=True, seed=0, bucket=COMPILE_BUCKET)
    compiled_eff = efficiency(compiled.epoch(1))
    shapes = {tuple(b.tgt_out.shape) for b in compiled.epoch(1)}
    result["batching"] = {"ours_real_over_padded": ours_eff,
                          "random_128_real_over_padded": random_eff,
                          "compile_real_over_padded": compiled_eff,
                          "compile_shapes": len(shapes),
                          "batches_per_epoch": len(ours_batches),
                          "compile_batches_per_epoch": len(compiled)}
    print(f"\nMulti30k target tokens that are real: token-budget length-bucketed batches "
          f"{ours_eff:.1%} ({len(ours_batches)} an epoch), 128 random sentences a batch "
          f"{random_eff:.1%}, padded to few shapes for train.compile {compiled_eff:.1%} "
          f"({len(compiled)} an epoch, {len(shapes)} shapes)")
    if not args.skip_epochs:
        cfg = size_config("multi30k")
        ours_s, ours_share = epoch_time(cfg, vocab, ours_batches.epoch(1), device, precision)
        rand_s, rand_share = epoch_time(cfg, vocab, random_batches(src, tgt, 128), device,
                                        precision)
        result["batching"].update({"ours_epoch_s": ours_s, "random_epoch_s": rand_s,
                                   "ours_batching_share": ours_share})
        print(f"Multi30k epoch, multi30k model: ours {ours_s:.0f} s (making batches "
              f"{ours_share:.1%} of it), random batches {rand_s:.0f} s")

    result["train_peak_rss_mb"] = peak_memory_of_train()
    print(f"\npeak resident memory of transformer-train (default config, 60 steps): "
          f"{result['train_peak_rss_mb']:.0f} MB")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
