"""Where the input's repeated ids are, as the read tasks look them up: the index :mod:`pipeline.duplicates`
builds on the cluster."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray


@dataclass(frozen=True)
class DuplicateIndex:
    """Where the repeats of a plan are, in the object store: one sorted (m, 2) array of (position, first holder's
    position) per bucket of ``bucket_rows`` consecutive plan rows, and the plan's files. A read task gets the
    index :meth:`restricted` to its own rows, so that it carries and reads only the buckets those rows are in."""

    buckets: tuple[Any, ...]  # ObjectRef of buckets first, first + 1, ...
    bucket_rows: int
    files: Any  # ObjectRef of a table: each planned file's plan offset and source
    repeats: int
    first: int = 0

    def _span(self, lo: int, hi: int) -> slice:
        return slice(lo // self.bucket_rows - self.first, -(-hi // self.bucket_rows) - self.first)

    def restricted(self, lo: int, hi: int) -> DuplicateIndex:
        """The index of plan rows [lo, hi) only."""
        return dataclasses.replace(self, buckets=self.buckets[self._span(lo, hi)], first=lo // self.bucket_rows)

    def lookup(self, lo: int, hi: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(plan positions in [lo, hi) that repeat a key, sorted; the source and row of each one's first holder)."""
        hits = np.concatenate([np.zeros((0, 2), np.int64), *ray.get(list(self.buckets[self._span(lo, hi)]))])
        hits = hits[slice(*np.searchsorted(hits[:, 0], [lo, hi]))]
        files = ray.get(self.files)
        offsets = files.column("offset").to_numpy()
        which = np.searchsorted(offsets, hits[:, 1], side="right") - 1
        sources = files.column("source").take(pa.array(which)).to_pylist()
        return hits[:, 0], sources, hits[:, 1] - offsets[which]
