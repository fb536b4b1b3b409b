"""The shard sink: layout, readback with downstream tools, atomicity and resume helpers, locally and on S3."""

from __future__ import annotations

import datetime
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray.data.datasource.datasink import WriteResult
from ray.data.extensions import ArrowTensorArray

from pipeline import columns as C
from pipeline import shards, sinks
from pipeline.encode import encode_images
from pipeline.outputs import CommittedRun, committed_shards
from pipeline.sinks import KarloDatasink, remove_uncommitted

DIM = 8
SIZE = 16
SETTINGS = {"prior_steps": 25, "model": "tiny"}


class Output:
    """An output location (local folder or S3 prefix) plus raw access for assertions."""

    def __init__(self, url, fs, root, storage_options):
        self.url, self.fs, self.root, self.storage_options = url, fs, root, storage_options

    def sink(self, **kwargs):
        kwargs.setdefault("settings", SETTINGS)
        return KarloDatasink(self.url, storage_options=self.storage_options, **kwargs)

    def files(self) -> dict[str, bytes]:
        """Every object under the root, hidden ones included, relative path -> content."""
        self.fs.invalidate_cache()
        return {p[len(self.root) + 1 :]: self.fs.cat_file(p) for p in self.fs.find(self.root)}

    def read(self, rel):
        return self.fs.cat_file(f"{self.root}/{rel}")

    def parquet(self, rel):
        return pq.read_table(io.BytesIO(self.read(rel)))


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        import fsspec

        root = str(tmp_path / "out")
        return Output(root, fsspec.filesystem("file"), root, None)
    bucket = request.getfixturevalue("s3_bucket")
    return Output(f"{bucket.url}/run", bucket.fs, f"{bucket.url[5:]}/run", bucket.storage_options)


def make_block(start, n, errors=(), seed=0):
    """A block as the super-res stage hands it on: scalars, pass-through columns, Ray tensor columns.

    ``errors`` are in-block row indices that carry an error (zero tensors, as the stages leave them).
    """
    rng = np.random.default_rng(seed)
    rows = range(start, start + n)
    error = [("prompt is empty" if i - start in errors else "") for i in rows]
    image = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    img_emb = rng.standard_normal((n, DIM)).astype(np.float32)
    text_emb = rng.standard_normal((n, DIM)).astype(np.float32)
    for i in errors:
        image[i], img_emb[i], text_emb[i] = 0, 0, 0
    table = pa.table(
        {
            C.PROMPT: [f"a photo of thing {i}" for i in rows],
            C.ID: pa.array(list(rows), pa.int64()),
            C.SOURCE: ["prompts/part-0.parquet"] * n,
            C.SOURCE_ROW: pa.array(list(rows), pa.int64()),
            C.KEY: [f"k{i:05d}" for i in rows],
            C.SEED: pa.array([1000 + i for i in rows], pa.int64()),
            C.NEGATIVE_PROMPT: [""] * n,
            C.PRIOR_GUIDANCE_SCALE: [4.0] * n,
            C.DECODER_GUIDANCE_SCALE: [8.0] * n,
            C.ERROR: error,
            C.ERROR_STAGE: ["prepare" if e else "" for e in error],
            C.PROMPT_TRUNCATED: [i % 3 == 0 for i in rows],
            "score": pa.array([i / 2 for i in rows], pa.float32()),
            "tags": [["t", str(i)] for i in rows],
            "meta": [{"a": i, "b": f"x{i}"} for i in rows],
            "created": pa.array([datetime.datetime(2024, 1, 1, 0, 0, i) for i in rows], pa.timestamp("us")),
            "blob": pa.array([bytes([i % 256]) for i in rows], pa.binary()),
        }
    )
    tensors = {C.IMAGE: image, C.IMAGE_EMB: img_emb, C.TEXT_EMB: text_emb, "clip_emb": img_emb[:, :4]}
    for name, array in tensors.items():
        table = table.append_column(name, ArrowTensorArray.from_numpy(array))
    return table.append_column(C.TEXT_HIDDEN, ArrowTensorArray.from_numpy(np.ones((n, 2, 3), np.float32)))


def sample_blocks():
    """13 rows, 3 of them errors, in two blocks whose boundary does not fall on a shard boundary."""
    return [make_block(0, 7, errors=(2,), seed=1), make_block(7, 6, errors=(0, 1), seed=2)]


