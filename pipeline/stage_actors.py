"""Every stage's actor class by stage name, for the driver that builds a run (actors import only their own
stage's module; see pipeline.actors.StageActor)."""

from __future__ import annotations

from collections.abc import Iterable

from . import columns as C
from .actors import StageActor
from .config import ConfigError
from .scoring import ClipScoreActor
from .stages import DecoderActor, PriorActor, SuperResActor
from .variations import ImageEncoderActor

STAGE_ACTORS: dict[str, type[StageActor]] = {
    actor.stage_class.name: actor
    for actor in (PriorActor, ImageEncoderActor, DecoderActor, SuperResActor, ClipScoreActor)
}


def check_stage_columns(stages: Iterable[str], prepared: Iterable[str], reference: str) -> None:
    """Refuse, before any work, stages in an order where one reads a column that neither prepare
    (``prepared``) nor an earlier stage makes: at run time that would be a bare KeyError in every batch. The CLIP
    score stage reads its ``reference`` embedding column besides the image."""
    stages = list(stages)
    have = set(prepared)
    for name in stages:
        stage = STAGE_ACTORS[name].stage_class
        inputs = (C.KEY, C.IMAGE, reference) if name == "clip_score" else stage.inputs
        missing = [c for c in inputs if c not in have]
        if missing:
            raise ConfigError(f"the {name} stage reads {', '.join(missing)}, which no step before it makes "
                              f"(stages in order: {', '.join(stages)})")
        have = (have - set(stage.consumes)) | set(stage.outputs)
