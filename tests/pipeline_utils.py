"""Helpers shared by the stage, pipeline and CLI tests: one tiny model per test process, prompt tables,
reference generation in-process, and reading a run's output back."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline import columns as C

# Few steps keep a run of a few rows at seconds of compute on two CPU cores.
STEPS = dict(prior_steps=3, decoder_steps=3, super_res_steps=2)
PROMPTS = [
    "a red frog on a green leaf",
    "an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen, studio lighting",
    "an isometric city at night",
    "a corgi wearing sunglasses",
    "a cabin in a snowy forest",
    "a sailing boat in a storm",
]


@functools.cache
def session_root() -> Path:
    """A scratch folder for this test process: caches, models, Hugging Face files."""
    root = Path(tempfile.mkdtemp(prefix="karlo-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def session_environment() -> Iterator[Path]:
    """Point every cache at the session's scratch folder (before Ray starts, so its workers inherit it) and
    restore the previous values afterwards."""
    root = session_root()
    values = {
        "KARLO_CACHE": str(root / "karlo-cache"),
        "HF_HOME": str(root / "hf-home"),
        # Runs without --model use the random tiny model, whose speed the suite's budget assumes; the trained
        # default has tests of its own (tests/test_small_behaviour.py).
        "KARLO_EMBEDDED_MODEL": "tiny-random-v1",
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield root
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value



@functools.cache
def _reference_model(path: str):
    from karlo_model import Karlo

    return Karlo.from_pretrained(path)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(model: str, prompts, seeds, *, threads: int = 1, **kwargs):
    """``Karlo.generate`` one row at a time, as a CPU actor with one thread runs it at batch size 1.

    Per-row list arguments (negative_prompts, guidance scales) are split along with the prompts.
    Returns (images (N, H, W, 3) uint8, image_embeds (N, D), text_embeds (N, D)).
    """
    settings = {**STEPS, **kwargs}
    karlo = _reference_model(model)
    images, img_emb, text_emb = [], [], []
    with torch_threads(threads):
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            row = {k: ([v[i]] if isinstance(v, (list, tuple)) else v) for k, v in settings.items()}
            out = karlo.generate([prompt], [int(seed)], **row)
            images.append(out.images[0])
            img_emb.append(out.image_embeds[0])
            text_emb.append(out.text_embeds[0])
    return np.stack(images), np.stack(img_emb), np.stack(text_emb)


# Batch independence of one row's image: batch size changes the float rounding of batched matmuls, and the tiny
# random model turns that into differences of a level or two on a few pixels and, on a handful of values per
# image, into jumps across the super-res clip range (a value going from -1 to +1). Measured per 256 px image
# (196608 values) at batch sizes 1 to 8: >= 99.968% of values identical, at most 16 differing by more than 16
# levels. The bounds leave about twice that room.
MIN_IDENTICAL = 0.999
MAX_FAR_VALUES = 32  # values per image differing by more than FAR levels
FAR = 16


def assert_batch_independent(images, expected) -> None:
    """Each image equals its expected image up to the batch-size rounding described above; takes two
    sequences or two dicts (by key) of (H, W, 3) uint8 images."""
    if isinstance(expected, dict):
        assert images.keys() == expected.keys()
        names = list(expected)
        images, expected = [images[k] for k in names], [expected[k] for k in names]
    else:
        names = list(range(len(expected)))
    assert len(images) == len(expected)
    for name, got, want in zip(names, images, expected):
        diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
        identical, far = float((diff == 0).mean()), int((diff > FAR).sum())
        assert identical >= MIN_IDENTICAL, f"{name}: only {identical:.5f} of the values are identical"
        assert far <= MAX_FAR_VALUES, f"{name}: {far} values differ by more than {FAR} levels"


def assert_float16_of(stored: np.ndarray, expected: np.ndarray) -> None:
    """float16 embeddings equal float32 ones up to float16 rounding (2^-11 relative) and batch rounding."""
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=1e-3, atol=1e-5)
    assert np.abs(stored.astype(np.float32) - expected).max() <= 2e-3


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """float32 (N, D) rows divided by their L2 norms."""
    rows = embeddings.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_table(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@dataclass
class Output:
    """A committed run read back with plain pyarrow / numpy: what every downstream tool sees."""

    root: Path
    markers: list[dict]
    metadata: pa.Table  # good rows, in shard-name order (the order embeddings are aligned with)
    errors: pa.Table
    img_emb: np.ndarray  # L2-normalised
    text_emb: np.ndarray  # L2-normalised
    raw_img_emb: np.ndarray  # as the decoder took them
    manifest: dict

    @property
    def keys(self) -> list[str]:
        return self.metadata.column("key").to_pylist()

    @property
    def error_keys(self) -> list[str]:
        return self.errors.column("key").to_pylist() if self.errors.num_rows else []

    def images(self) -> dict[str, np.ndarray]:
        """key -> decoded image, from the tars or the image Parquet files."""
        out = {}
        for path in sorted((self.root / "images").iterdir()):
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    for member in tar.getmembers():
                        stem, ext = member.name.rsplit(".", 1)
                        if ext in ("png", "jpg", "webp"):
                            out[stem] = decode(tar.extractfile(member).read())
            elif path.suffix == ".parquet":
                for row in pq.read_table(path).to_pylist():
                    out[row["key"]] = decode(row["image"]["bytes"])
        return out


def read_output(root: Path) -> Output:
    root = Path(root)
    markers = [json.loads(p.read_text()) for p in sorted((root / "_commits").glob("*.json"))]
    metadata_files = sorted((root / "metadata").glob("metadata_*.parquet"))
    metadata = (
        pa.concat_tables([pq.read_table(p) for p in metadata_files], promote_options="permissive")
        if metadata_files
        else pa.table({"key": pa.array([], pa.string())})
    )
    error_files = sorted((root / "errors").glob("errors_*.parquet"))
    errors = (
        pa.concat_tables([pq.read_table(p) for p in error_files], promote_options="permissive")
        if error_files
        else pa.table({"key": pa.array([], pa.string())})
    )

    def embeddings(folder: str) -> np.ndarray:
        files = sorted((root / folder).glob("*.npy"))
        return np.concatenate([np.load(p) for p in files]) if files else np.zeros((0, 0), np.float16)

    return Output(
        root=root,
        markers=markers,
        metadata=metadata,
        errors=errors,
        img_emb=embeddings("img_emb"),
        text_emb=embeddings("text_emb"),
        raw_img_emb=embeddings("raw_img_emb"),
        manifest=json.loads((root / "manifest.json").read_text()),
    )


def file_states(root: Path) -> dict[str, tuple[int, bytes]]:
    """Relative path -> (mtime_ns, content) of every file under ``root`` (hidden files included)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _touch_marker(path: str) -> None:  # what a malicious pickle would run
    Path(path).write_text("code ran")


class Payload:
    """Unpickling it runs code (writes ``marker``): a weight file holding one must be refused unread."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch_marker, (self.marker,))


def score_batch(images: np.ndarray, reference: np.ndarray, errors=None) -> dict[str, np.ndarray]:
    """A batch as the CLIP score stage receives it: images, their reference embeddings, error columns."""
    n = len(images)
    errors = np.array(errors if errors is not None else [""] * n, dtype=object)
    return {C.KEY: np.array([f"k{i}" for i in range(n)], dtype=object), C.IMAGE: images, C.TEXT_EMB: reference,
            C.ERROR: errors, C.ERROR_STAGE: np.where(errors == "", "", "prior").astype(object)}
