"""Decoding speed, measured side by side in one process.

1. Cached against uncached greedy decoding at batch size 1 for 50, 100 and 200
   generated tokens, with the multi30k model's sizes (random weights: speed does
   not depend on them).
2. With --ckpt: the time to translate a whole split with beam search, at the
   precision the checkpoint was trained at.
On a GPU when there is one (--device).

    python scripts/bench_decode.py [--device cpu] [--ckpt runs/x/average.pt --beam 5 ARGS...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from transformer.checkpoint import model_from_checkpoint
from transformer.config import load_config, with_overrides
from transformer.data import columns, load_corpus
from transformer.decode import encode_source, translate
from transformer.device import pick_device, resolve_precision, synchronize
from transformer.model import Transformer
from transformer.tokenizer import BOS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@torch.inference_mode()  # as greedy_decode
def steps(model: Transformer, src: torch.Tensor, n: int, use_cache: bool) -> float:
    """Seconds to generate n tokens (greedy_decode's steps, never stopping early)."""
    synchronize(src.device)
    start = time.perf_counter()
    memory, src_mask = encode_source(model, src)
    ys = torch.full((src.size(0), 1), BOS, dtype=torch.long, device=src.device)
    cache = model.new_cache() if use_cache else None
    for _ in range(n):
        inp = ys[:, -1:] if use_cache else ys
        logits = model.decode(inp, memory, src_mask, cache)[:, -1]
        ys = torch.cat([ys, logits.argmax(-1, keepdim=True)], dim=1)
    synchronize(src.device)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="50,100,200",
                   help="generated lengths to time, comma-separated (the bar is at 50)")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--ckpt", help="also time translating a split with this checkpoint")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", default="runs/bench_decode.json")
    p.add_argument("overrides", nargs="*", help="data.* overrides for --ckpt, e.g. data.path=...")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(os.path.join(ROOT, "configs", "multi30k.yaml"),
                      [f"data.path={ROOT}/tests/toy_corpus"])
    torch.manual_seed(0)
    device = pick_device(args.device)
    model = Transformer(cfg.model, 8000, 8000, share_embeddings=True).to(device).eval()
    src = torch.randint(4, 8000, (1, 20), device=device)
    steps(model, src, 50, True), steps(model, src, 50, False)  # warm up
    result = {"batch": 1, "threads": torch.get_num_threads(), "device": str(device),
              "lengths": []}
    # A cached step costs about the same at any length; an uncached step recomputes the
    # whole prefix, so its cost grows with the length and the speed-up with it.
    for n in [int(t) for t in args.tokens.split(",")]:
        cached, uncached = [], []
        for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
            cached.append(steps(model, src, n, True))
            uncached.append(steps(model, src, n, False))
        row = {"tokens": n, "cached_s": statistics.median(cached),
               "uncached_s": statistics.median(uncached)}
        row["speedup"] = row["uncached_s"] / row["cached_s"]
        result["lengths"].append(row)
        threads = f"{result['threads']} thread" + ("s" if result["threads"] > 1 else "")
        if device.type == "cuda":
            threads = torch.cuda.get_device_name(device)
        print(f"greedy, {n} tokens, batch 1, {threads}: "
              f"cached {row['cached_s'] * 1000:.1f} ms ({row['cached_s'] / n * 1000:.2f} ms a "
              f"token), uncached {row['uncached_s'] * 1000:.1f} ms, speed-up "
              f"{row['speedup']:.1f}x (median of {args.repeats})")

    if args.ckpt:
        model, tokenizer, ckpt_cfg, _ = model_from_checkpoint(args.ckpt)
        ckpt_cfg = with_overrides(ckpt_cfg, args.overrides, args.ckpt, sections=("data",))
        sentences = columns(load_corpus(ckpt_cfg.data)[args.split])[0]
        model.to(device)
        precision = resolve_precision(ckpt_cfg.train.precision, device, strict=False)
        translate(model, tokenizer, sentences[:64], ckpt_cfg.decode, device, args.beam,
                  precision)  # warm up (CUDA kernels load on first use)
        synchronize(device)
        start = time.perf_counter()
        translate(model, tokenizer, sentences, ckpt_cfg.decode, device, args.beam, precision)
        synchronize(device)
        seconds = time.perf_counter() - start
        result.update({"split": args.split, "sentences": len(sentences), "beam": args.beam,
                       "precision": precision, "translate_s": seconds})
        print(f"{args.ckpt}: {len(sentences)} sentences of {args.split}, beam {args.beam}, "
              f"{device} {precision}: "
              f"{seconds:.1f} s ({len(sentences) / seconds:.0f} sentences/s)")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
