"""Rows whose key an earlier row of the input already has, found by the cluster in memory bounded per task.

The first row with a key (in plan order: files sorted by path, rows in file order) keeps it; every later one is
an error row naming the first (:func:`pipeline.schema.prepare_batch`), whatever the batching. A read task sees
its own rows only, and a table of 10^8 ids does not fit one process's set, so the check is a hash partitioning
in passes of Ray tasks, as a shuffle is:

1. :func:`hash_part`, per part of :func:`task_rows` consecutive plan rows: read the id column alone, make each
   usable id its key (:func:`pipeline.schema.key_from_id`; null and unusable ids get derived keys, which never
   repeat), hash the key to 128 bits (two SipHash-2-4 with keys drawn per run; an integer id is its own value,
   exactly), and split (hash, plan position) by hash into P partitions;
2. :func:`first_holders`, per partition of about :func:`task_rows` rows: sort by (hash, position); in a run of
   equal hashes, each row after the first repeats the first: (position, first holder's position);
3. :func:`by_position`, per part's rows again: gather the repeats among them from every partition, sorted by
   position. These stay in the object store, one per part.

A read task looks its rows up in the results of its own parts only
(:meth:`pipeline.repeats.DuplicateIndex.lookup`, a binary search in zero-copy arrays) and hands each repeat's
first holder to prepare in two columns. The driver holds object references (parts x P while the passes run, one
per part after) and no per-row state. Two keys are taken for one another only if both hashes collide: about
n^2 / 2^129, 2e-23 at 10^8 rows, and the hash keys are secret, so no input can collide them on purpose.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline import columns as C
from pipeline.reader import DamagedFile, InputFile, InputPlan, iter_rows, open_input
from pipeline.repeats import DuplicateIndex
from pipeline.schema import MADE_KEY, SAFE_ID, key_from_id

logger = logging.getLogger(__name__)

TASK_ROWS = 1_000_000  # rows per task of either pass: ~24 MB of hashes, ~100 MB of working memory at most
# A task's return value under 100 KiB (Ray's max_direct_call_object_size) is kept in the memory of the process that
# called the task, the driver, not in the object store: the pieces a part makes stay above this size.
MIN_PIECE_ROWS = 8192  # 192 KiB of (hash 1, hash 2, position)
TASK_CPUS = 0.5  # fits beside stages that hold all but 0.5 CPU (pipeline.run.check_resources)
_ID_BATCH = 65_536


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one planned file, at plan position ``offset`` + row."""

    file: InputFile
    offset: int
    start: int
    stop: int


def task_rows(total_rows: int) -> int:
    """Rows per task of either pass for a plan of ``total_rows``: TASK_ROWS, or past ~10^8 rows (where a part's
    TASK_ROWS / partitions rows per piece would fall under MIN_PIECE_ROWS) sqrt(total_rows * MIN_PIECE_ROWS),
    so that a piece keeps MIN_PIECE_ROWS: a task's memory then grows with the square root of the rows."""
    return max(TASK_ROWS, math.isqrt(total_rows * MIN_PIECE_ROWS) + 1)


def parts(plan: InputPlan, part_rows: int = TASK_ROWS) -> list[list[Piece]]:
    """The plan cut, in plan order, into parts of ``part_rows`` rows (a part may span files)."""
    out: list[list[Piece]] = [[]]
    room, offset = part_rows, 0
    for f in plan.files:
        start = 0
        while start < f.num_rows:
            if room == 0:
                out.append([])
                room = part_rows
            take = min(room, f.num_rows - start)
            out[-1].append(Piece(f, offset, start, start + take))
            start, room = start + take, room - take
        offset += f.num_rows
    return [p for p in out if p]


def key_hashes(ids: pa.ChunkedArray, hash_keys: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows with a key from their id, its two 64-bit hashes) for one column of ids. Unusable ids (null, empty,
    of another type) are left out: their rows get derived keys, distinct from every id's."""
    ids = ids.combine_chunks()
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    if pa.types.is_integer(ids.type):
        rows = np.flatnonzero(ids.is_valid().to_numpy(zero_copy_only=False))
        # Distinct integers have distinct keys (a negative one is sanitised, its digits kept): the value is exact.
        values = ids.drop_null().to_numpy().astype(np.int64, copy=False).view(np.uint64)
        return rows, values, np.zeros(len(values), np.uint64)
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        return np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    usable = pc.and_(ids.is_valid(), pc.greater(pc.binary_length(ids), 0)).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(usable)
    keys = ids.filter(pa.array(usable)).to_numpy(zero_copy_only=False)  # object array of str
    # Safe ids are their own key; the rest (few, in most tables) are sanitised one by one.
    kept = pc.and_(pc.match_substring_regex(pa.array(keys), f"^(?:{SAFE_ID.pattern})$"),
                   pc.invert(pc.match_substring_regex(pa.array(keys), f"^(?:{MADE_KEY.pattern})$")))
    for i in np.flatnonzero(~kept.to_numpy(zero_copy_only=False)):
        keys[i] = key_from_id(keys[i])
    return (rows, pd.util.hash_array(keys, hash_key=hash_keys[0], categorize=False),
            pd.util.hash_array(keys, hash_key=hash_keys[1], categorize=False))


