"""A small encoder-decoder Transformer for translation, written from scratch in PyTorch."""

from .config import Config, ConfigError, load_config
from .model import Transformer

__all__ = ["Config", "ConfigError", "Transformer", "load_config"]
