"""The whole pipeline on a real local Ray and a real local S3 server: layout, readback with the libraries users
have, no drift from Karlo.generate, error rows, resume and refusal to mix runs in one output."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from pipeline_utils import (
    PROMPTS,
    STEPS,
    assert_batch_independent,
    assert_float16_of,
    decode,
    file_states,
    read_output,
    reference,
    unit_rows,
    write_table,
)

from jobs.cli import EXIT_ROW_ERRORS, main
from pipeline.config import STAGE_NAMES, RunConfig, StageConfig
from pipeline.run import OutputConflict, run

pytestmark = pytest.mark.slow

# Every stage one row at a time with one actor: each row is computed exactly as generate([prompt], [seed]).
CONFIG_A = {name: StageConfig(batch_size=1) for name in STAGE_NAMES}
# Batches of other sizes and a pool of two decoders; a quarter CPU each keeps 1 CPU free on a 2-CPU Ray.
CONFIG_B = {
    "prior": StageConfig(batch_size=3),
    "decoder": StageConfig(batch_size=2, min_actors=2, max_actors=2),
    "super_res": StageConfig(batch_size=4),
}

IDS = [f"img-{i:02d}" for i in range(6)]
SEEDS = [101, 202, 303, 404, 505, 606]


def config(input_url, output_url, model, **kwargs) -> RunConfig:
    kwargs = {**STEPS, "rows_per_read_task": 2, **kwargs}
    return RunConfig(input_url=str(input_url), output_url=str(output_url), model=model, **kwargs)


@dataclasses.dataclass
class Done:
    cfg: RunConfig
    summary: object
    root: Path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_local, tiny_model) -> Done:
    """Six prompts with ids, seeds and a pass-through column, under config A, three shards of two rows."""
    tmp = tmp_path_factory.mktemp("local")
    table = write_table(tmp / "in" / "prompts.parquet", id=IDS, prompt=PROMPTS[:6], seed=SEEDS,
                        style=["photo", "art", "photo", "3d", "art", "photo"])
    cfg = config(table, tmp / "out", tiny_model, stages=CONFIG_A, rows_per_shard=2)
    return Done(cfg, run(cfg), tmp / "out")


# ---------------------------------------------------------------------------------------------- local, config A


def test_local_run_layout_counts_and_manifest(local_run):
    s = local_run.summary
    assert (s.rows_in, s.written, s.errors, s.resumed, s.images_this_run) == (6, 6, 0, 0, 6)
    assert s.complete and s.ok and not s.bad_files
    out = read_output(local_run.root)
    assert (local_run.root / "_SUCCESS").is_file()
    assert not (local_run.root / "errors").exists()
    assert sorted(out.keys) == IDS and len(set(out.keys)) == 6
    # Shards of at most rows_per_shard rows (how many is up to how Ray hands rows to the write tasks).
    assert len(out.markers) == s.shards >= 3 and sum(m["rows"] for m in out.markers) == 6
    assert all(1 <= m["rows"] <= 2 and m["errors"] == 0 for m in out.markers)
    m = out.manifest
    assert m["status"] == "complete" and m["attempts"] == 1
    assert m["counts"] == {"input_rows": 6, "written": 6, "errors": 0, "rejected": 0, "shards": s.shards}
    assert m["identity"]["settings"]["prior_steps"] == STEPS["prior_steps"]
    assert m["identity"]["model"]["weights"]["prior"]["sha256"]
    assert m["stages"]["decoder"]["batch_size"] == 1 and m["packages"]["ray"]
    # Every shard lists the same id in each folder, so the folders sort alike.
    shard_ids = sorted(mk["shard"] for mk in out.markers)
    for folder, name in [("images", "{}.tar"), ("img_emb", "img_emb_{}.npy"), ("text_emb", "text_emb_{}.npy"),
                         ("metadata", "metadata_{}.parquet")]:
        assert sorted(p.name for p in (local_run.root / folder).iterdir()) == [name.format(i) for i in shard_ids]
    # Metadata: interpreted columns, settings, pass-through columns.
    rows = {r["key"]: r for r in out.metadata.to_pylist()}
    for i, key in enumerate(IDS):
        assert rows[key]["prompt"] == PROMPTS[i] and rows[key]["seed"] == SEEDS[i] and rows[key]["id"] == key
        assert rows[key]["prior_steps"] == STEPS["prior_steps"] and rows[key]["super_res_steps"] == 2
        assert rows[key]["negative_prompt"] == "" and rows[key]["prior_guidance_scale"] == 4.0
        assert rows[key]["source"] == "prompts.parquet" and rows[key]["source_row"] == i
    assert [rows[k]["style"] for k in IDS] == ["photo", "art", "photo", "3d", "art", "photo"]


def test_local_run_reads_back_with_webdataset(local_run):
    import webdataset as wds

    tars = sorted(str(p) for p in (local_run.root / "images").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == IDS and len(set(keys)) == len(keys)
    for s in samples:
        i = IDS.index(s["__key__"])
        assert set(s) >= {"png", "json", "txt"}
        assert s["txt"].decode() == PROMPTS[i]
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["seed"] == SEEDS[i] and meta["style"]
        assert decode(s["png"]).shape == (256, 256, 3)
    # A sample's members are adjacent in its tar (webdataset groups consecutive members by key).
    for path in tars:
        with tarfile.open(path) as tar:
            stems = [m.name.rsplit(".", 1)[0] for m in tar.getmembers()]
        runs = [k for i, k in enumerate(stems) if i == 0 or stems[i - 1] != k]
        assert len(runs) == len(set(runs)) and len(stems) == 3 * len(runs)


def test_local_run_opens_with_webdataset_from_its_shard_list(local_run):
    """images.txt lists every committed tar, so webdataset needs no glob (it takes none) and no brace range."""
    import webdataset as wds

    root = local_run.root
    listed = (root / "images.txt").read_text().split()
    assert listed == sorted(f"images/{p.name}" for p in (root / "images").glob("*.tar"))
    samples = list(wds.WebDataset([f"{root}/{name}" for name in open(f"{root}/images.txt").read().split()],
                                  shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == IDS


def test_local_run_loads_with_datasets_by_its_dataset_card(local_run, tmp_path):
    """README.md's configs keep metadata (the default here: images are in tars) apart from other tables."""
    import datasets

    assert datasets.get_dataset_config_names(str(local_run.root)) == ["metadata"]
    ds = datasets.load_dataset(str(local_run.root), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(ds["key"]) == IDS and "style" in ds.column_names


def test_local_run_reads_back_with_embedding_reader(local_run):
    from embedding_reader import EmbeddingReader

    out = read_output(local_run.root)
    for folder, expected in [("img_emb", out.img_emb), ("text_emb", out.text_emb)]:
        reader = EmbeddingReader(str(local_run.root / folder), file_format="npy")
        assert (reader.count, reader.dimension) == (6, 32)
        got = np.concatenate([batch for batch, _ in reader(batch_size=4, show_progress=False)])
        np.testing.assert_array_equal(got, expected.astype(np.float32))
    reader = EmbeddingReader(str(local_run.root / "img_emb"), file_format="parquet_npy",
                             metadata_folder=str(local_run.root / "metadata"), meta_columns=["key", "prompt"])
    batches = list(reader(batch_size=4, show_progress=False))
    keys = [k for _, meta in batches for k in meta["key"]]
    assert keys == out.keys
    np.testing.assert_array_equal(np.concatenate([b for b, _ in batches]), out.img_emb.astype(np.float32))


def test_embeddings_are_unit_rows_for_embedding_reader(local_run):
    """clip-retrieval and autofaiss take img_emb/ and text_emb/ rows as unit vectors (inner product = cosine); the
    prior's output has norms far from 1 and stays in raw_img_emb/."""
    from embedding_reader import EmbeddingReader

    for folder in ("img_emb", "text_emb"):
        reader = EmbeddingReader(str(local_run.root / folder), file_format="npy")
        rows = np.concatenate([batch for batch, _ in reader(batch_size=4, show_progress=False)])
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=2e-3)
    raw = read_output(local_run.root).raw_img_emb.astype(np.float32)
    assert raw.shape == (6, 32) and np.abs(np.linalg.norm(raw, axis=1) - 1.0).min() > 0.1