def hash_part(part: list[Piece], storage_options: dict, partitions: int,
              hash_keys: tuple[str, str]) -> list[np.ndarray]:
    """Pass 1 for one part: per partition, an (n, 3) uint64 array of (hash 1, hash 2, plan position), in plan
    order. The ids are hashed and split a batch at a time as they are decoded, so the task holds its hashes twice
    (split, then joined) and one batch. From a file with pages that cannot be decoded, the ids before the first
    such page count; the read tasks make the rows after it error rows."""
    split: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    for piece in part:
        try:
            with open_input(piece.file, storage_options) as pf:
                if C.ID not in pf.schema_arrow.names:
                    continue
                offset = piece.offset + piece.start
                for batch in iter_rows(pf, piece.file, piece.start, piece.stop, [C.ID], _ID_BATCH):
                    rows, h1, h2 = key_hashes(batch.column(C.ID), hash_keys)
                    table = np.stack([h1, h2, (rows + offset).astype(np.uint64)], axis=1)  # (n, 3)
                    which = h1 % np.uint64(partitions)
                    for p in range(partitions):
                        split[p].append(table[which == p])
                    offset += batch.num_rows
        except DamagedFile:
            continue
    return [np.concatenate(pieces) if pieces else np.zeros((0, 3), np.uint64) for pieces in split]


def _hash_part_task(*args: Any) -> list[np.ndarray] | np.ndarray:
    split = hash_part(*args)
    return split if len(split) > 1 else split[0]  # a task of num_returns=1 returns its value itself


def first_holders(*pieces: np.ndarray) -> tuple[np.ndarray, int]:
    """Pass 2 for one partition, given its pieces from every part: ((m, 2) int64 of (position of a repeat,
    position of the first row with its key), sorted by position; m). Works column by column, so that beside its
    arguments (in the object store) it holds about four 8-byte values per row."""
    h1, h2, pos = (np.concatenate([p[:, c] for p in pieces]) if pieces else np.zeros(0, np.uint64)
                   for c in range(3))
    order = np.lexsort((pos, h2, h1))  # by hash 1, hash 2, position
    h1, h2, pos = h1[order], h2[order], pos[order].astype(np.int64)
    del order
    same = np.zeros(len(pos), bool)  # the row repeats the key of the row before it
    same[1:] = (h1[1:] == h1[:-1]) & (h2[1:] == h2[:-1])
    del h1, h2
    later, first = np.flatnonzero(same), np.flatnonzero(~same)  # repeats; each run's first row
    holder = first[np.searchsorted(first, later, side="right") - 1]
    repeats = np.stack([pos[later], pos[holder]], axis=1)
    return repeats[np.argsort(repeats[:, 0], kind="stable")], len(repeats)


def by_position(lo: int, hi: int, *results: np.ndarray) -> np.ndarray:
    """Pass 3 for plan rows [lo, hi): the repeats there, from every partition's result, sorted by position."""
    found = [r[slice(*np.searchsorted(r[:, 0], [lo, hi]))] for r in results]
    hits = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    return hits[np.argsort(hits[:, 0], kind="stable")]


def find_duplicates(plan: InputPlan, part_rows: int | None = None,
                    partition_rows: int | None = None) -> DuplicateIndex | None:
    """Run the passes over ``plan`` on the cluster and wait for them; None when the input has no id column.
    ``part_rows`` and ``partition_rows`` default to :func:`task_rows`."""
    if C.ID not in plan.schema.names:
        return None
    part_rows = part_rows or task_rows(plan.total_rows)
    partition_rows = partition_rows or task_rows(plan.total_rows)
    partitions = max(1, math.ceil(plan.total_rows / partition_rows))
    hash_keys = (secrets.token_hex(8), secrets.token_hex(8))  # 16 characters each, as SipHash takes
    hashing = ray.remote(_hash_part_task).options(num_returns=partitions, num_cpus=TASK_CPUS)
    pieces = [hashing.remote(part, plan.storage_options, partitions, hash_keys) for part in parts(plan, part_rows)]
    pieces = [p if partitions > 1 else [p] for p in pieces]  # as lists of P references
    sorting = ray.remote(first_holders).options(num_returns=2, num_cpus=TASK_CPUS)
    results, counts = zip(*(sorting.remote(*(part[p] for part in pieces)) for p in range(partitions)))
    del pieces  # the hashes are freed once every partition is sorted
    regrouping = ray.remote(by_position).options(num_cpus=TASK_CPUS)
    buckets = [regrouping.remote(lo, lo + part_rows, *results) for lo in range(0, plan.total_rows, part_rows)]
    repeats = sum(ray.get(list(counts)))  # waits, and raises a task's storage error here
    ray.wait(buckets, num_returns=len(buckets), fetch_local=False)
    del results
    offsets = np.cumsum([0] + [f.num_rows for f in plan.files[:-1]])
    files = ray.put(pa.table({"offset": pa.array(offsets, pa.int64()), "source": [f.source for f in plan.files]}))
    logger.info("duplicate ids: %d of %d rows repeat an earlier row's key", repeats, plan.total_rows)
    return DuplicateIndex(tuple(buckets), part_rows, files, repeats)