def expected_rows(blocks):
    """Good rows of ``blocks`` in input order: key -> (row dict, image, img_emb, text_emb)."""
    out = {}
    for block in blocks:
        images = block.column(C.IMAGE).chunk(0).to_numpy()
        img_emb = block.column(C.IMAGE_EMB).chunk(0).to_numpy()
        text_emb = block.column(C.TEXT_EMB).chunk(0).to_numpy()
        scalars = block.select([c for c in block.column_names if c not in shards.TENSOR_COLUMNS])
        for i, row in enumerate(scalars.to_pylist()):
            if not row[C.ERROR]:
                out[row[C.KEY]] = (row, images[i], img_emb[i], text_emb[i])
    return out


def write(sink, blocks):
    """Run the sink as one write task followed by the driver's completion hook."""
    markers = sink.write(iter(blocks), ctx=None)
    sink.on_write_complete(WriteResult(num_rows=0, size_bytes=0, write_returns=[markers]))
    return markers


def shard_ids_in(files, folder):
    prefix = {"images": "", "img_emb": "img_emb_", "text_emb": "text_emb_"}.get(folder, f"{folder}_")
    names = sorted(p.split("/", 1)[1] for p in files if p.startswith(folder + "/"))
    return [name[len(prefix) :].split(".")[0] for name in names]


def test_layout_counts_and_markers(output):
    blocks = sample_blocks()
    markers = write(output.sink(rows_per_shard=5), blocks)
    files = output.files()

    assert [(m["rows"], m["errors"]) for m in markers] == [(4, 1), (3, 2), (3, 0)]
    assert output.sink().result is None
    ids = [m["shard"] for m in markers]
    assert all(len(x) == 16 and int(x, 16) >= 0 for x in ids)
    expected = sorted(
        [f"images/{x}.tar" for x in ids]
        + [f"img_emb/img_emb_{x}.npy" for x in ids]
        + [f"text_emb/text_emb_{x}.npy" for x in ids]
        + [f"raw_img_emb/raw_img_emb_{x}.npy" for x in ids]
        + [f"metadata/metadata_{x}.parquet" for x in ids]
        + [f"errors/errors_{x}.parquet" for x in ids[:2]]
        + [f"_commits/{x}.json" for x in ids]
    )
    assert sorted(files) == expected
    # Names sort identically in every folder, so embedding-reader zips the right files.
    for folder in ("images", "img_emb", "text_emb", "raw_img_emb", "metadata"):
        assert shard_ids_in(files, folder) == sorted(ids)

    assert committed_shards(output.url, output.storage_options) == sorted(markers, key=lambda m: m["shard"])
    places = []
    for marker in markers:
        on_disk = json.loads(output.read(f"_commits/{marker['shard']}.json"))
        places += on_disk.pop("input_rows")
        assert on_disk == marker
        assert marker["bytes"] == sum(len(files[f]) for f in marker["files"])
        assert marker["files"][-1].startswith(("metadata/", "errors/"))
    # Each marker lists the input rows its shard holds; together, every row written, once.
    rows = sorted((source, row) for source, sample, flat in places for a, b in zip(flat[::2], flat[1::2])
                  for row in range(a, b))
    assert rows == sorted((s, r) for b in blocks
                          for s, r in zip(b.column(C.SOURCE).to_pylist(), b.column(C.SOURCE_ROW).to_pylist()))

    good = expected_rows(blocks)
    errors = pa.concat_tables([output.parquet(f"errors/errors_{x}.parquet") for x in ids[:2]])
    assert errors.column_names == [C.KEY, C.ID, C.SOURCE, C.SOURCE_ROW, C.PROMPT, C.SEED, C.ERROR_STAGE, C.ERROR]
    assert errors.column(C.KEY).to_pylist() == ["k00002", "k00007", "k00008"]
    assert set(errors.column(C.ERROR_STAGE).to_pylist()) == {"prepare"}
    total_bytes = sum(m["bytes"] for m in markers)
    assert sinks.SinkResult.from_markers(markers) == sinks.SinkResult(rows=10, errors=3, shards=3, bytes=total_bytes)
    assert len(good) + errors.num_rows == sum(b.num_rows for b in blocks)