def test_config_a_is_bitwise_generate(local_run, tiny_model):
    """No drift: each row equals Karlo.generate([prompt], [seed]) with the actors' one torch thread."""
    images, img_emb, text_emb = reference(tiny_model, PROMPTS[:6], SEEDS, threads=1)
    out = read_output(local_run.root)
    got = out.images()
    for i, key in enumerate(IDS):
        np.testing.assert_array_equal(got[key], images[i], err_msg=key)
    # Embeddings are stored as float16, row-aligned with the metadata.
    order = [IDS.index(k) for k in out.keys]
    # img_emb/ and text_emb/ hold unit rows; raw_img_emb/ the prior's output as the decoder took it.
    np.testing.assert_array_equal(out.raw_img_emb, img_emb[order].astype(np.float16))
    np.testing.assert_array_equal(out.img_emb, unit_rows(img_emb[order]).astype(np.float16))
    np.testing.assert_array_equal(out.text_emb, unit_rows(text_emb[order]).astype(np.float16))
    assert out.img_emb.dtype == np.float16 and out.img_emb.dtype.byteorder in "<="


# ---------------------------------------------------------------------------------------------- S3, config B


def test_s3_run_parquet_images_config_b(s3_bucket, ray_local, tiny_model, tmp_path, monkeypatch):
    """Input and output on S3; Parquet images read back by datasets, embeddings by embedding-reader;
    batch sizes 3/2/4 and two decoders change no image beyond float rounding."""
    prompts, seeds = PROMPTS[:8], list(range(700, 708))
    local = write_table(tmp_path / "prompts.parquet", prompt=prompts, seed=seeds)
    s3_bucket.fs.put_file(str(local), f"{s3_bucket.url[5:]}/in/prompts.parquet")
    cfg = config(f"{s3_bucket.url}/in/prompts.parquet", f"{s3_bucket.url}/out", tiny_model, stages=CONFIG_B,
                 rows_per_shard=4, rows_per_read_task=3, output_format="parquet",
                 storage_options=s3_bucket.storage_options)
    s = run(cfg)
    assert (s.rows_in, s.written, s.errors, s.images_this_run) == (8, 8, 0, 8) and s.ok
    assert 2 <= s.shards <= 8  # how rows fall into write tasks is Ray's choice; a shard never exceeds 4 rows

    # Read straight from the bucket, as users do: embedding-reader goes through fsspec, which (via botocore)
    # takes the endpoint from AWS_ENDPOINT_URL.
    import s3fs
    from embedding_reader import EmbeddingReader

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    reader = EmbeddingReader(f"{s3_bucket.url}/out/img_emb", file_format="parquet_npy",
                             metadata_folder=f"{s3_bucket.url}/out/metadata", meta_columns=["key", "seed"])
    batches = list(reader(batch_size=8, show_progress=False))
    s3_img_emb = np.concatenate([b for b, _ in batches])
    s3_seeds = [int(v) for _, meta in batches for v in meta["seed"]]

    s3_bucket.fs.get(f"{s3_bucket.url[5:]}/out", str(tmp_path / "out"), recursive=True)
    root = tmp_path / "out"
    out = read_output(root)
    assert (root / "_SUCCESS").is_file() and out.manifest["counts"]["written"] == 8
    assert all(m["rows"] <= 4 for m in out.markers) and len(out.markers) == s.shards
    assert out.manifest["stages"]["decoder"]["min_actors"] == 2
    assert out.manifest["identity"]["input"] == f"{s3_bucket.url}/in/prompts.parquet"
    assert "endpoint" not in json.dumps(out.manifest)  # storage options stay out of the manifest
    assert sorted(out.metadata.column("seed").to_pylist()) == seeds and len(set(out.keys)) == 8
    assert s3_seeds == out.metadata.column("seed").to_pylist()
    np.testing.assert_array_equal(s3_img_emb, out.img_emb.astype(np.float32))

    import datasets

    files = sorted(str(p) for p in (root / "images").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image) and ds.num_rows == 8
    loaded = {row["key"]: np.asarray(row["image"].convert("RGB")) for row in ds}
    assert loaded.keys() == set(out.keys)

    # The run root opens as it is: its dataset card makes the Parquet images the default config.
    card = datasets.load_dataset(str(root), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(card.features["image"], datasets.Image) and sorted(card["key"]) == sorted(out.keys)
    assert {row["key"]: np.asarray(row["image"].convert("RGB")) for row in card}.keys() == loaded.keys()
    assert datasets.load_dataset(str(root), "metadata", split="train", cache_dir=str(tmp_path / "hf")).num_rows == 8
    assert (root / "images.txt").read_text().split() == [f"images/{p.name}" for p in
                                                         sorted((root / "images").glob("*.parquet"))]

    images, img_emb, text_emb = reference(tiny_model, prompts, seeds, threads=1)
    by_seed = {seed: i for i, seed in enumerate(seeds)}
    rows = [by_seed[seed] for seed in out.metadata.column("seed").to_pylist()]
    assert_batch_independent(loaded, {key: images[i] for key, i in zip(out.keys, rows)})
    assert_float16_of(out.raw_img_emb, img_emb[rows])
    assert_float16_of(out.img_emb, unit_rows(img_emb[rows]))
    assert_float16_of(out.text_emb, unit_rows(text_emb[rows]))


# ---------------------------------------------------------------------------------------------- bad rows


def test_invalid_rows_become_errors_and_exit_code_3(tmp_path, ray_local, tiny_model):
    prompts = ["a red frog", "", None, "a blue whale", "a green door", "a lighthouse", "   ", "a violin"]
    seeds = [1, 2, 3, -5, 4, 5, 6, 7]
    prior = [4.0, 4.0, 4.0, 4.0, float("nan"), None, 4.0, 2.0]
    table = write_table(tmp_path / "in.parquet", prompt=prompts, seed=seeds, prior_guidance_scale=prior)
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "generate", str(table), str(out_dir), "--model", tiny_model, "--prior-steps", "3", "--decoder-steps", "3",
        "--super-res-steps", "2", "--rows-per-shard", "3",
    ])
    assert result.exit_code == EXIT_ROW_ERRORS, result.output
    assert "Traceback" not in result.output
    assert "rows read        8" in result.output and "error rows       5  -> see errors/" in result.output

    out = read_output(out_dir)
    assert sorted(out.metadata.column("prompt").to_pylist()) == ["a lighthouse", "a red frog", "a violin"]
    errors = {r["source_row"]: r for r in out.errors.to_pylist()}
    assert sorted(errors) == [1, 2, 3, 4, 6]
    assert errors[1]["error"] == "prompt is empty" and errors[1]["prompt"] == ""
    assert errors[2]["error"] == "prompt is null" and errors[2]["prompt"] is None
    assert errors[3]["error"] == "seed must be an integer in [0, 2**63), got -5"
    assert errors[4]["error"] == "prior_guidance_scale must be a finite number >= 0, got nan"
    assert errors[6]["error"] == "prompt is only whitespace"
    assert {r["error_stage"] for r in errors.values()} == {"prepare"}
    # A null guidance scale takes the run's default; the row is good.
    rows = {r["prompt"]: r for r in out.metadata.to_pylist()}
    assert rows["a lighthouse"]["prior_guidance_scale"] == 4.0 and rows["a violin"]["prior_guidance_scale"] == 2.0
    # rows in = written + errors, and keys are unique across both.
    keys = out.keys + out.error_keys
    assert len(keys) == len(set(keys)) == 8
    counts = out.manifest["counts"]
    assert (counts["input_rows"], counts["written"], counts["errors"]) == (8, 3, 5)
    assert sum(m["rows"] + m["errors"] for m in out.markers) == 8 and all(m["rows"] + m["errors"] <= 3 for m in out.markers)
    assert out.manifest["status"] == "complete" and (out_dir / "_SUCCESS").is_file()
    assert out.img_emb.shape == (3, 32) and out.text_emb.shape == (3, 32)


