"""Karlo v1 alpha (kakaobrain unCLIP) in plain PyTorch + transformers."""

from .config import ConfigError, KarloConfig, preset
from .karlo import Guidance, Karlo, KarloOutput
from .text import TextEncoding
from .tiny import make_tiny_model
from .weights import WeightsError

__all__ = [
    "ConfigError",
    "Guidance",
    "Karlo",
    "KarloConfig",
    "KarloOutput",
    "TextEncoding",
    "WeightsError",
    "make_tiny_model",
    "preset",
]
