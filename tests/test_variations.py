"""Image variations: parity with diffusers' UnCLIPImageVariationPipeline on tiny random weights that diffusers and
transformers initialised and saved, the tiny variations layout, the prepare step on image tables, and the whole
pipeline on local and moto S3 storage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from diffusers import UnCLIPImageVariationPipeline
from parity_utils import _redraw_constants, build_pipeline, single_thread  # noqa: F401 (fixture)
from PIL import Image
from pipeline_utils import STEPS, assert_batch_independent, read_output, torch_threads
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from jobs.cli import main
from karlo_model import Karlo, make_tiny_model
from karlo_model.clip_vision import tiny_vision_config
from pipeline import columns as C
from pipeline.config import ConfigError, RunConfig, StageConfig
from pipeline.reader import InputError, plan_inputs
from pipeline.run import run
from pipeline.schema import PREPARE
from pipeline.variations import decode_image, image_column_check, prepare_images

VARIATION_STEPS = dict(decoder_steps=STEPS["decoder_steps"], super_res_steps=STEPS["super_res_steps"])


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _inputs(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth images of assorted sizes and aspect ratios (the processor resizes and crops each)."""
    rng = np.random.default_rng(seed)
    sizes = [(256, 256), (300, 200), (180, 320), (64, 64), (500, 499)]
    return [np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (sizes[i % 5][1], sizes[i % 5][0]), Image.BICUBIC)) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.fixture(scope="module")
def diffusers_variations(tmp_path_factory):
    """diffusers' UnCLIPImageVariationPipeline in the tiny shapes, with diffusers' and transformers' own seeded init,
    saved with save_pretrained; and our Karlo loaded from that folder."""
    work = tmp_path_factory.mktemp("diffusers-variations")
    base = build_pipeline("tiny", 0, work)
    vision = {k: v for k, v in tiny_vision_config(32).items() if k not in ("architectures", "model_type")}
    with torch.random.fork_rng():
        torch.manual_seed(3)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    _redraw_constants([encoder], torch.Generator().manual_seed(4))
    pipe = UnCLIPImageVariationPipeline(
        decoder=base.decoder, text_encoder=base.text_encoder, tokenizer=base.tokenizer, text_proj=base.text_proj,
        feature_extractor=CLIPImageProcessor(), image_encoder=encoder, super_res_first=base.super_res_first,
        super_res_last=base.super_res_last, decoder_scheduler=base.decoder_scheduler,
        super_res_scheduler=base.super_res_scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(work / "repo"))
    return pipe, Karlo.from_pretrained(work / "repo")