# ---------------------------------------------------------------------------------------------- resume


def copy_output(done: Done, dest: Path) -> Path:
    shutil.copytree(done.root, dest, copy_function=shutil.copy2)  # keeps mtimes
    return dest


def test_resume_regenerates_only_the_uncommitted_shard(local_run, tmp_path):
    root = copy_output(local_run, tmp_path / "out")
    cfg = dataclasses.replace(local_run.cfg, output_url=str(root))
    before = file_states(root)
    markers = sorted((root / "_commits").glob("*.json"))
    victim = json.loads(markers[1].read_text())
    victim_files = {f"_commits/{victim['shard']}.json", *victim["files"]}
    # An interrupted run: the shard's files were written, its marker was not.
    markers[1].unlink()
    (root / "_SUCCESS").unlink()

    s = run(cfg)
    n = victim["rows"]
    assert (s.rows_in, s.written, s.errors, s.resumed, s.images_this_run) == (6, 6, 0, 6 - n, n)
    assert s.complete and (root / "_SUCCESS").is_file()
    after = file_states(root)
    untouched = {p for p in before if p not in victim_files and not p.startswith(("manifest", "_SUCCESS"))}
    assert {p: after[p] for p in untouched} == {p: before[p] for p in untouched}
    # The missing rows were generated again, as the same shard with the same bytes (config A is exact).
    assert after.keys() == before.keys()
    for p in victim_files:
        assert after[p][1] == before[p][1], p
    out = read_output(root)
    assert sorted(out.keys) == IDS and len(out.keys) == 6
    assert out.manifest["attempts"] == 2 and out.manifest["counts"]["written"] == 6
    last = out.manifest["last_attempt"]
    assert last["images"] == n
    # The start-up (Ray, actor processes, model loads) ends when the first batch begins, within the attempt.
    assert 0 < last["start_up_seconds"] < last["seconds"]
    assert last["images_per_second_after_start_up"] == pytest.approx(
        n / (last["seconds"] - last["start_up_seconds"]), rel=0.01)

    # A rerun after success finds nothing to do and writes no shard file.
    again = run(cfg)
    assert (again.written, again.resumed, again.images_this_run, again.shards) == (6, 6, 0, s.shards)
    final = file_states(root)
    shard_files = [p for p in after if not p.startswith(("manifest", "_SUCCESS"))]
    assert {p: final[p] for p in shard_files} == {p: after[p] for p in shard_files}
    assert final.keys() == after.keys()


