"""CLIP scores: the reference image processor in torch, CLIP vision towers of three layouts, the score stage as a
plain callable against transformers' own classes, and the pipeline's filtering into rejected/ on tiny random
weights (rows in = written + errors + rejected, and a resumed run treats rejected rows as done)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from parity_utils import single_thread  # noqa: F401 (fixture)
from PIL import Image
from pipeline_utils import PROMPTS, STEPS, read_output, reference, score_batch, write_table
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from karlo_model import make_tiny_model
from karlo_model.clip_vision import preprocess, tiny_vision_config
from karlo_model.config import ConfigError as ModelConfigError
from karlo_model.config import ImageProcessorConfig
from pipeline import columns as C
from pipeline.config import ConfigError, RunConfig, StageConfig
from pipeline.run import run
from pipeline.scoring import ClipScoreStage, check_tower, find_tower

RNG = np.random.default_rng(0)


def _images() -> list[np.ndarray]:
    """Noise (worst case for resampling differences) and smooth images of square, tall, wide, tiny and large sizes."""
    out = []
    for h, w in [(256, 256), (300, 200), (225, 500), (7, 3), (1000, 700), (224, 224)]:
        out.append(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
        small = Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        out.append(np.asarray(small.resize((w, h), Image.BILINEAR)))
    return out


def test_preprocess_equals_clip_image_processor():
    processor = CLIPImageProcessor()  # the reference feature extractor's configuration (the hub's karlo-v1-alpha-image-variations feature_extractor/preprocessor_config.json)
    cfg = ImageProcessorConfig.from_dict(processor.to_dict())
    assert cfg == ImageProcessorConfig()
    images = _images()
    ours = preprocess(images, cfg, "cpu")
    theirs = processor(images=[Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (len(images), 3, 224, 224)
    assert torch.equal(ours, theirs)  # bit for bit: guidance amplifies any difference in the embedding


def test_preprocess_follows_the_config():
    cfg = ImageProcessorConfig(shortest_edge=40, crop_size=(32, 24), image_mean=(0.5, 0.5, 0.5),
                               image_std=(0.25, 0.5, 1.0))
    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 24},
                                   image_mean=[0.5] * 3, image_std=[0.25, 0.5, 1.0])
    images = _images()[:4]
    theirs = processor(images=[Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
    assert torch.equal(preprocess(images, cfg, "cpu"), theirs)


def test_image_processor_config_reads_legacy_and_refuses_what_it_cannot_do():
    assert ImageProcessorConfig.from_dict({"size": 32, "crop_size": 30}) == ImageProcessorConfig(32, (30, 30))
    with pytest.raises(ModelConfigError, match="resample=2 is not supported"):
        ImageProcessorConfig.from_dict({"resample": 2})
    with pytest.raises(ModelConfigError, match="unknown config key 'do_pad_to_square'"):
        ImageProcessorConfig.from_dict({"do_pad_to_square": True})
    with pytest.raises(ModelConfigError, match="only shortest_edge"):
        ImageProcessorConfig.from_dict({"size": {"height": 224, "width": 224}})


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A tiny CLIPModel folder and a tiny CLIPVisionModelWithProjection folder saved by transformers, in the tiny
    model's embedding width (32), plus a tiny-alt variations repo (width 24)."""
    root = tmp_path_factory.mktemp("towers")
    vision = {k: v for k, v in tiny_vision_config(32, image_size=64).items()
              if k not in ("architectures", "model_type", "projection_dim")}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=20), vision_config=vision, projection_dim=32))
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**dict(vision, image_size=224), projection_dim=32))
    clip.save_pretrained(root / "clip-model")
    CLIPImageProcessor(size=64, crop_size=64).save_pretrained(root / "clip-model")
    tower.save_pretrained(root / "vision-tower")
    make_tiny_model(root / "alt", preset_name="tiny-alt", variations=True)
    return {"clip": root / "clip-model", "vision": root / "vision-tower", "alt": root / "alt", "clip_module": clip,
            "vision_module": tower}


