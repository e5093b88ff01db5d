"""Shared fixtures: tiny models and the paths of the test corpora."""

import os

# cuBLAS reads this when CUDA starts, which may be in any test before the one that asks for
# train.deterministic: set it for the whole session (device.set_deterministic says why).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformer.config import ModelConfig  # noqa: E402
from transformer.model import Transformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "tests", "toy_corpus")
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
MULTI30K = os.path.join(os.path.dirname(ROOT), "shared", "multi30k")


def tiny_model(vocab: int = 23, share: bool = True, **overrides) -> Transformer:
    """A small random model in eval mode (dropout off), seeded."""
    torch.manual_seed(0)
    kw = dict(d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.1, max_positions=64)
    cfg = ModelConfig(**{**kw, **overrides})
    return Transformer(cfg, vocab, vocab, pad_id=0, share_embeddings=share).eval()


def toy_pairs(n: int = 300, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """n encoded (source, target) pairs of random lengths 1-39: source ends in </s> (3),
    target is <s> (2) ... </s>."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n, 2), generator=g).tolist()
    src = [list(range(4, 4 + a)) + [3] for a, _ in lengths]
    tgt = [[2] + list(range(4, 4 + b)) + [3] for _, b in lengths]
    return src, tgt


@pytest.fixture
def model() -> Transformer:
    return tiny_model()