def test_metadata_and_embeddings_are_row_aligned(output):
    blocks = sample_blocks()
    markers = write(output.sink(rows_per_shard=5), blocks)
    good = expected_rows(blocks)
    seen = []
    for marker in markers:
        x = marker["shard"]
        meta = output.parquet(f"metadata/metadata_{x}.parquet")
        img = np.load(io.BytesIO(output.read(f"img_emb/img_emb_{x}.npy")))
        txt = np.load(io.BytesIO(output.read(f"text_emb/text_emb_{x}.npy")))
        raw = np.load(io.BytesIO(output.read(f"raw_img_emb/raw_img_emb_{x}.npy")))
        assert img.dtype == np.dtype("<f2") and txt.dtype == np.dtype("<f2")
        assert img.shape == txt.shape == (meta.num_rows, DIM) and img.flags.c_contiguous
        assert meta.column_names == [
            C.KEY, C.PROMPT, C.SEED, C.NEGATIVE_PROMPT, C.PRIOR_GUIDANCE_SCALE, C.DECODER_GUIDANCE_SCALE,
            C.PROMPT_TRUNCATED, C.ID, C.SOURCE, C.SOURCE_ROW, "prior_steps", "model",
            "score", "tags", "meta", "created", "blob", "clip_emb",
        ]  # fmt: skip
        assert meta.schema.field("created").type == pa.timestamp("us")
        for i, row in enumerate(meta.to_pylist()):
            source, _, emb, text = good[row[C.KEY]]
            assert row["prior_steps"] == 25 and row["model"] == "tiny"
            assert {k: row[k] for k in source if k in row and k != "clip_emb"} == {
                k: v for k, v in source.items() if k in row and k != "clip_emb"
            }
            assert row["clip_emb"] == pytest.approx(emb[:4].tolist())
            # img_emb/ and text_emb/: unit rows (clip-retrieval's layout); raw_img_emb/: the rows as given.
            np.testing.assert_allclose(img[i].astype(np.float32), emb / np.linalg.norm(emb), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(txt[i].astype(np.float32), text / np.linalg.norm(text), rtol=1e-3, atol=1e-4)
            np.testing.assert_array_equal(raw[i], emb.astype(np.float16))
            seen.append(row[C.KEY])
    assert seen == list(good)  # input order kept across shards


def open_s3_for_webdataset(monkeypatch, output):
    import webdataset

    def gopen_s3(url, mode="rb", bufsize=8192):
        return output.fs.open(url, mode)

    monkeypatch.setitem(webdataset.gopen_schemes, "s3", gopen_s3)


def test_webdataset_reads_back_tars(output, monkeypatch):
    import webdataset

    open_s3_for_webdataset(monkeypatch, output)
    blocks = sample_blocks()
    markers = write(output.sink(rows_per_shard=5), blocks)
    urls = [f"{output.url}/images/{x}" for x in sorted(m["shard"] for m in markers)]
    good = expected_rows(blocks)
    samples = list(webdataset.WebDataset([u + ".tar" for u in urls], shardshuffle=False).decode("rgb8"))
    assert sorted(s["__key__"] for s in samples) == sorted(good)
    for sample in samples:
        row, image, _, _ = good[sample["__key__"]]
        np.testing.assert_array_equal(sample["png"], image)
        assert sample["txt"] == row[C.PROMPT]
        assert sample["json"][C.SEED] == row[C.SEED] and sample["json"]["model"] == "tiny"
        assert sample["json"]["created"] == "2024-01-01T00:00:" + f"{row[C.SOURCE_ROW]:02d}"
        assert {name for name in sample if not name.startswith("__")} == {"png", "txt", "json"}


def test_tar_members_are_adjacent_sorted_with_fixed_owner_and_mtime(tmp_path):
    output = str(tmp_path)
    (marker,) = write(KarloDatasink(output, rows_per_shard=10, image_format="jpeg"), [make_block(0, 3)])
    with tarfile.open(f"{output}/images/{marker['shard']}.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"k0000{i}.{ext}" for i in range(3) for ext in ("jpg", "json", "txt")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


@pytest.mark.parametrize("output_format,image_format", [("webdataset", "png"), ("parquet", "webp")])
def test_blocks_from_the_encode_step_write_the_same_files(tmp_path, output_format, image_format):
    """The pipeline encodes images before the write (pipeline.encode); the shards are byte for byte those of
    the sink encoding the arrays itself, error rows included."""
    blocks = [make_block(0, 6, errors=(1, 4)), make_block(6, 5, seed=1)]
    encoded = [encode_images(block, image_format=image_format) for block in blocks]
    assert encoded[0].schema.field(C.IMAGE).type == pa.large_binary()
    assert encoded[0].column(C.IMAGE)[1].as_py() == b""  # error rows are not encoded
    settings = dict(output_format=output_format, image_format=image_format, rows_per_shard=4, settings=SETTINGS)
    write(KarloDatasink(str(tmp_path / "arrays"), **settings), blocks)
    write(KarloDatasink(str(tmp_path / "encoded"), **settings), encoded)
    files = {p.relative_to(tmp_path / "arrays"): p.read_bytes() for p in (tmp_path / "arrays").rglob("*.*")}
    assert len(files) > 10
    assert files == {p.relative_to(tmp_path / "encoded"): p.read_bytes() for p in (tmp_path / "encoded").rglob("*.*")}


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_shard_bytes_do_not_depend_on_how_rows_were_batched_or_ordered(tmp_path, output_format):
    """Ray Data does not keep row order between stages: the same rows give the same shard, whatever their batches
    and their order of arrival."""
    block = make_block(0, 5, errors=(3,))
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    write(KarloDatasink(str(whole), output_format=output_format), [block])
    write(KarloDatasink(str(pieces), output_format=output_format), [block.slice(4, 1), block.slice(1, 3),
                                                                    block.slice(0, 1)])
    files = {p.relative_to(whole): p.read_bytes() for p in whole.rglob("*.*")}
    assert len(files) == 7  # images, img_emb, text_emb, raw_img_emb, metadata, errors, the marker
    assert files == {p.relative_to(pieces): p.read_bytes() for p in pieces.rglob("*.*")}


def test_empty_blocks_without_columns_are_skipped(tmp_path):
    """Ray Data hands on empty blocks, some without any column, where a map emitted no rows (e.g. a resumed run's
    prepare step dropped every row of a read task); the encoder and the sink pass over them."""
    empty = pa.table({})
    assert encode_images(empty, image_format="png") is empty
    blocks = [empty, make_block(0, 2), make_block(2, 3).slice(0, 0), empty]
    (marker,) = write(KarloDatasink(str(tmp_path), rows_per_shard=10), blocks)
    assert (marker["rows"], marker["errors"]) == (2, 0)


@pytest.mark.parametrize("n", [1, 7, 20])
def test_webdataset_bytes_are_those_of_tarfile_stream_mode(n):
    """The direct tar writer gives the bytes tarfile's own stream mode writes for the same members, including
    pax headers for names over 100 bytes and non-ASCII prompts."""
    block = make_block(0, n)
    long_keys = [("k" * 120 if i == 0 else f"k{i:05d}") for i in range(n)]
    block = block.set_column(block.schema.get_field_index(C.KEY), C.KEY, pa.array(long_keys))
    block = block.set_column(block.schema.get_field_index(C.PROMPT), C.PROMPT,
                             pa.array([f"un chat très mignon {i} 🐈" for i in range(n)]))
    rows = shards.rows_from_block(block)
    metadata = shards.metadata_table(rows, SETTINGS)
    ours = io.BytesIO()
    shards.write_webdataset(ours, metadata, rows.tensor(C.IMAGE), "png")

    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for row, image in zip(metadata.to_pylist(), rows.tensor(C.IMAGE)):
            members = {
                f"{row[C.KEY]}.png": shards.encode_image(image, "png"),
                f"{row[C.KEY]}.json": json.dumps(row, ensure_ascii=False, default=shards._json_value).encode(),
                f"{row[C.KEY]}.txt": row[C.PROMPT].encode(),
            }
            for name in sorted(members):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(members[name]), 0, 0o644
                tar.addfile(info, io.BytesIO(members[name]))
    assert ours.getvalue() == expected.getvalue()


def test_rewriting_the_same_rows_gives_the_same_names_and_bytes(output):
    write(output.sink(rows_per_shard=5), sample_blocks())
    first = output.files()
    write(output.sink(rows_per_shard=5), sample_blocks())  # a retried write task
    assert output.files() == first
    # A resumed run sees other rows, so its shards get other names.
    (marker,) = write(output.sink(rows_per_shard=5), [make_block(20, 4)])
    assert f"_commits/{marker['shard']}.json" not in first


def test_hugging_face_datasets_decodes_parquet_images(output, tmp_path):
    import datasets

    blocks = sample_blocks()
    write(output.sink(rows_per_shard=5, output_format="parquet"), blocks)
    images = sorted(p for p in output.files() if p.startswith("images/"))
    assert len(images) == 3 and all(p.endswith(".parquet") for p in images)
    ds = datasets.load_dataset(
        "parquet",
        data_files=f"{output.url}/images/*.parquet",
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
        storage_options=output.storage_options,
    )
    assert isinstance(ds.features[C.IMAGE], datasets.Image)
    assert ds.features[C.SEED] == datasets.Value("int64")
    good = expected_rows(blocks)
    assert sorted(ds[C.KEY]) == sorted(good)
    for row in ds:
        source, image, _, _ = good[row[C.KEY]]
        assert isinstance(row[C.IMAGE], Image.Image) and row[C.PROMPT] == source[C.PROMPT]
        np.testing.assert_array_equal(np.asarray(row[C.IMAGE]), image)  # PNG is lossless


def test_embedding_reader_zips_npy_with_metadata(output, monkeypatch):
    import fsspec
    from embedding_reader import EmbeddingReader

    if output.storage_options:  # embedding-reader opens URLs without options: use fsspec's config defaults
        monkeypatch.setitem(fsspec.config.conf, "s3", output.storage_options)
    blocks = sample_blocks()
    write(output.sink(rows_per_shard=5), blocks)
    good = expected_rows(blocks)

    reader = EmbeddingReader(f"{output.url}/img_emb", file_format="npy")
    assert (reader.count, reader.dimension) == (len(good), DIM)
    (embeddings, _), *rest = list(reader(batch_size=100, start=0, end=reader.count))
    assert not rest and embeddings.shape == (len(good), DIM)

    reader = EmbeddingReader(
        f"{output.url}/text_emb",
        file_format="parquet_npy",
        embedding_column="embedding",
        metadata_folder=f"{output.url}/metadata",
        meta_columns=[C.KEY],
    )
    (embeddings, meta), *rest = list(reader(batch_size=100, start=0, end=reader.count))
    assert not rest and len(meta) == len(good)
    for emb, key in zip(embeddings, meta[C.KEY]):
        text = good[key][3]
        np.testing.assert_allclose(emb, text / np.linalg.norm(text), rtol=1e-3, atol=1e-4)


def encoder_failing_after(calls):
    state = {"left": calls}
    real = shards.encode_image

    def encode(array, fmt):
        if state["left"] == 0:
            raise RuntimeError("encoder crashed")
        state["left"] -= 1
        return real(array, fmt)

    return encode


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_failure_mid_shard_leaves_no_visible_object(output, monkeypatch, output_format):
    monkeypatch.setattr(shards, "encode_image", encoder_failing_after(2))
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write(output.sink(rows_per_shard=5, output_format=output_format), sample_blocks())
    assert output.files() == {}  # no truncated tar, no temp file, no marker
    if output.storage_options:
        assert output.fs.list_multipart_uploads(output.root.split("/")[0]) == []


def test_failure_in_a_later_shard_keeps_the_committed_ones(output, monkeypatch):
    monkeypatch.setattr(shards, "encode_image", encoder_failing_after(6))  # shard 1 encodes 4, shard 2 fails
    with pytest.raises(RuntimeError):
        write(output.sink(rows_per_shard=5), sample_blocks())
    (marker,) = committed_shards(output.url, output.storage_options)
    assert sorted(output.files()) == sorted(marker["files"] + [f"_commits/{marker['shard']}.json"])
    assert remove_uncommitted(output.url, output.storage_options) == []


def test_remove_uncommitted_and_committed_keys(output, monkeypatch):
    (committed,) = write(output.sink(rows_per_shard=10), [make_block(0, 6, errors=(1,))])

    def crash(fs, path, obj):
        raise OSError("killed before the marker")

    monkeypatch.setattr(sinks, "write_json_atomic", crash)
    with pytest.raises(OSError):
        write(output.sink(rows_per_shard=10), [make_block(6, 4, errors=(3,))])
    monkeypatch.undo()
    if not output.storage_options:  # a local writer killed mid-file leaves its temporary name behind
        output.fs.pipe(f"{output.root}/img_emb/.tmp-img_emb_0123456789abcdef.npy-deadbeef", b"partial")
    orphan = set(output.files()) - set(committed["files"]) - {f"_commits/{committed['shard']}.json"}
    assert len(orphan) == (6 if output.storage_options else 7)  # the shard's six files (+ a temporary one)

    assert CommittedRun.open(output.url, output.storage_options).keys() == {f"k{i:05d}" for i in range(6)}
    assert remove_uncommitted(output.url, output.storage_options) == sorted(orphan)
    assert sorted(output.files()) == sorted(committed["files"] + [f"_commits/{committed['shard']}.json"])
    assert CommittedRun.open(output.url, output.storage_options).keys() == {f"k{i:05d}" for i in range(6)}
    assert remove_uncommitted(output.url, output.storage_options) == []


def test_s3_multipart_upload_is_committed_or_aborted(s3_bucket):
    import s3fs

    # Parts of 5 MiB: the first is uploaded while writing, yet nothing is visible before the commit.
    fs = s3fs.S3FileSystem(default_block_size=5 * 2**20, skip_instance_cache=True, **s3_bucket.storage_options)
    bucket = s3_bucket.url[len("s3://") :]
    data = np.random.default_rng(0).bytes(6 * 2**20)
    with sinks.open_atomic(fs, f"{bucket}/big.bin") as f:
        f.write(data)
        f.flush()
        assert fs.list_multipart_uploads(bucket) and not fs.exists(f"{bucket}/big.bin")
    assert fs.cat_file(f"{bucket}/big.bin") == data
    with pytest.raises(RuntimeError, match="interrupted"), sinks.open_atomic(fs, f"{bucket}/big2.bin") as f:
        f.write(data)
        raise RuntimeError("interrupted")
    fs.invalidate_cache()
    assert fs.find(bucket) == [f"{bucket}/big.bin"] and fs.list_multipart_uploads(bucket) == []


def test_empty_output_has_nothing_committed(output):
    assert committed_shards(output.url, output.storage_options) == []
    assert CommittedRun.open(output.url, output.storage_options).keys() == set()
    assert remove_uncommitted(output.url, output.storage_options) == []


def test_all_error_shard_writes_only_errors(tmp_path):
    block = make_block(0, 3, errors=(0, 1, 2)).drop_columns([C.IMAGE, C.IMAGE_EMB, C.TEXT_EMB])
    block = block.set_column(block.schema.get_field_index(C.PROMPT), C.PROMPT, pa.array([None, 7, 2], pa.int64()))
    (marker,) = write(KarloDatasink(str(tmp_path)), [block])
    assert marker["files"] == [f"errors/errors_{marker['shard']}.parquet"]
    errors = pq.read_table(f"{tmp_path}/{marker['files'][0]}")
    assert errors.column(C.PROMPT).to_pylist() == [None, "7", "2"]  # as given, non-strings as repr


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_image(fmt):
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(sinks.encode_image(image, fmt)))
    assert decoded.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt] and decoded.size == (SIZE, SIZE)
    if fmt == "png":
        np.testing.assert_array_equal(np.asarray(decoded), image)


