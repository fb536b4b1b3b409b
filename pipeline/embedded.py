"""The embedded default model, built from the package into each machine's cache the first time a process there
needs it. Two are embedded:

* ``small-shapes-v2`` (the default): the small Karlo trained by ``karlo train-small`` on the synthetic world of
  karlo_model.small (flat-coloured shapes on plain backgrounds, docs/small-model.md), committed under
  ``karlo_model/assets/small-shapes-v2`` with its training record;
* ``tiny-random-v1``: a tiny random-weight Karlo built from seed 0, fast enough for arithmetic and parity checks.

``KARLO_EMBEDDED_MODEL`` picks one in the driver. Either has an image-variations sibling (the same components
without the prior, with the CLIP vision tower).

A run without ``--model`` hands its stage actors an :class:`EmbeddedModel` rather than the driver's cache path:
on a multi-node cluster the driver's cache is not on the other nodes' disks, so every node builds its own copy.
Both builds are deterministic (a copy of packaged files, or seed 0), so every copy holds the same bytes as the one
the driver hashed for the run's identity.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import karlo_model
from karlo_model import make_tiny_model
from karlo_model.fetch import built_once

from .config import ConfigError

TRAINED = "small-shapes-v2"
RANDOM = "tiny-random-v1"
EMBEDDED = (TRAINED, RANDOM)
CHOICE_ENV = "KARLO_EMBEDDED_MODEL"
ASSETS = Path(karlo_model.__file__).parent / "assets"


def chosen() -> str:
    """The embedded model this process uses: ``$KARLO_EMBEDDED_MODEL``, else the trained one."""
    name = os.environ.get(CHOICE_ENV) or TRAINED
    if name not in EMBEDDED:
        raise ConfigError(f"{CHOICE_ENV}={name!r} names no embedded model; choose one of {list(EMBEDDED)}")
    return name


def notice() -> str:
    """What a run without --model tells its user about the model it uses."""
    if chosen() == RANDOM:
        return f"Using the embedded tiny model ({RANDOM}) with RANDOM weights: the images will be noise."
    return (f"Using the embedded small model ({TRAINED}), trained on a synthetic world of coloured shapes: it draws "
            "only prompts such as 'three large red circles on a white background'.")


@dataclass(frozen=True)
class EmbeddedModel:
    variations: bool = False
    base: str = field(default_factory=chosen)  # fixed where it is made (the driver), so that every node agrees

    @property
    def name(self) -> str:
        return f"{self.base}-variations" if self.variations else self.base

    def path(self) -> str:
        """This machine's copy, built once (concurrent processes wait for one build)."""
        return str(built_once(self.name, self._build, done="model_index.json"))

    def _build(self, folder: Path) -> None:
        if self.base == RANDOM:
            make_tiny_model(folder, seed=0, preset_name="tiny", variations=self.variations)
            return
        from karlo_model.small.recipe import variations_layout

        source = ASSETS / self.base
        if self.variations:
            variations_layout(source, folder)
        else:
            shutil.copytree(source, folder, dirs_exist_ok=True)


def default_model(variations: bool = False) -> str:
    """The path of this machine's copy of the embedded default model."""
    return EmbeddedModel(variations).path()


def resolve(model: str | EmbeddedModel) -> str:
    """A stage's model as a path or URL on the node it runs on."""
    return model.path() if isinstance(model, EmbeddedModel) else model
