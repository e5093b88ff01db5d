"""The benchmarks run end to end (tiny sizes; the figures are in docs/cpu-speed.md)."""

import importlib.util
import json
import os
import subprocess
import sys

import torch

from conftest import toy_pairs
from transformer.batching import BatchIterator
from transformer.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_decode_times_each_length(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "scripts/bench_decode.py", "--tokens", "2,4",
                          "--repeats", "1", "--threads", "1", "--device", "cpu",
                          "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["threads"] == 1
    assert [row["tokens"] for row in result["lengths"]] == [2, 4]
    assert all(row["cached_s"] > 0 and row["uncached_s"] > 0 for row in result["lengths"])
    assert "4 tokens, batch 1, 1 thread:" in run.stdout


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_times_ours_as_configured_and_like_for_like():
    bench = load_script("bench_train")
    batches = list(BatchIterator(*toy_pairs(40), 256, shuffle=True).epoch(1))
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.3, norm="pre",
                      max_positions=64)
    r = bench.throughput(cfg, 50, batches[:2], 1, torch.device("cpu"), "fp32")
    speeds = ("ours_tokens_per_s", "same_dropout_tokens_per_s", "reference_tokens_per_s")
    assert all(r[k] > 0 for k in speeds)
    assert r["ratio"] == r["same_dropout_tokens_per_s"] / r["reference_tokens_per_s"]
    assert r["configured_ratio"] == r["ours_tokens_per_s"] / r["reference_tokens_per_s"]
    assert r["flops_per_token"] > 0 and r["ours_step_ms"] > 0


def test_bench_profile_of_both_models_prints_a_table_for_each(capsys):
    bench = load_script("bench_train")
    batches = list(BatchIterator(*toy_pairs(60), 256, shuffle=True).epoch(1))
    assert bench.profile("default", 50, batches, torch.device("cpu"), "fp32", dropout=0.2,
                         reference=True) == 0
    out = capsys.readouterr().out
    assert "ours, nn.Transformer's dropout placement, default size, dropout 0.2" in out
    assert "nn.Transformer, default size, dropout 0.2" in out
    assert out.count("Self CPU time total") == 2
