"""One process of a test run under torchrun: train, then save this process's weights.

python -m torch.distributed.run --standalone --nproc-per-node=N tests/ddp_worker.py \
    RUN_DIR OUT_DIR [section.key=value ...]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import TINY_CONFIG  # noqa: E402
from transformer.config import load_config  # noqa: E402
from transformer.distributed import Distributed  # noqa: E402
from transformer.train import Trainer  # noqa: E402

if __name__ == "__main__":
    run_dir, out, *overrides = sys.argv[1:]
    dist = Distributed.from_env()
    dist.start()
    trainer = Trainer(load_config(TINY_CONFIG, overrides), run_dir, dist=dist)
    trainer.run()
    torch.save(trainer.model.state_dict(), os.path.join(out, f"rank{dist.rank}.pt"))
    dist.end()
