"""Which input rows a run has committed, as intervals of row indices per input file: what a resumed run skips.

Each commit marker lists the input rows its shard holds (``input_rows``): per source file and image index
(``sample_index``, 0 without ``--images-per-prompt``), the half-open intervals of ``source_row``, flattened:
``[[source, sample_index, [start, stop, start, stop, ...]], ...]``. A shard holds whole read blocks of consecutive
rows, so a marker lists a few intervals, and a resumed run reads the markers only: its cost grows with the
shards, not the rows. Planning skips the rows every image of which is committed (:meth:`Coverage.missing`); a
block that is partly committed is read and its committed images dropped after prepare (:meth:`Coverage.done`).

A row is identified by where it was read (source, row index), as derived keys are; an id-keyed row has the same
key whenever it is read from the same place, and a reader refuses a file that changed under a run
(``pipeline.reader.InputChangedError``), so skipping by place skips exactly the committed keys.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import columns as C

INPUT_ROWS = "input_rows"  # the marker field

Intervals = tuple[np.ndarray, np.ndarray]  # (starts, stops), int64, sorted, disjoint, non-adjacent
_EMPTY: Intervals = (np.zeros(0, np.int64), np.zeros(0, np.int64))


def input_rows(table: pa.Table) -> list[list[Any]] | None:
    """The marker's ``input_rows`` for a shard's rows (good, error and rejected alike); None when the rows do not
    say where they were read (rows made outside a run)."""
    if C.SOURCE not in table.column_names or C.SOURCE_ROW not in table.column_names or not table.num_rows:
        return None
    encoded = pc.dictionary_encode(table.column(C.SOURCE)).combine_chunks()
    source = encoded.indices.to_numpy(zero_copy_only=False)
    row = table.column(C.SOURCE_ROW).to_numpy().astype(np.int64)
    sample = (table.column(C.SAMPLE_INDEX).to_numpy().astype(np.int64) if C.SAMPLE_INDEX in table.column_names
              else np.zeros(len(row), np.int64))
    order = np.lexsort((row, sample, source))  # by source, then sample, then row
    source, sample, row = source[order], sample[order], row[order]
    # A run starts where the group changes or the row does not follow the previous one.
    starts = np.ones(len(row), bool)
    starts[1:] = (source[1:] != source[:-1]) | (sample[1:] != sample[:-1]) | (row[1:] != row[:-1] + 1)
    first = np.flatnonzero(starts)
    last = np.append(first[1:], len(row)) - 1
    names = encoded.dictionary.to_pylist()
    out: dict[tuple[int, int], list[int]] = {}
    for a, b in zip(first, last):
        out.setdefault((int(source[a]), int(sample[a])), []).extend((int(row[a]), int(row[b]) + 1))
    return [[names[s], k, flat] for (s, k), flat in out.items()]


def union(parts: Iterable[Intervals]) -> Intervals:
    """The union of interval sets, merged (overlapping and adjacent intervals become one)."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return _EMPTY
    starts = np.concatenate([p[0] for p in parts])
    stops = np.concatenate([p[1] for p in parts])
    order = np.argsort(starts, kind="stable")
    starts, stops = starts[order], stops[order]
    reach = np.maximum.accumulate(stops)
    new = np.ones(len(starts), bool)
    new[1:] = starts[1:] > reach[:-1]
    first = np.flatnonzero(new)
    return starts[first], np.maximum.reduceat(stops, first)


def gaps(lo: int, hi: int, covered: Intervals) -> Intervals:
    """The parts of [lo, hi) that ``covered`` leaves out."""
    starts, stops = covered
    keep = (stops > lo) & (starts < hi)
    starts, stops = np.clip(starts[keep], lo, hi), np.clip(stops[keep], lo, hi)
    gap_starts = np.concatenate([[lo], stops])
    gap_stops = np.concatenate([starts, [hi]])
    nonempty = gap_stops > gap_starts
    return gap_starts[nonempty].astype(np.int64), gap_stops[nonempty].astype(np.int64)


def contains(covered: Intervals, rows: np.ndarray) -> np.ndarray:
    """(len(rows),) bool: which of ``rows`` lie in ``covered``."""
    starts, stops = covered
    i = np.searchsorted(starts, rows, side="right") - 1
    return (i >= 0) & (rows < stops[np.maximum(i, 0)]) if len(starts) else np.zeros(len(rows), bool)


class Coverage:
    """The committed input rows of a run: per (source, image index), merged intervals of row indices."""

    def __init__(self, rows: int = 0, intervals: dict[tuple[str, int], Intervals] | None = None):
        self.rows = rows  # committed rows (good, error and rejected), as the markers count them
        self.intervals = intervals or {}

    def add(self, records: Iterable[list[Any]]) -> None:
        """Merge markers' ``input_rows`` records in."""
        pending: dict[tuple[str, int], list[Intervals]] = {}
        for source, sample, flat in records:
            pairs = np.asarray(flat, np.int64).reshape(-1, 2)
            pending.setdefault((source, int(sample)), []).append((pairs[:, 0], pairs[:, 1]))
        for key, parts in pending.items():
            self.intervals[key] = union([self.intervals.get(key, _EMPTY), *parts])

    def of(self, source: str, sample: int) -> Intervals:
        return self.intervals.get((source, sample), _EMPTY)

    def missing(self, source: str, num_rows: int, images_per_prompt: int) -> Intervals:
        """Rows of ``source`` (of ``num_rows``) with at least one of their images not committed: the rows to read."""
        return union(gaps(0, num_rows, self.of(source, k)) for k in range(images_per_prompt))

    def done(self, source: str, rows: np.ndarray, images_per_prompt: int) -> list[list[int]]:
        """For each of ``rows`` of ``source``, the image indices already committed."""
        committed = [contains(self.of(source, k), rows) for k in range(images_per_prompt)]  # (N,) bool each
        return [[k for k in range(images_per_prompt) if committed[k][i]] for i in range(len(rows))]

    def restricted(self, source: str, ranges: Intervals, images_per_prompt: int) -> Coverage:
        """This coverage cut to ``ranges`` of one source: what a read task of those rows needs, and no more."""
        out = {}
        lo, hi = (int(ranges[0][0]), int(ranges[1][-1])) if len(ranges[0]) else (0, 0)
        for k in range(images_per_prompt):
            starts, stops = self.of(source, k)
            keep = (stops > lo) & (starts < hi)
            if keep.any():
                out[(source, k)] = (starts[keep], stops[keep])
        return Coverage(0, out)
