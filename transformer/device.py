"""Device handling in one place: which device, which precision, which random states.

- `pick_device`: 'auto' is CUDA when present, else the CPU.
- `resolve_precision` and `autocast`: mixed precision with torch.autocast. The
  weights, the optimizer state and the checkpoints stay float32; inside autocast
  the matrix multiplies (and attention) run in bfloat16 or float16, while
  reductions such as softmax, layer norm and the loss stay float32.
- `rng_state` / `set_rng_state`: every random state a run draws from (Python, the
  CPU, each CUDA device), so that a resumed run draws the same dropout masks as an
  uninterrupted one.
- `set_deterministic`: the switches that make CUDA kernels repeat bit for bit.
- `keep_freed_memory`: the CPU's freed tensors stay with the process for the next step.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random

import torch

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """A device or precision that this machine cannot give; one line for the user."""


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 matrix multiplies for this CPU (AVX-512 or Arm's BF16).

    Without them torch emulates bf16, many times slower than fp32. True when torch
    cannot tell.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def resolve_precision(name: str, device: torch.device, strict: bool = True) -> str:
    """'auto' -> 'bf16' on a GPU that has it, else 'fp32'; the others as they are.

    strict=False (translating with a model trained elsewhere) falls back to fp32 where
    the device cannot give the precision, or only emulates it, instead of raising.

    On the CPU 'auto' stays fp32: bf16 trains no faster there, even on a CPU with
    AVX512-BF16, and is emulated without AVX-512 (measured in docs/cpu-speed.md);
    training at bf16 on such a CPU says so in one line and goes on.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    problem = None
    if name == "fp16" and device.type != "cuda":
        problem = "fp16 needs a CUDA device; use bf16 or fp32 on the CPU"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        problem = "this GPU has no bf16; use fp16 or fp32"
    if problem and strict:
        raise DeviceError(f"train.precision: {problem}")
    if name == "bf16" and device.type == "cpu" and not cpu_has_bf16_kernels():
        if not strict:
            return "fp32"
        log.warning("train.precision: bf16 is emulated on this CPU (no AVX-512 or Arm BF16), "
                    "many times slower than fp32; fp32 or auto trains faster")
    return "fp32" if problem else name


def autocast(device: torch.device, precision: str):
    """A context that runs the forward pass at `precision` (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def synchronize(device: torch.device) -> None:
    """Wait until the device has done all queued work (a GPU runs behind the host, so a
    clock read alone would time only the queueing); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rng_state(device: torch.device | None = None) -> dict:
    """Every random state a run draws from, as checkpoint data.

    On a GPU of its own (cuda:k, one of many processes), the state of that GPU only.
    """
    state = {"python": random.getstate(), "cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and device.index is not None:
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one per device
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what `rng_state` saved; CUDA states only where the devices still match."""
    random.setstate(state["python"])
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)


def set_deterministic(on: bool) -> None:
    """Kernels that give the same bits every run (train.deterministic), at some speed.

    Without this, a CUDA run is repeatable only up to the order of floating-point
    sums in kernels that use atomics (embedding and index backward, some attention
    backward kernels): two runs of one config can differ in the last digits.
    """
    if on:
        # cuBLAS needs a fixed workspace to be deterministic; read when it starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    # The fused attention kernels' backward passes add with atomics on a GPU; the math
    # path (the same attention, written as matrix multiplies and a softmax) does not.
    torch.backends.cuda.enable_flash_sdp(not on)
    torch.backends.cuda.enable_mem_efficient_sdp(not on)


def keep_freed_memory() -> None:
    """Keep the memory of freed tensors in the process, for the next step to reuse.

    A training step allocates and frees the same large tensors every time (a chunk's
    logits alone are 16 MB). glibc's malloc gives memory above a threshold back to
    the kernel when it is freed, so the next step gets fresh pages, and the kernel
    faults in and zeroes each 4 KB page again (what that cost: docs/cpu-speed.md).
    Raising the two thresholds keeps those pages; the process holds about its peak
    memory, which it reaches every step anyway.
    A no-op where the C library is not glibc (macOS, Windows, musl).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameters, from <malloc.h>
    mallopt(m_mmap_threshold, 256 << 20)  # blocks below 256 MB come from the heap...
    mallopt(m_trim_threshold, 1 << 30)  # ...which is given back only above 1 GB free
