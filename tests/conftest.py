"""Shared fixtures: tiny models and the paths of the test corpora."""

import os

import pytest
import torch

from transformer.config import ModelConfig
from transformer.model import Transformer

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


@pytest.fixture
def model() -> Transformer:
    return tiny_model()
