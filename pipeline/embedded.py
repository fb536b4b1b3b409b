"""The embedded default model: a tiny random-weight Karlo (or its image-variations sibling, which shares its text
encoder), built from a fixed seed into each machine's cache the first time a process there needs it.

A run without ``--model`` hands its stage actors an :class:`EmbeddedModel` rather than the driver's cache path:
on a multi-node cluster the driver's cache is not on the other nodes' disks, so every node builds its own copy.
The build is deterministic (seed 0), so every copy holds the same bytes as the one the driver hashed for the
run's identity.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from karlo_model import make_tiny_model
from karlo_model.weights import cache_root

DEFAULT_MODEL_NAME = "tiny-random-v1"


@dataclass(frozen=True)
class EmbeddedModel:
    variations: bool = False

    @property
    def name(self) -> str:
        return f"{DEFAULT_MODEL_NAME}-variations" if self.variations else DEFAULT_MODEL_NAME

    def path(self) -> str:
        """This machine's copy, built once (a file lock makes concurrent processes wait for one build)."""
        target = cache_root() / self.name
        if (target / "model_index.json").is_file():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{self.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "model_index.json").is_file():
                tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
                make_tiny_model(tmp, seed=0, preset_name="tiny", variations=self.variations)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
        return str(target)


def default_model(variations: bool = False) -> str:
    """The path of this machine's copy of the embedded default model."""
    return EmbeddedModel(variations).path()


def resolve(model: str | EmbeddedModel) -> str:
    """A stage's model as a path or URL on the node it runs on."""
    return model.path() if isinstance(model, EmbeddedModel) else model