@pytest.mark.parametrize("layout", ["clip", "vision"])
def test_score_stage_on_clip_model_folders(towers, layout):
    """A whole CLIPModel (text tower left out) and a bare vision tower, each with the processor it was saved with;
    embeddings and scores equal transformers' own model and processor."""
    folder = towers[layout]
    stage = ClipScoreStage(str(folder), reference=C.TEXT_EMB)
    assert stage.tower.layout == {"clip": "CLIPModel", "vision": "CLIPVisionModelWithProjection"}[layout]
    images = RNG.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    text = RNG.standard_normal((3, 32)).astype(np.float32)
    out = stage(score_batch(images, text, errors=["", "", "prompt is empty"]))

    processor = CLIPImageProcessor.from_pretrained(folder) if layout == "clip" else CLIPImageProcessor()
    pixels = processor(images=[Image.fromarray(a) for a in images[:2]], return_tensors="pt").pixel_values
    with torch.no_grad():
        if layout == "clip":
            expected = towers["clip_module"].get_image_features(pixel_values=pixels)
            expected = getattr(expected, "pooler_output", expected)
        else:
            expected = towers["vision_module"](pixel_values=pixels).image_embeds
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
    np.testing.assert_allclose(out[C.CLIP_IMAGE_EMB][:2], expected, atol=1e-6)
    cosine = (expected * (text[:2] / np.linalg.norm(text[:2], axis=1, keepdims=True))).sum(1)
    np.testing.assert_allclose(out[C.CLIP_SCORE][:2], cosine, atol=1e-6)
    # The error row passes through with zeros and keeps its error.
    assert out[C.ERROR].tolist() == ["", "", "prompt is empty"]
    assert out[C.CLIP_SCORE][2] == 0 and not out[C.CLIP_IMAGE_EMB][2].any()


def test_tower_must_share_the_text_encoders_embedding_space(towers, tiny_model, tiny_variations_model):
    info = check_tower(tiny_variations_model, tiny_model)
    assert info == {"model": tiny_variations_model, "layout": "image-variations repo", "dim": 32, "scale": "cosine"}
    with pytest.raises(ConfigError, match="embeds images in 24 dimensions but Karlo's CLIP embeddings have 32"):
        check_tower(str(towers["alt"]), tiny_model)
    with pytest.raises(ConfigError, match="is a UnCLIPPipeline repo without an image encoder"):
        find_tower(tiny_model)
    (towers["vision"] / "preprocessor_config.json").write_text(json.dumps(ImageProcessorConfig(64, (64, 64)).to_dict()))
    try:
        with pytest.raises(ConfigError, match=r"crops to \(64, 64\) but the tower takes 224x224 images"):
            find_tower(str(towers["vision"]))
    finally:
        (towers["vision"] / "preprocessor_config.json").unlink()


def test_config_rules():
    with pytest.raises(ConfigError, match="min_clip_score needs clip_score"):
        RunConfig("in", "out", min_clip_score=0.2)
    with pytest.raises(ConfigError, match=r"a number in \[-1, 1\]"):
        RunConfig("in", "out", clip_score=True, min_clip_score=3)
    cfg = RunConfig("in", "out", clip_score=True)
    assert list(cfg.stages) == ["prior", "decoder", "super_res", "clip_score"]
    assert cfg.output_settings()["clip_score"] == {"model": None, "min_clip_score": None}
    assert "clip_score" not in RunConfig("in", "out").output_settings()  # older outputs keep their identity


# ---------------------------------------------------------------------------------------------------------------
# Through the pipeline

SHARD = 3


