"""The embedded default model: a tiny random-weight Karlo (or its image-variations sibling, which shares its text
encoder), built from a fixed seed into each machine's cache the first time a process there needs it.

A run without ``--model`` hands its stage actors an :class:`EmbeddedModel` rather than the driver's cache path:
on a multi-node cluster the driver's cache is not on the other nodes' disks, so every node builds its own copy.
The build is deterministic (seed 0), so every copy holds the same bytes as the one the driver hashed for the
run's identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from karlo_model import make_tiny_model
from karlo_model.fetch import built_once

DEFAULT_MODEL_NAME = "tiny-random-v1"


@dataclass(frozen=True)
class EmbeddedModel:
    variations: bool = False

    @property
    def name(self) -> str:
        return f"{DEFAULT_MODEL_NAME}-variations" if self.variations else DEFAULT_MODEL_NAME

    def path(self) -> str:
        """This machine's copy, built once (concurrent processes wait for one build)."""
        return str(built_once(self.name, self._build, done="model_index.json"))

    def _build(self, folder: Path) -> None:
        make_tiny_model(folder, seed=0, preset_name="tiny", variations=self.variations)


def default_model(variations: bool = False) -> str:
    """The path of this machine's copy of the embedded default model."""
    return EmbeddedModel(variations).path()


def resolve(model: str | EmbeddedModel) -> str:
    """A stage's model as a path or URL on the node it runs on."""
    return model.path() if isinstance(model, EmbeddedModel) else model
