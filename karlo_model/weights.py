"""Loading and saving diffusers-format Karlo repositories, locally or from any fsspec URL.

Weights come from safetensors (preferred) or from ``.bin``/``.ckpt`` files read with
``torch.load(weights_only=True)``: nothing but tensors is ever unpickled. Loading is strict: a missing,
unexpected or mis-shaped key is an error that names the keys and the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load_file, save_file
from torch import nn

from .fetch import is_remote, local_copy

# Weight file names per component, in order of preference (diffusers and transformers conventions).
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
# Keys that exist in published checkpoints but are not weights: transformers' position_ids buffer (int64).
NON_WEIGHT_KEYS = ("text_model.embeddings.position_ids",)


class WeightsError(ValueError):
    """A model repository or weight file that cannot be loaded as asked."""

    kind = "file"  # what a missing file is called in messages

    @classmethod
    def refused(cls, path: str, reason: str) -> "WeightsError":
        """The error for a pickle that needs more than tensors: ``reason`` is torch's first line about it."""
        return cls(
            f"{path}: refusing to load, the file needs unpickling of arbitrary Python objects, which can run "
            f"code; only tensors are accepted (convert it to safetensors). Details: {reason}"
        )


def weight_file(names: Iterable[str], *, sharded: bool = True) -> str | None:
    """The file of a component folder holding ``names`` that its weights load from: the first of WEIGHT_FILES
    present (a sharded index only if ``sharded``), or None."""
    present = set(names)
    return next((w for w in WEIGHT_FILES if w in present and (sharded or not w.endswith(".index.json"))), None)


def local_repo(
    path_or_url: str | os.PathLike,
    components: list[str],
    storage_options: dict | None = None,
    config_only: Sequence[str] = (),
) -> Path:
    """A local folder holding the repo's files needed for ``components``, plus the config files of the
    ``config_only`` components (every component config is read to check the whole model).

    Remote repos are copied once per machine into the cache (karlo_model.fetch); only one weight format per
    component is fetched.
    """
    path = str(path_or_url)
    if not is_remote(path):
        root = Path(path.removeprefix("file://"))
        if not root.is_dir():
            raise WeightsError(f"model folder {root} does not exist")
        return root
    return local_copy(
        path,
        lambda fs, root: _remote_files(fs, root, components) + _remote_configs(fs, root, config_only),
        storage_options,
    )


def _remote_files(fs, root: str, components: list[str]) -> list[str]:
    if not fs.exists(f"{root}/model_index.json"):
        raise WeightsError("no model_index.json under the model URL (is it a diffusers-format Karlo repo?)")
    files = ["model_index.json"]
    for comp in components:
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{comp}", detail=False)} if fs.isdir(
            f"{root}/{comp}") else set()
        if not names:
            raise WeightsError(f"the model has no {comp}/ folder")
        weights = weight_file(names)
        chosen = {n for n in names if n.endswith((".json", ".txt"))}
        if weights is not None:
            chosen.add(weights)
            if weights.endswith(".index.json"):
                with fs.open(f"{root}/{comp}/{weights}") as f:
                    chosen |= set(json.load(f)["weight_map"].values())
        files += [f"{comp}/{n}" for n in sorted(chosen)]
    return files


def _remote_configs(fs, root: str, components: Sequence[str]) -> list[str]:
    names = ("config.json", "scheduler_config.json")
    return [f"{c}/{n}" for c in components for n in names if fs.isfile(f"{root}/{c}/{n}")]


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from None


def load_torch_file(
    path_or_url: str | os.PathLike, map_location: str = "cpu", *, error: type[WeightsError] = WeightsError,
    mmap: bool = False,
) -> Any:
    """A pickled file (local path or fsspec URL) holding only tensors and plain containers: nothing else is ever
    unpickled. With ``map_location="meta"`` only the pickle is read, no tensor data: a cheap check of the whole
    file's structure. ``mmap`` keeps a local file's tensors file-backed until they are copied into a model.
    Refusals and damaged files raise ``error``, whose ``refused`` words the message."""
    fs, path = fsspec.core.url_to_fs(str(path_or_url))
    if not fs.isfile(path):
        raise FileNotFoundError(f"{error.kind} not found: {path_or_url}")
    try:
        if mmap and isinstance(fs, LocalFileSystem) and zipfile.is_zipfile(path):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        with fs.open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise error.refused(str(path_or_url), str(e).strip().splitlines()[0]) from None
    except Exception as e:  # a damaged pickle can fail in the unpickler with any error type (IndexError, ...)
        raise error(f"{path_or_url}: not a readable PyTorch file ({type(e).__name__}: {e})") from None


def load_state_dict(component_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The component's weights and the file(s) they came from."""
    names = [p.name for p in component_dir.iterdir() if p.is_file()] if component_dir.is_dir() else []
    name = weight_file(names)
    if name is None:
        raise WeightsError(f"no weight file in {component_dir} (looked for {', '.join(WEIGHT_FILES)})")
    path = component_dir / name
    if name.endswith(".index.json"):
        shards = sorted(set(read_json(path)["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(_load_safetensors(component_dir / shard))
        return sd, str(path)
    if name.endswith(".safetensors"):
        return _load_safetensors(path), str(path)
    return load_torch_file(path), str(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"missing weight file {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise WeightsError(f"{path}: not a valid safetensors file ({e})") from None


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load that names every missing, unexpected and mis-shaped key. Works on meta-device modules."""
    state = {k: v for k, v in state.items() if k not in NON_WEIGHT_KEYS}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shapes)):
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError(f"{source} does not match the model config: " + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=True)


def save_component(out_dir: Path, config: dict[str, Any], module: nn.Module, weights_name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items() if k not in NON_WEIGHT_KEYS}
    save_file(state, str(out_dir / weights_name))


def file_digest(path: Path) -> str:
    """sha256 of a weight file, for run manifests (streams; works on multi-GB files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
