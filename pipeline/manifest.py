"""The run manifest (settings, model identity, versions, counts, timings) and the model's identity.

The manifest is written when a run starts and rewritten when it ends. A later run into the same output
compares its settings with it: the same settings resume the run, different ones are refused unless the user
asks to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec

from karlo_model.weights import WEIGHT_FILES, cache_root, file_digest, is_remote

from .reader import display_url

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
PACKAGES = ("karlo-pipeline", "torch", "transformers", "ray", "pyarrow", "fsspec", "s3fs", "pillow", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def model_identity(model: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Where the model came from and a fingerprint of every weight file: sha256 for local files (cached by
    size and mtime, since hashing the real 13 GB model takes a while), the storage's ETag/size otherwise."""
    fs, root = fsspec.core.url_to_fs(model, **(storage_options or {}))
    index = json.loads(fs.cat_file(f"{root}/model_index.json"))
    weights: dict[str, Any] = {}
    for comp in sorted(k for k, v in index.items() if isinstance(v, list)):
        folder = f"{root}/{comp}"
        if not fs.isdir(folder):
            continue
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
        chosen = next((w for w in WEIGHT_FILES if w in names), None)
        if chosen is None:
            continue
        info = fs.info(f"{folder}/{chosen}")
        entry: dict[str, Any] = {"file": f"{comp}/{chosen}", "size": info.get("size")}
        if is_remote(model):
            entry["etag"] = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        else:
            entry["sha256"] = _cached_digest(Path(f"{folder}/{chosen}"))
        weights[comp] = entry
    return {"model": display_url(model), "class": index.get("_class_name"), "weights": weights}


def _cached_digest(path: Path) -> str:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = cache_root() / "digests" / key
    if cache.is_file():
        return cache.read_text()
    digest = file_digest(path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".tmp-{key}-{os.getpid()}")
    tmp.write_text(digest)
    os.replace(tmp, cache)
    return digest


def identity_of_run(input_url: str, model_id: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """What must match for a rerun to continue the same output."""
    return {"input": display_url(input_url), "model": model_id, "settings": settings}


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable paths where two identity dicts differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