@pytest.mark.parametrize("scale", [8.0, 1.0, 2.5])
def test_variations_match_diffusers(diffusers_variations, scale):
    pipe, karlo = diffusers_variations
    images, seeds = _inputs(3), [11, 22, 33]
    theirs = pipe([Image.fromarray(a) for a in images], generator=[torch.Generator().manual_seed(s) for s in seeds],
                  decoder_num_inference_steps=3, super_res_num_inference_steps=3, decoder_guidance_scale=scale,
                  output_type="np").images
    theirs = (theirs * 255).round().astype(np.uint8)
    ours = karlo.variations(images, seeds, decoder_steps=3, super_res_steps=3, decoder_guidance_scale=scale)
    assert not np.array_equal(theirs[0], theirs[1])
    assert np.array_equal(ours.images, theirs)  # bit for bit, preprocessing included
    with torch.no_grad():
        pixels = pipe.feature_extractor(images=[Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
        expected = pipe.image_encoder(pixels).image_embeds.numpy()
    assert np.abs(expected).max() > 0.1
    assert np.array_equal(ours.image_embeds, expected)


def test_loaded_variations_repo(diffusers_variations):
    _, karlo = diffusers_variations
    assert set(karlo.modules) == {"text_encoder", "image_encoder", "text_proj", "decoder", "super_res_first",
                                  "super_res_last"}
    assert karlo.config.prior is None and karlo.config.image_encoder["projection_dim"] == 32


def test_tiny_variations_layout_shares_the_text_to_image_weights(tmp_path, tiny_model, tiny_variations_model):
    index = json.loads((Path(tiny_variations_model) / "model_index.json").read_text())
    assert index["_class_name"] == "UnCLIPImageVariationPipeline" and "prior" not in index
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert not (Path(tiny_variations_model) / "prior").exists()
    for comp in ("text_encoder", "decoder", "super_res_first"):
        ours = (Path(tiny_variations_model) / comp).glob("*.safetensors")
        theirs = (Path(tiny_model) / comp).glob("*.safetensors")
        assert [p.read_bytes() for p in ours] == [p.read_bytes() for p in theirs], comp
    with pytest.raises(ValueError, match=r"stages \['prior'\] are not in this model"):
        Karlo.from_pretrained(tiny_variations_model, stages=["prior"])
    make_tiny_model(tmp_path / "alt", preset_name="tiny-alt", variations=True)
    alt = Karlo.from_pretrained(tmp_path / "alt", stages=["image_encoder"])
    assert alt.config.image_encoder["projection_dim"] == 24 and set(alt.modules) == {"text_encoder", "image_encoder"}


# ---------------------------------------------------------------------------------------------------------------
# The prepare step


def _reader_table(column: pa.Array, **extra) -> pa.Table:
    n = len(column)
    return pa.table({"image": column, **extra, C.SOURCE: ["in.parquet"] * n, C.SOURCE_ROW: list(range(n))})


def test_prepare_images_keeps_every_row(tmp_path):
    good = _inputs(1)[0]
    (tmp_path / "a.png").write_bytes(_png(good))
    (tmp_path / "broken.png").write_bytes(_png(good)[:100])
    cells = [
        {"bytes": _png(good), "path": "a.png"},  # Hugging Face Image with bytes
        {"bytes": None, "path": str(tmp_path / "a.png")},  # Hugging Face Image by path
        {"bytes": None, "path": str(tmp_path / "missing.png")},
        {"bytes": b"not an image", "path": None},
        {"bytes": None, "path": str(tmp_path / "broken.png")},
        None,
        {"bytes": None, "path": "relative.png"},
    ]
    struct = pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    out = prepare_images(_reader_table(struct, seed=[1, 2, 3, 4, 5, 6, -1]), run_seed=0, decoder_guidance_scale=8.0,
                         image_column="image")
    assert out.num_rows == 7 and "image" not in out.column_names
    rows = out.to_pylist()
    assert [r[C.ERROR] == "" for r in rows] == [True, True, False, False, False, False, False]
    assert all(r[C.ERROR_STAGE] == PREPARE for r in rows[2:])
    assert "missing.png' cannot be read: FileNotFoundError" in rows[2][C.ERROR]
    assert rows[3][C.ERROR].startswith("image cannot be decoded: UnidentifiedImageError")
    assert rows[4][C.ERROR].startswith("image cannot be decoded")
    assert rows[5][C.ERROR] == "image is null"
    assert rows[6][C.ERROR] == "seed must be an integer in [0, 2**63), got -1; image path 'relative.png' must be " \
                               "absolute or a URL"
    assert [r[C.SOURCE_IMAGE_PATH] for r in rows[:2]] == ["a.png", str(tmp_path / "a.png")]
    assert rows[0][C.SOURCE_IMAGE] == rows[1][C.SOURCE_IMAGE] == _png(good)
    assert rows[2][C.SOURCE_IMAGE] == b""
    assert {r[C.PROMPT] for r in rows} == {""} and {r[C.PRIOR_GUIDANCE_SCALE] for r in rows} == {1.0}
    assert len({r[C.KEY] for r in rows}) == 7


def test_image_table_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"picture": [b"x"], "caption": ["a"]}), path)
    assert plan_inputs(str(path), check_columns=image_column_check("picture")).total_rows == 1
    with pytest.raises(InputError, match="has no 'image' column; its columns are: picture, caption"):
        plan_inputs(str(path), check_columns=image_column_check("image"))
    pq.write_table(pa.table({"image": [b"x"], "prompt": ["a"]}), path)
    with pytest.raises(InputError, match="has a column named 'prompt', which image variations cannot keep"):
        plan_inputs(str(path), check_columns=image_column_check("image"))
    pq.write_table(pa.table({"image": [1]}), path)
    with pytest.raises(InputError, match="column 'image' of 't.parquet' is int64; expected image bytes"):
        plan_inputs(str(path), check_columns=image_column_check("image"))


# ---------------------------------------------------------------------------------------------------------------
# Through the pipeline


def _reference(model: str, images: list[np.ndarray], seeds: list[int]) -> np.ndarray:
    """Karlo.variations one row at a time, as a batch-size-1 CPU actor with one thread runs it."""
    karlo = Karlo.from_pretrained(model)
    with torch_threads(1):
        return np.stack([karlo.variations([im], [s], **VARIATION_STEPS).images[0] for im, s in zip(images, seeds)])


def _stages() -> dict[str, StageConfig]:
    return {n: StageConfig(batch_size=1) for n in ("image_encoder", "decoder", "super_res")}