def test_encode_image_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        sinks.encode_image(np.zeros((4, 4), np.float32), "png")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"image_format": "gif"}, ValueError, "image_format must be one of"),
        ({"output_format": "tfrecord"}, ValueError, "output_format must be one of"),
        ({"rows_per_shard": 0}, ValueError, "rows_per_shard must be a positive int"),
        ({"settings": {"seed": 1}}, ValueError, "setting name 'seed'"),
        ({"settings": {"__x": 1}}, ValueError, "setting name '__x'"),
        ({"settings": {"steps": object()}}, TypeError, "setting 'steps' must be"),
    ],
)
def test_invalid_sink_arguments(kwargs, error, message, tmp_path):
    with pytest.raises(error, match=message):
        KarloDatasink(str(tmp_path), **kwargs)


def test_rows_the_sink_cannot_write(tmp_path):
    sink = KarloDatasink(str(tmp_path), settings={"score": 1})
    with pytest.raises(ValueError, match=r"settings \['score'\] have the same names as input columns"):
        sink.write([make_block(0, 2)], None)
    with pytest.raises(ValueError, match="same names"):
        sink.on_write_start(make_block(0, 1).schema)
    with pytest.raises(KeyError, match=r"lack the columns \['seed'\]"):
        KarloDatasink(str(tmp_path)).on_write_start(make_block(0, 1).drop_columns([C.SEED]).schema)
    with pytest.raises(KeyError, match=r"lack the columns \['error'\]"):
        KarloDatasink(str(tmp_path)).write([make_block(0, 1).drop_columns([C.ERROR])], None)
    dotted = make_block(0, 2).set_column(4, C.KEY, pa.array(["a.b", "c"]))
    with pytest.raises(ValueError, match=r"without '/', '\.'.*\['a\.b'\]"):
        KarloDatasink(str(tmp_path)).write([dotted], None)
    with pytest.raises(ValueError, match=r"duplicate keys in one shard: \['k00000'\]"):
        KarloDatasink(str(tmp_path)).write([make_block(0, 2), make_block(0, 1)], None)
    good_without_images = make_block(0, 1).drop_columns([C.IMAGE])
    with pytest.raises(KeyError, match="good rows need the 'image' column"):
        KarloDatasink(str(tmp_path)).write([good_without_images], None)
    assert not list(tmp_path.iterdir())


