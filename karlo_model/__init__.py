"""Karlo v1 alpha (kakaobrain unCLIP) in plain PyTorch + transformers."""

from .config import ConfigError, KarloConfig
from .fastpath import DTYPES
from .karlo import DecoderResult, Guidance, Karlo, KarloOutput, PriorResult
from .presets import preset
from .repo import VARIATIONS_PIPELINE, read_configs
from .text import MAX_LENGTH, TextEncoding
from .tiny import make_tiny_model
from .weights import WeightsError

__all__ = [
    "DTYPES",
    "MAX_LENGTH",
    "VARIATIONS_PIPELINE",
    "ConfigError",
    "Guidance",
    "Karlo",
    "KarloConfig",
    "KarloOutput",
    "DecoderResult",
    "PriorResult",
    "TextEncoding",
    "WeightsError",
    "make_tiny_model",
    "preset",
    "read_configs",
]
