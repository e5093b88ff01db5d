"""Training in many processes: torchrun, DistributedDataParallel, and who does what.

`make train NPROC=N` starts N processes of the same program with torchrun,
PyTorch's launcher (`launch` below). Each finds in its environment its RANK
(0 .. WORLD_SIZE-1 over all machines), the WORLD_SIZE, and its LOCAL_RANK, the
GPU it takes on its machine. A plain `make train` is one process: no process
group, no DDP (`Distributed()`).

Who does what:
- Every process trains on its own micro-batches of each update
  (`BatchIterator.updates`); DistributedDataParallel (DDP) averages the
  gradients during backward, so that every process makes the same update and
  holds the same weights.
- Process 0 alone writes (config, tokenizer, metrics, checkpoints) and validates,
  on the whole validation set: the figures are those a one-process run logs,
  and validation is a small share of a run (greedy decoding of the validation
  set, every train.eval_every updates). The others wait for it.
- Whatever stops the run (a signal, the time budget, patience) is agreed by all
  processes after each update (`any`), so that every process stops after the same
  one, with one last.pt written.

The agreeing is done on the host, over a gloo group, so that it never waits for a
GPU; DDP's gradients go over nccl between GPUs (gloo on the CPU).
"""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .device import DeviceError

log = logging.getLogger(__name__)

# Process 0 may validate, average and save for a while on a CPU before the others go on.
HOST_TIMEOUT = datetime.timedelta(hours=1)


class Stopped(Exception):
    """This process stops because another one did and has said why (the exit status only)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclass
class Distributed:
    """This process's place in the run: its rank among world_size processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host_group: Any = None  # gloo group for barriers and agreement (None: the default group)

    @classmethod
    def from_env(cls) -> Distributed:
        """What torchrun put in the environment; one process when it is not there."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self) -> None:
        """Join the process group (nothing to join for one process).

        The default group talks gloo for CPU tensors and, on a machine with GPUs, nccl
        for CUDA ones (DDP's gradients); host_group is gloo only, for agreeing.
        """
        if self.world_size == 1:
            return
        if torch.cuda.is_available() and self.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(timeout=HOST_TIMEOUT)
        self.host_group = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)
        logging.getLogger("transformer").setLevel(logging.INFO if self.main else logging.WARNING)

    def device(self, device: torch.device) -> torch.device:
        """The device this process trains on: on a GPU machine, GPU LOCAL_RANK of its own."""
        if self.world_size == 1 or device.type != "cuda":
            return device
        gpus = torch.cuda.device_count()
        (short,) = self.any(self.local_rank >= gpus)
        if short:
            if not self.main:
                raise Stopped(2)
            raise DeviceError(f"more processes on a machine than it has GPUs ({gpus}): start at "
                              f"most {gpus} (NPROC={gpus}), or train on the CPU (train.device=cpu)")
        return torch.device("cuda", self.local_rank)

    def end(self) -> None:
        """Leave the process group, all together (gloo aborts a process whose peers have
        closed their connections under it)."""
        if dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()

    # --- agreeing, on the host -------------------------------------------------------
    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.host_group)

    def any(self, *flags: bool) -> list[bool]:
        """Each flag: whether it is true in any process (every process calls this)."""
        if self.world_size == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return [bool(v) for v in t.tolist()]

    def broadcast(self, obj: Any) -> Any:
        """Process 0's obj, in every process."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every process's obj, in rank order, in every process."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.host_group)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run by process 0 alone, its result handed to all. If it fails, process 0
        raises its error (one line for the user) and the others stop without a word."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except BaseException as e:
                error = e
        failed = self.broadcast(error is not None)
        if error is not None:
            raise error
        if failed:
            raise Stopped(2)
        return self.broadcast(result)


def lost_peer(e: BaseException) -> bool:
    """Whether e is a collective that failed because another process is gone."""
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in (
            "Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo")))


def launch(nproc: int, torchrun: str, argv: list[str]) -> int:
    """`transformer-train --nproc N ...`: this same command in N processes, by torchrun.

    torchrun's options (`--nnodes`, `--rdzv-endpoint`, ...) come in `torchrun`; without
    them it is `--standalone`: one machine. The workers' errors are theirs to print:
    what torchrun says of a failed worker (a Python traceback) is left out, and the exit
    status is the first failed worker's.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    extra = shlex.split(torchrun) if torchrun else ["--standalone"]
    args = get_args_parser().parse_args(
        [f"--nproc-per-node={nproc}", *extra, "-m", "transformer.cli", *argv])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # each has a level of its own
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    log.info("torchrun: %d processes on this machine (%s)%s", nproc, " ".join(extra),
             "" if extra == ["--standalone"] else "; waiting for every machine to join")
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:  # it has said why
            return failure.exitcode
        print(f"error: process {rank} was killed by {failure.signal_name()} (out of memory, or "
              "killed by hand?)", file=sys.stderr)
        return 128 - failure.exitcode
    except RendezvousError as e:
        why = [str(x).splitlines()[0].replace(" See inner exception for details.", "").rstrip(".")
               for x in (e, e.__cause__) if x is not None and str(x)]
        print(f"error: torchrun could not gather the processes ({torchrun or '--standalone'}): "
              f"{': '.join(why)[:400] or type(e).__name__}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SignalException):  # the workers have saved and said so
        return 130
    return 0
