"""Local copies of remote model folders, made once per machine.

Every Ray actor on a node loads the same model, so a remote folder (any fsspec URL: ``s3://``, ``gs://``,
``hf://``) is copied into one cache directory under a file lock: concurrent actors wait for a single download
instead of each fetching gigabytes, and a file is renamed into place only when complete, so an interrupted copy
is never taken for a finished one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem


def cache_root() -> Path:
    return Path(os.environ.get("KARLO_CACHE", Path.home() / ".cache" / "karlo-pipeline"))


def is_remote(path_or_url: str | os.PathLike) -> bool:
    return "://" in str(path_or_url) and not str(path_or_url).startswith("file://")


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if need be) for the block: one process per machine."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def local_copy(
    url: str, files: Callable[[AbstractFileSystem, str], list[str]], storage_options: dict | None = None
) -> Path:
    """The cache folder holding the files ``files(fs, root)`` names (paths relative to the remote folder) of the
    remote folder at ``url``; files already there at their remote size are not fetched again."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    dest = cache_root() / "models" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    with locked(dest / ".lock"):
        for rel in files(fs, root):
            target = dest / rel
            if target.exists() and target.stat().st_size == fs.size(f"{root}/{rel}"):
                continue  # complete from an earlier download (partial ones are written under a temp name)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".tmp-{target.name}")
            fs.get_file(f"{root}/{rel}", str(tmp))
            os.replace(tmp, target)
    return dest


def local_file(path_or_url: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """One file on this machine: a local path as it is, a remote file (any fsspec URL) copied once per machine
    into the cache (``local_copy`` of its folder). A missing remote file raises FileNotFoundError."""
    url = str(path_or_url)
    if not is_remote(url):
        return Path(url.removeprefix("file://"))
    parent, name = url.rstrip("/").rsplit("/", 1)
    return local_copy(parent, lambda fs, root: [name], storage_options) / name


def built_once(name: str, build: Callable[[Path], None], done: str) -> Path:
    """The cache folder ``name``, made by ``build(folder)`` once per machine; it is complete when it holds the
    file ``done``, which is how later calls (and processes waiting on the lock) know not to build it again."""
    target = cache_root() / name
    if (target / done).is_file():
        return target
    with locked(target.parent / f".{name}.lock"):
        if not (target / done).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            build(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    return target
