"""What the embedded trained model (karlo_model/assets/small-shapes-v2) does, judged on held-out captions against
the synthetic world's ground truth (karlo_model.small.judge: palette colours and shape outlines), never by eye:
adherence, decoder guidance, negative prompts, CLIP scores and --min-clip-score, variations, image-to-image.

The thresholds sit below what the committed weights measure on these exact scenes and seeds (docs/small-model.md
lists the measurements), with room for float rounding across machines; each is far above what the random tiny
model gets."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_utils import read_output, score_batch, write_table

from karlo_model import Karlo
from karlo_model.small import evaluate, judge, world
from karlo_model.weights import file_digest
from pipeline import columns as C
from pipeline.config import RunConfig, StageConfig
from pipeline.embedded import ASSETS, TRAINED, EmbeddedModel
from pipeline.run import run
from pipeline.scoring import ClipScoreStage

SCENES = world.evaluation_scenes(20)
STEPS = evaluate.Steps()  # the pipeline's defaults: 25 prior, 25 decoder, 7 super-res steps


@pytest.fixture(scope="module")
def trained(karlo_env) -> str:
    return EmbeddedModel(base=TRAINED).path()


@pytest.fixture(scope="module")
def trained_variations(karlo_env) -> str:
    return EmbeddedModel(variations=True, base=TRAINED).path()


@functools.cache
def _model(path: str) -> Karlo:
    return Karlo.from_pretrained(path)


@functools.cache
def _adherence(path: str, guidance: float) -> dict[str, float]:
    return evaluate.adherence(_model(path), SCENES, steps=STEPS, decoder_guidance_scale=guidance)


def test_the_committed_weights_are_the_recorded_ones_and_meet_the_colour_and_clip_targets():
    record = json.loads((ASSETS / TRAINED / "training.json").read_text())
    for name, digest in record["sha256"].items():
        assert file_digest(ASSETS / TRAINED / name) == digest, name
    assert record["command"].startswith("karlo train-small") and "--smoke" not in record["command"]
    result = record["evaluation"]
    assert result["scenes"] == 100
    # The colour and CLIP targets of the model's specification; its shapes are not yet at theirs (0.70; see
    # docs/small-model.md), so only that the judge read them is checked.
    assert result["colour_right"] >= 0.9 and result["clip_top1_of_10"] >= 0.8 and 0 <= result["shape_right"] <= 1


def test_adherence_on_held_out_captions(trained):
    assert all(s.triple in world.HELD_OUT for s in SCENES)
    right = _adherence(trained, 8.0)
    assert right["colour"] >= 0.8 and right["background"] >= 0.9, right


def test_higher_decoder_guidance_raises_adherence(trained):
    low, high = _adherence(trained, 1.0), _adherence(trained, 8.0)
    # Measured on these scenes: guidance 1 reads 1.00 / 0.25 / 0.75 (colour, shape, background), guidance 8
    # 1.00 / 0.30 / 1.00.
    assert sum(high.values()) >= sum(low.values()) + 0.15 and high["background"] > low["background"], (low, high)


def test_a_negative_prompt_naming_a_colour_lowers_that_colour(trained):
    # Captions that leave the colour open, so that the model picks one; "red shapes" as the negative prompt.
    prompts = [s.caption(frozenset({"count", "size", "shape", "background"})) for s in SCENES]
    seeds = list(range(len(prompts)))
    model = _model(trained)

    def red(negative: list[str] | None) -> float:
        images = model.generate(prompts, seeds, negative_prompts=negative).images
        return float(np.mean([judge.read(im).colour_fractions["red"] for im in images]))

    plain, steered = red(None), red(["red shapes"] * len(prompts))
    assert steered < 0.5 * plain and plain > 0.005, (plain, steered)


def test_variations_keep_colour_and_background(trained_variations):
    scenes = SCENES[:10]
    images = _model(trained_variations).variations([world.render(s) for s in scenes], list(range(10))).images
    readings = [judge.read(im) for im in images]
    assert sum(r.colour == s.colour for r, s in zip(readings, scenes)) >= 8
    assert sum(r.background == s.background for r, s in zip(readings, scenes)) >= 8


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_image_to_image_at_low_strength_keeps_the_layout(trained):
    scenes = SCENES[:10]
    inits = [world.render(s) for s in scenes]
    model = _model(trained)
    kept = model.generate([s.caption() for s in scenes], list(range(10)), init_images=inits, strength=0.3).images
    redrawn = model.generate([s.caption() for s in scenes], list(range(10)), init_images=inits, strength=1.0).images
    iou_kept = [_iou(judge.foreground(im), judge.foreground(init)) for im, init in zip(kept, inits)]
    iou_redrawn = [_iou(judge.foreground(im), judge.foreground(init)) for im, init in zip(redrawn, inits)]
    assert np.mean(iou_kept) >= 0.6 and np.mean(iou_kept) > np.mean(iou_redrawn) + 0.2, (iou_kept, iou_redrawn)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_min_clip_score_rejects_images_that_do_not_match_their_prompt(tmp_path: Path, ray_local, trained,
                                                                       trained_variations):
    """Rows whose init image (kept almost as it is, at strength 0.05) shows their caption's scene, and rows whose
    init image shows another colour on a far background (white for black and dark blue, black for white): the
    CLIP score ranks every match above every mismatch, and a threshold between them sends exactly the mismatches
    to rejected/. Not on gray: a few steps of this decoder leave a gray background speckled pink, which its small
    CLIP reads as another colour; and a near background (black for dark blue) is pulled to the caption's."""
    scenes = [s for s in SCENES if s.background != "gray"][:3]
    colours = world.COLOUR_NAMES
    far = {"white": "black", "black": "white", "dark blue": "white"}
    others = [dataclasses.replace(s, colour=colours[(colours.index(s.colour) + 4) % len(colours)],
                                  background=far[s.background]) for s in scenes]
    captions = [s.caption() for s in scenes] * 2
    images = [world.render(s) for s in scenes + others]
    matches = {f"r{i}" for i in range(3)}
    table = write_table(tmp_path / "prompts.parquet", id=[f"r{i}" for i in range(6)], prompt=captions,
                        seed=list(range(6)), init_image=[_png(im) for im in images], strength=[0.05] * 6)
    stages = {n: StageConfig(batch_size=3) for n in ("prior", "decoder", "super_res", "clip_score")}
    probe = RunConfig(str(table), str(tmp_path / "scored"), model=trained, clip_score=True, stages=stages,
                      clip_model=trained_variations)
    assert run(probe).written == 6
    scored = read_output(tmp_path / "scored")
    score = dict(zip(scored.keys, scored.metadata.column(C.CLIP_SCORE).to_pylist()))
    lowest_match = min(score[k] for k in matches)
    highest_mismatch = max(v for k, v in score.items() if k not in matches)
    assert lowest_match > highest_mismatch + 0.05, score
    # The same scores from the stage as a plain callable: the pipeline scored the images it wrote.
    written = scored.images()
    batch = score_batch(np.stack([written[k] for k in scored.keys]), scored.text_emb)
    stage_scores = ClipScoreStage(trained_variations, reference=C.TEXT_EMB)(batch)[C.CLIP_SCORE]
    np.testing.assert_allclose(stage_scores, [score[k] for k in scored.keys], atol=5e-3)

    threshold = (lowest_match + highest_mismatch) / 2
    cfg = RunConfig(str(table), str(tmp_path / "filtered"), model=trained, clip_score=True, stages=stages,
                    clip_model=trained_variations, min_clip_score=threshold)
    summary = run(cfg)
    assert (summary.written, summary.rejected) == (3, 3)
    assert set(read_output(tmp_path / "filtered").keys) == matches
