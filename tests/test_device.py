"""Devices and precisions: what runs where, what stays float32, and CUDA when present."""

import json
import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import TINY_CONFIG, tiny_model
from transformer import device
from transformer.batching import pad
from transformer.checkpoint import load_checkpoint
from transformer.config import load_config
from transformer.decode import beam_search, greedy_decode
from transformer.device import DeviceError, resolve_precision
from transformer.train import train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _run(tmp_path, name, *overrides):
    cfg = load_config(TINY_CONFIG, [f"train.runs_dir={tmp_path}", f"train.name={name}",
                                    f"data.data_dir={tmp_path}/data", "train.log_every=10",
                                    "train.eval_every=1000", "train.keep_checkpoints=0",
                                    *overrides])
    run = train(cfg)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    return run, losses


def test_auto_precision_is_fp32_on_the_cpu_and_fp16_needs_a_gpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(DeviceError, match="train.precision: fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    assert resolve_precision("fp16", cpu, strict=False) == "fp32"  # translating elsewhere


def test_the_cpu_says_whether_it_has_bf16_kernels():
    assert isinstance(device.cpu_has_bf16_kernels(), bool)


@pytest.mark.parametrize("kernels", [True, False])
def test_bf16_on_a_cpu_that_only_emulates_it_warns_and_translates_at_fp32(
        monkeypatch, caplog, kernels):
    monkeypatch.setattr(device, "cpu_has_bf16_kernels", lambda: kernels)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="transformer.device"):
        assert resolve_precision("bf16", cpu) == "bf16"  # training: as asked
        assert resolve_precision("auto", cpu) == "fp32"
    warnings = [r.getMessage() for r in caplog.records]
    if kernels:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith(
            "train.precision: bf16 is emulated on this CPU")
    assert resolve_precision("bf16", cpu, strict=False) == ("bf16" if kernels else "fp32")


PAGE_FAULTS = """
import resource, sys, torch
from transformer.device import keep_freed_memory
from transformer.step import loss_fn

if sys.argv[1] == "keep":
    keep_freed_memory()
torch.manual_seed(0)
generator = torch.nn.Linear(128, 8000, bias=False)  # a vocabulary of 8,000: 16 MB logits
hidden = torch.randn(4, 512, 128, requires_grad=True)
target = torch.randint(4, 8000, (4, 512))

def step():
    loss_fn(hidden, target, generator, 0.1).backward()
    hidden.grad = generator.weight.grad = None

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_kept_memory_spares_the_page_faults_of_a_loss_step():
    # The output projection and loss, forward and backward, 10 times: glibc gives each
    # large freed tensor back to the kernel, and faults fresh pages in for the next
    # (130,000 to 260,000 faults here); kept, the next step reuses them (0 to 24,000).
    # Now and then a plain process lands on a heap layout that glibc does not trim (once
    # 8,000 faults), so each way is the median of three processes.
    def faults(how: str) -> int:
        return int(subprocess.run([sys.executable, "-c", PAGE_FAULTS, how], check=True,
                                  capture_output=True, text=True).stdout)

    median = {how: sorted(faults(how) for _ in range(3))[1] for how in ("plain", "keep")}
    assert median["keep"] < median["plain"] / 4, median


def test_bf16_training_keeps_float32_weights_and_follows_the_fp32_losses(tmp_path):
    common = ["train.device=cpu", "train.max_steps=60", "model.dropout=0.0"]
    run32, fp32 = _run(tmp_path, "fp32", "train.precision=fp32", *common)
    run16, bf16 = _run(tmp_path, "bf16", "train.precision=bf16", *common)
    assert len(fp32) == len(bf16) == 6
    assert bf16[-1] < bf16[0] * 0.8  # it learns
    for a, b in zip(fp32, bf16):  # bf16 keeps 8 bits of mantissa: close, not equal
        assert abs(a - b) < 0.05 * a
    state = load_checkpoint(os.path.join(run16, "last.pt"))
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    moments = state["optimizer"]["state"][0]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.float32


def _sources(n=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 23, (int(torch.randint(2, 9, (1,), generator=g)),),
                          generator=g).tolist() + [3] for _ in range(n)]


@CUDA
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda_learns(tmp_path, precision):
    run, losses = _run(tmp_path, precision, "train.device=cuda", f"train.precision={precision}",
                       "train.max_steps=200")
    assert losses[-1] < losses[0] * 0.5
    state = load_checkpoint(os.path.join(run, "last.pt"))
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert ("scaler" in state) == (precision == "fp16")


@CUDA
def test_decoding_on_cuda_gives_what_the_cpu_gives():
    model = tiny_model()
    with torch.no_grad():
        model.generator.weight.mul_(3.0)  # peaked, so that float sums do not flip a choice
    src = pad(_sources())
    lens = [10] * src.size(0)
    cpu_greedy = greedy_decode(model, src, lens)
    cpu_beam = beam_search(model, src, lens, 4)
    model.cuda()
    assert [h.ids for h in greedy_decode(model, src.cuda(), lens)] == [h.ids for h in cpu_greedy]
    assert [h.ids for h in beam_search(model, src.cuda(), lens, 4)] == [h.ids for h in cpu_beam]
