"""The run manifest (settings, model identity, versions, counts, timings) and the model's identity.

The manifest is written when a run starts and rewritten when it ends. A later run into the same output
compares its settings with it: the same settings resume the run, different ones are refused unless the user
asks to overwrite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import fsspec
from safetensors import SafetensorError, safe_open

from karlo_model.fetch import cache_root, is_remote
from karlo_model.lora import Adapter, check
from karlo_model.repo import read_configs
from karlo_model.weights import WeightsError, file_digest, load_torch_file, weight_file

from .config import ConfigError
from .redact import display_url, redact, secret_values, storage_error

PACKAGES = ("karlo-pipeline", "torch", "transformers", "ray", "pyarrow", "fsspec", "s3fs", "pillow", "numpy")


def new_manifest(identity: dict[str, Any], previous: dict[str, Any] | None, *, input_rows: int,
                 bad_files: Iterable[tuple[str, str]], stages: dict[str, Any], rows_per_shard: int,
                 placement: dict[str, Any] | None, clip_score: dict[str, Any] | None,
                 scorers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest an attempt writes when it starts; ``previous`` is the manifest of the same run's earlier
    attempts (its start time and attempt count carry over). The attempt's end adds status, counts and timings."""
    manifest: dict[str, Any] = {
        "identity": identity,
        "status": "running",
        "started": (previous or {}).get("started", now()),
        "attempts": (previous or {}).get("attempts", 0) + 1,
        # While status is "running": whose attempt it is, so that one whose process is gone reads as interrupted.
        "driver": {"host": socket.gethostname(), "pid": os.getpid()},
        "input_rows": input_rows,
        "bad_files": [list(b) for b in bad_files],
        "stages": {name: dataclasses.asdict(s) for name, s in stages.items()},
        "rows_per_shard": rows_per_shard,
        "packages": package_versions(),
        "placement": placement,
    }
    if clip_score is not None:
        manifest["clip_score"] = clip_score
    manifest.update(scorers or {})  # "aesthetic_score", "safety_checker": what pipeline.scoring.check_scorers found
    return manifest


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class ModelError(ConfigError):
    """--model names no usable Karlo repo; found on the driver, before any actor loads it."""


def model_identity(model: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Where the model came from and a fingerprint of every weight file: sha256 for local files (cached by
    size and mtime, since hashing the real 13 GB model takes a while), the storage's ETag/size otherwise.

    Raises ModelError for a model that is missing, unreadable, has a damaged safetensors file or a pickled file
    holding more than tensors (local models: only the headers and pickles are parsed), so that a bad --model
    fails in seconds, before Ray starts and OUTPUT is touched, rather than in every actor.
    """
    shown = display_url(model)
    fs, root = fsspec.core.url_to_fs(model, **(storage_options or {}))
    try:
        index = json.loads(fs.cat_file(f"{root}/model_index.json"))
    except FileNotFoundError:
        raise ModelError(f"no Karlo model at {shown}: it has no model_index.json (--model takes a folder or URL "
                         "of a diffusers-format repo such as kakaobrain/karlo-v1-alpha)") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"model {shown}: model_index.json is not valid JSON ({e})") from None
    except OSError as e:  # PermissionError for wrong credentials, connection errors
        raise ModelError(f"cannot read the model at {shown}: {storage_error(e, storage_options)}") from None
    except Exception as e:  # noqa: BLE001 - HTTP-based filesystems (hf://, https://) raise their client's errors
        if not is_remote(model):
            raise
        raise ModelError(f"cannot read the model at {shown}: {storage_error(e, storage_options)}") from None
    weights: dict[str, Any] = {}
    for comp in sorted(k for k, v in index.items() if isinstance(v, list)):
        folder = f"{root}/{comp}"
        if not fs.isdir(folder):
            continue
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
        chosen = weight_file(names)
        if chosen is None:
            continue
        info = fs.info(f"{folder}/{chosen}")
        entry: dict[str, Any] = {"file": f"{comp}/{chosen}", "size": info.get("size")}
        if is_remote(model):
            entry["etag"] = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        else:
            _check_header(Path(f"{folder}/{chosen}"), shown)
            entry["sha256"] = cached_digest(Path(f"{folder}/{chosen}"))
        weights[comp] = entry
    return {"model": display_url(model), "class": index.get("_class_name"), "weights": weights}


def check_adapters(model: str, adapters: Sequence[Adapter], storage_options: dict | None = None) -> None:
    """Raise ModelError for LoRA adapters that are missing or do not match ``model``'s networks (built on the meta
    device from its configs: nothing but the adapters is loaded), before Ray starts and OUTPUT is touched."""
    try:
        check(read_configs(model, storage_options), adapters, storage_options)
    except (WeightsError, FileNotFoundError) as e:
        raise ModelError(redact(str(e), secret_values(storage_options))) from None
    except OSError as e:
        raise ModelError(f"cannot read a LoRA adapter: {storage_error(e, storage_options)}") from None


def _check_header(path: Path, shown: str) -> None:
    """Parse a safetensors file's header, which also checks that the file is as long as the header says; or
    unpickle a .bin file as loading will (tensors only), its tensors on the meta device so no data is read."""
    name = f"{path.parent.name}/{path.name}"
    if path.suffix == ".bin":
        try:
            load_torch_file(path, map_location="meta")
        except WeightsError as e:
            raise ModelError(f"model {shown}: {str(e).replace(str(path), name, 1)}") from None
    if path.suffix != ".safetensors":
        return
    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as e:
        raise ModelError(f"model {shown}: {name} is not a valid safetensors file ({e})") from None


def cached_digest(path: Path) -> str:
    """sha256 of a local file, cached by its path, size and mtime."""
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


# What the files of a shard hold (pipeline.sinks). 2: img_emb/ and text_emb/ L2-normalised, the prior's raw output
# in raw_img_emb/. Runs written before have no layout in their identity: resuming one would mix raw and normalised
# embeddings in one folder, so it is refused as another run (--overwrite replaces it).
LAYOUT = 2


def identity_of_run(input_url: str, model_id: dict[str, Any], settings: dict[str, Any],
                    scorers: dict[str, Any] | None = None) -> dict[str, Any]:
    """What must match for a rerun to continue the same output; ``scorers`` (the curation models' records, with
    their weights' sha256) only when a run uses them, so that other runs' identity is what it was."""
    identity = {"input": display_url(input_url), "layout": LAYOUT, "model": model_id, "settings": settings}
    if scorers:
        identity["scorers"] = scorers
    return identity


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


def identity_changes(manifest: dict[str, Any], identity: dict[str, Any]) -> str:
    """What differs between the identity recorded in a run's ``manifest`` and ``identity``, for messages: the
    first five differences, "; "-joined; empty when a run with ``identity`` continues that run."""
    return "; ".join(differences(manifest.get("identity", {}), identity)[:5])


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