def test_uncommitted_leftovers_are_removed(local_run, tmp_path):
    root = copy_output(local_run, tmp_path / "out")
    stray = [root / "images" / ("0" * 16 + ".tar"), root / "metadata" / ".tmp-metadata_x.parquet-0123456789ab"]
    for p in stray:
        p.write_bytes(b"partial")
    s = run(dataclasses.replace(local_run.cfg, output_url=str(root)))
    assert s.images_this_run == 0 and s.complete
    assert not any(p.exists() for p in stray)


# ---------------------------------------------------------------------------------------------- conflicts


def test_run_of_the_older_layout_is_refused_unless_overwrite(local_run, tmp_path):
    """A run written before img_emb/ and text_emb/ held unit rows has no layout: resuming it would mix both kinds."""
    root = copy_output(local_run, tmp_path / "out")
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["identity"]["layout"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    cfg = dataclasses.replace(local_run.cfg, output_url=str(root))
    with pytest.raises(OutputConflict, match=r"different settings \(layout: None -> 2\)"):
        run(cfg)


def test_rerun_with_other_settings_is_refused_unless_overwrite(local_run, tmp_path, tiny_model):
    root = copy_output(local_run, tmp_path / "out")
    before = file_states(root)
    cfg = dataclasses.replace(local_run.cfg, output_url=str(root))

    with pytest.raises(OutputConflict) as e:
        run(dataclasses.replace(cfg, prior_steps=4))
    assert "already holds a run with different settings" in str(e.value)
    assert "settings.prior_steps: 3 -> 4" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(OutputConflict, match=r"settings.decoder_guidance_scale: 8.0 -> 6.0"):
        run(dataclasses.replace(cfg, decoder_guidance_scale=6.0))
    with pytest.raises(OutputConflict, match=r"settings.image_format: 'png' -> 'jpeg'"):
        run(dataclasses.replace(cfg, image_format="jpeg"))
    other_input = write_table(tmp_path / "other.parquet", prompt=["a small boat", "a tall tree"], seed=[1, 2])
    with pytest.raises(OutputConflict, match=r"input: .*prompts.parquet' -> .*other.parquet'"):
        run(dataclasses.replace(cfg, input_url=str(other_input)))
    assert file_states(root) == before  # nothing touched
    # Resources are not part of a run's identity: other batch sizes continue the same output.
    same = run(dataclasses.replace(cfg, stages=CONFIG_B))
    assert same.images_this_run == 0 and same.complete

    s = run(dataclasses.replace(cfg, input_url=str(other_input), prior_steps=4, overwrite=True))
    assert (s.rows_in, s.written, s.resumed, s.images_this_run) == (2, 2, 0, 2) and s.complete
    out = read_output(root)
    assert sorted(out.metadata.column("prompt").to_pylist()) == ["a small boat", "a tall tree"]
    assert out.manifest["identity"]["settings"]["prior_steps"] == 4 and out.manifest["attempts"] == 1
    # Run-root files (manifest, _SUCCESS, the shard list and dataset card) are rewritten; no shard file remains.
    run_files = ("manifest", "_SUCCESS", "README.md", "images.txt")
    assert not (set(file_states(root)) & {p for p in before if not p.startswith(run_files)})


# ---------------------------------------------------------------------------------------------- per-row settings


def test_per_row_settings_are_honoured_and_written(tmp_path, ray_local, tiny_model):
    prompts = PROMPTS[:4]
    seeds = [11, 12, 13, 14]
    negative = ["blurry, low quality", None, "", "text, watermark"]
    prior = [2.0, 1.0, None, 6.0]
    decoder = [5.0, 1.0, 3.0, None]
    table = write_table(tmp_path / "in.parquet", prompt=prompts, seed=seeds, negative_prompt=negative,
                        prior_guidance_scale=prior, decoder_guidance_scale=decoder)
    cfg = config(table, tmp_path / "out", tiny_model, stages=CONFIG_A, prior_guidance_scale=3.0,
                 decoder_guidance_scale=7.0)
    assert run(cfg).ok

    # Nulls take the run's settings.
    negative = [n or "" for n in negative]
    prior = [3.0 if p is None else p for p in prior]
    decoder = [7.0 if d is None else d for d in decoder]
    images, img_emb, _ = reference(tiny_model, prompts, seeds, threads=1, negative_prompts=negative,
                                   prior_guidance_scale=prior, decoder_guidance_scale=decoder)
    out = read_output(tmp_path / "out")
    got = out.images()
    rows = {r["key"]: r for r in out.metadata.to_pylist()}
    for key, row in rows.items():
        i = row["source_row"]
        assert (row["negative_prompt"], row["prior_guidance_scale"], row["decoder_guidance_scale"]) == (
            negative[i], prior[i], decoder[i])
        np.testing.assert_array_equal(got[key], images[i], err_msg=key)
    order = [rows[k]["source_row"] for k in out.keys]
    np.testing.assert_array_equal(out.raw_img_emb, img_emb[order].astype(np.float16))
    # The same rows with the run defaults give other images: the columns were not ignored.
    plain, _, _ = reference(tiny_model, prompts[:1], seeds[:1], threads=1, prior_guidance_scale=3.0,
                            decoder_guidance_scale=7.0)
    key0 = next(k for k, r in rows.items() if r["source_row"] == 0)
    assert (plain[0] == got[key0]).mean() < 0.99
    pq.read_table(next((tmp_path / "out" / "metadata").glob("*.parquet")))  # plain Parquet for any reader