@pytest.mark.slow
def test_scores_and_filtering_through_the_pipeline(tmp_path, ray_local, tiny_model, tiny_variations_model):
    prompts = PROMPTS[:6] + [""]
    seeds = list(range(500, 507))
    table = write_table(tmp_path / "prompts.parquet", id=[f"p{i}" for i in range(7)], prompt=prompts, seed=seeds)

    # Expected scores in-process: images as a batch-size-1 actor makes them, scored by the stage as a callable.
    images, _, text_emb = reference(tiny_model, prompts[:6], seeds[:6])
    scores = ClipScoreStage(tiny_variations_model, reference=C.TEXT_EMB)(score_batch(images, text_emb))[C.CLIP_SCORE]
    ordered = np.sort(scores)
    gap = int(np.argmax(np.diff(ordered[1:-1]))) + 1  # the widest gap between middle scores: no rounding flips a row
    threshold = float((ordered[gap] + ordered[gap + 1]) / 2)
    expected_rejected = {f"p{i}" for i in range(6) if scores[i] < threshold}
    assert 0 < len(expected_rejected) < 6

    out = tmp_path / "out"
    stages = {n: StageConfig(batch_size=1) for n in ("prior", "decoder", "super_res", "clip_score")}
    cfg = RunConfig(str(table), str(out), model=tiny_model, clip_score=True, clip_model=tiny_variations_model,
                    min_clip_score=threshold, rows_per_shard=SHARD, stages=stages, **STEPS)
    summary = run(cfg)
    assert (summary.rows_in, summary.errors, summary.rejected) == (7, 1, len(expected_rejected))
    assert summary.written + summary.errors + summary.rejected == summary.rows_in and summary.complete

    o = read_output(out)
    assert set(o.keys) == {f"p{i}" for i in range(6)} - expected_rejected
    assert o.error_keys == ["p6"]
    kept = [int(k[1:]) for k in o.keys]
    np.testing.assert_allclose(o.metadata.column(C.CLIP_SCORE).to_numpy(), scores[kept], atol=1e-3)
    assert (o.metadata.column(C.CLIP_SCORE).to_numpy() >= threshold).all()
    # clip_img_emb/: unit-norm float16, row-aligned with metadata like img_emb/ (same shard ids).
    clip_files = sorted((out / "clip_img_emb").glob("*.npy"))
    assert [p.name.removeprefix("clip_img_emb_") for p in clip_files] == [
        p.name.removeprefix("img_emb_") for p in sorted((out / "img_emb").glob("*.npy"))]
    clip_emb = np.concatenate([np.load(p) for p in clip_files])
    assert clip_emb.dtype == np.float16 and clip_emb.shape == (len(kept), 32)
    np.testing.assert_allclose(np.linalg.norm(clip_emb.astype(np.float32), axis=1), 1, atol=2e-3)
    cos = (clip_emb.astype(np.float32) * (o.text_emb / np.linalg.norm(o.text_emb, axis=1, keepdims=True))).sum(1)
    np.testing.assert_allclose(cos, o.metadata.column(C.CLIP_SCORE).to_numpy(), atol=5e-3)

    # rejected/: everything a good row has (key, prompt, seed, score, settings, image, embeddings).
    rejected = pq.read_table(sorted((out / "rejected").glob("rejected_*.parquet"))).to_pylist()
    assert {r["key"] for r in rejected} == expected_rejected
    for r in rejected:
        i = int(r["key"][1:])
        assert (r["prompt"], r["seed"], r["model"]) == (prompts[i], seeds[i], tiny_model)
        assert r["clip_score"] == pytest.approx(scores[i], abs=1e-3) and r["clip_score"] < threshold
        assert np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))).shape == (256, 256, 3)
        assert len(r["img_emb"]) == len(r["text_emb"]) == len(r["clip_img_emb"]) == 32
    import datasets

    files = sorted(str(p) for p in (out / "rejected").glob("rejected_*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image) and ds[0]["image"].size == (256, 256)
    assert sum(m["rejected"] for m in o.markers) == len(expected_rejected)
    assert o.manifest["counts"]["rejected"] == len(expected_rejected)
    assert o.manifest["clip_score"] == {"model": tiny_variations_model, "layout": "image-variations repo", "dim": 32,
                                        "scale": "cosine", "reference": C.TEXT_EMB, "min": threshold}

    # A rerun finds every row committed (rejected ones included) and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = run(cfg)
    assert again.resumed == 7 and again.images_this_run == 0 and again.rejected == len(expected_rejected)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_clip_model_that_is_not_one(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"CLIP model .*empty: missing file .*config.json"):
        check_tower(str(tmp_path / "empty"), tiny_model)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="describes a 'bert' model, not a CLIP model or vision tower"):
        check_tower(str(tmp_path / "bert"), tiny_model)
    with pytest.raises(ConfigError, match="is not a folder"):
        check_tower(str(tmp_path / "nowhere"), tiny_model)