def test_sink_is_picklable(tmp_path):
    import pickle

    sink = KarloDatasink(str(tmp_path), rows_per_shard=7, settings=SETTINGS)
    copy = pickle.loads(pickle.dumps(sink))
    assert (copy.rows_per_shard, copy.settings, copy.min_rows_per_write) == (7, SETTINGS, 7)


def test_ray_write_datasink(ray_local, tmp_path):
    import ray

    rng = np.random.default_rng(3)
    items = [
        {
            C.KEY: f"r{i:03d}",
            C.PROMPT: f"prompt {i}",
            C.SEED: i,
            C.ERROR: "prior failed" if i in (4, 11) else "",
            C.ERROR_STAGE: "prior" if i in (4, 11) else "",
            C.SOURCE: "p.parquet",
            C.SOURCE_ROW: i,
            "style": f"s{i % 3}",
            C.IMAGE: rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
            C.IMAGE_EMB: rng.standard_normal(DIM).astype(np.float32),
            C.TEXT_EMB: rng.standard_normal(DIM).astype(np.float32),
            C.TEXT_HIDDEN: np.zeros((2, 2), np.float32),
        }
        for i in range(20)
    ]
    sink = KarloDatasink(str(tmp_path), rows_per_shard=8, settings=SETTINGS)
    ray.data.from_items(items, override_num_blocks=4).write_datasink(sink)

    assert sink.result is not None
    assert (sink.result.rows, sink.result.errors) == (18, 2)
    markers = committed_shards(str(tmp_path))
    assert sink.result.shards == len(markers) and sink.result.bytes == sum(m["bytes"] for m in markers)
    assert CommittedRun.open(str(tmp_path)).keys() == {f"r{i:03d}" for i in range(20)}
    metadata_files = [f for m in markers for f in m["files"] if f.startswith("metadata/")]
    meta = pa.concat_tables([pq.read_table(f"{tmp_path}/{f}") for f in metadata_files])
    assert "style" in meta.column_names and not any(C.is_internal(c) for c in meta.column_names)


def test_remove_uncommitted_aborts_unfinished_uploads_under_output_only(s3_bucket):
    """A writer killed mid-upload leaves an incomplete multipart upload: never an object, but kept (and billed)
    by the store until aborted. The cleanup before a rerun aborts those under OUTPUT, and nobody else's."""
    fs, bucket = s3_bucket.fs, s3_bucket.url[5:]
    for key in ("run/images/0123456789abcdef.tar", "other/file.bin"):
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    remove_uncommitted(f"{s3_bucket.url}/run", s3_bucket.storage_options)
    assert [u["Key"] for u in fs.list_multipart_uploads(bucket)] == ["other/file.bin"]