@pytest.mark.slow
def test_variations_pipeline_local(tmp_path, ray_local, tiny_model, tiny_variations_model):
    images = _inputs(3, seed=5)
    (tmp_path / "img").mkdir()
    for i, im in enumerate(images[1:]):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(im))
    table = tmp_path / "in" / "images.parquet"
    table.parent.mkdir()
    # Bytes, a path and an undecodable cell in one binary/path table: a path column is the other flavour below.
    pq.write_table(pa.table({
        "id": ["b0", "p1", "p2", "bad"],
        "image": [{"bytes": _png(images[0]), "path": None},
                  {"bytes": None, "path": str(tmp_path / "img" / "0.png")},
                  {"bytes": None, "path": str(tmp_path / "img" / "1.png")},
                  {"bytes": b"\x89PNG truncated", "path": None}],
        "seed": [7, 8, 9, 10],
        "caption": ["x", "y", "z", "w"],
    }), table)
    out = tmp_path / "out"
    summary = run(RunConfig(str(table), str(out), task="variations", rows_per_shard=2, stages=_stages(),
                            **VARIATION_STEPS))
    assert (summary.rows_in, summary.written, summary.errors) == (4, 3, 1) and summary.complete

    o = read_output(out)
    assert sorted(o.keys) == ["b0", "p1", "p2"] and o.error_keys == ["bad"]
    assert o.errors.column(C.ERROR_STAGE).to_pylist() == ["prepare"]
    assert_batch_independent(o.images(), dict(zip(["b0", "p1", "p2"], _reference(tiny_variations_model, images,
                                                                                  [7, 8, 9]))))
    meta = {r["key"]: r for r in o.metadata.to_pylist()}
    assert meta["p1"][C.SOURCE_IMAGE_PATH] == str(tmp_path / "img" / "0.png")
    assert meta["b0"][C.SOURCE_IMAGE_PATH] is None
    assert meta["p1"]["caption"] == "y" and meta["p1"][C.PROMPT] == ""
    assert C.PRIOR_GUIDANCE_SCALE not in o.metadata.column_names and "prior_steps" not in o.metadata.column_names
    assert o.img_emb.shape == (3, 32)  # the input images' CLIP embeddings
    assert o.manifest["identity"]["settings"]["task"] == "variations"

    with pytest.raises(ConfigError, match="image variations need an image-variations repo"):
        run(RunConfig(str(table), str(tmp_path / "other"), task="variations", model=tiny_model, **VARIATION_STEPS))


@pytest.mark.slow
def test_variations_pipeline_s3_with_scores(tmp_path, ray_local, s3_bucket, tiny_variations_model):
    """Paths on S3 in a string column, output on S3, CLIP-scored against the input images' embeddings."""
    images = _inputs(2, seed=9)
    paths = []
    for i, im in enumerate(images):
        s3_bucket.fs.pipe(f"{s3_bucket.url}/images/{i}.png", _png(im))
        paths.append(f"{s3_bucket.url}/images/{i}.png")
    paths.append(f"{s3_bucket.url}/images/missing.png")
    local = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": paths, "seed": [1, 2, 3]}), local)
    s3_bucket.fs.put_file(str(local), f"{s3_bucket.url}/in/table.parquet")

    out = f"{s3_bucket.url}/out"
    stages = {**_stages(), "clip_score": StageConfig(batch_size=1)}
    cfg = RunConfig(f"{s3_bucket.url}/in/", out, task="variations", image_column="url", clip_score=True,
                    stages=stages, storage_options=s3_bucket.storage_options, **VARIATION_STEPS)
    summary = run(cfg)
    assert (summary.rows_in, summary.written, summary.errors, summary.rejected) == (3, 2, 1, 0)

    local_out = tmp_path / "out"
    s3_bucket.fs.get(f"{out}/", str(local_out), recursive=True)
    o = read_output(local_out)
    keys = {r["key"]: r for r in o.metadata.to_pylist()}
    assert {r[C.SOURCE_IMAGE_PATH] for r in keys.values()} == set(paths[:2])
    assert "missing.png' cannot be read: FileNotFoundError" in o.errors.column(C.ERROR)[0].as_py()
    by_path = {r[C.SOURCE_IMAGE_PATH]: r["key"] for r in keys.values()}
    expected = _reference(tiny_variations_model, images, [1, 2])
    assert_batch_independent(o.images(), {by_path[p]: expected[i] for i, p in enumerate(paths[:2])})
    # Scores are cosines with the input image's embedding, stored in metadata and recomputable from the shards.
    clip_emb = np.concatenate([np.load(p) for p in sorted((local_out / "clip_img_emb").glob("*.npy"))])
    ref = o.img_emb.astype(np.float32)
    cos = (clip_emb.astype(np.float32) * (ref / np.linalg.norm(ref, axis=1, keepdims=True))).sum(1)
    np.testing.assert_allclose(cos, o.metadata.column(C.CLIP_SCORE).to_numpy(), atol=5e-3)
    assert o.manifest["clip_score"]["reference"] == C.IMAGE_EMB


def test_cli_tiny_variations_model_and_refused_input(tmp_path):
    runner = CliRunner()
    made = runner.invoke(main, ["make-tiny-model", str(tmp_path / "model"), "--variations"])
    assert made.exit_code == 0 and "image-variations" in made.output
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "UnCLIPImageVariationPipeline"
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"]}), table)
    result = runner.invoke(main, ["variations", str(table), str(tmp_path / "out"), "--model", str(tmp_path / "model")])
    assert result.exit_code == 2
    assert "has no 'image' column; its columns are: prompt" in result.stderr
    assert not (tmp_path / "out").exists()


def test_oversized_images_are_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (9000, 8000)).save(buf, format="PNG")  # 72 Mpixel, a few kB compressed
    with pytest.raises(ValueError, match="image of 9000x8000 pixels exceeds the limit of 67108864 pixels"):
        decode_image(buf.getvalue())
