"""Every stage's actor class by stage name, for the driver that builds a run (actors import only their own
stage's module; see pipeline.actors.StageActor)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .actors import StageActor
from .config import ConfigError
from .scoring import ClipScoreActor
from .stages import DecoderActor, PriorActor, SuperResActor
from .variations import ImageEncoderActor

STAGE_ACTORS: dict[str, type[StageActor]] = {
    actor.stage_class.name: actor
    for actor in (PriorActor, ImageEncoderActor, DecoderActor, SuperResActor, ClipScoreActor)
}


def check_stage_columns(stages: Iterable[str], prepared: Iterable[str],
                        settings: Callable[[str], dict[str, Any]]) -> None:
    """Refuse, before any work, stages in an order where one reads a column that neither prepare
    (``prepared``) nor an earlier stage makes: at run time that would be a bare KeyError in every batch.
    ``settings(name)`` are a stage's own settings, which may change what it reads (``Stage.reads``)."""
    stages = list(stages)
    have = set(prepared)
    for name in stages:
        stage = STAGE_ACTORS[name].stage_class
        missing = [c for c in stage.reads(**settings(name)) if c not in have]
        if missing:
            raise ConfigError(f"the {name} stage reads {', '.join(missing)}, which no step before it makes "
                              f"(stages in order: {', '.join(stages)})")
        have = (have - set(stage.consumes)) | set(stage.outputs)
