"""A periodic one-line status of a running generation.

The driver learns how far a run got from the shards' commit markers (``_commits/X.json``, each holding its
row and error counts): a background thread lists that folder every ``interval`` seconds and reads only the
markers it has not seen. Committed rows are the run's durable progress (what a restart would keep), the
cost is one listing plus one small read per new shard on S3, and nothing depends on Ray Data internals.
Committed progress moves one shard (``--rows-per-shard`` rows) at a time, so the line also shows the rows that
have passed the last model stage (counted by the run's crash ledger, :mod:`pipeline.crashes`), and the ETA
follows whichever is further along.

Lines are plain and newline-terminated, in a terminal too: Ray Data redraws its own progress bars at the
bottom of a terminal, and a line rewritten in place with carriage returns would fight them; job logs
(Ray job logs, Kubernetes) get one readable line per interval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Iterator

from .outputs import marker_names, output_filesystem, read_markers

logger = logging.getLogger(__name__)

PREFIX = "[karlo]"
DEFAULT_INTERVAL = 10.0  # seconds between status lines


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 3m12s, 1h02m, 2d03h (rounded down to the unit shown)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_rate(per_second: float) -> str:
    """Three significant figures for everyday rates, no exponent: 0.123, 4.56, 45.6, 456, 4560."""
    if per_second >= 100:
        return f"{per_second:.0f}"
    if per_second >= 10:
        return f"{per_second:.1f}"
    if per_second >= 1:
        return f"{per_second:.2f}"
    return f"{per_second:.3f}"


def plural(n: int, word: str) -> str:
    """``1 error``, ``1,234 errors``."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


@dataclasses.dataclass(frozen=True)
class Tally:
    """Committed rows of a run: good rows (images) and error rows."""

    rows: int = 0
    errors: int = 0

    @property
    def done(self) -> int:
        return self.rows + self.errors

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.rows + other.rows, self.errors + other.errors)


@dataclasses.dataclass(frozen=True)
class Progress:
    """Progress of one run against its input: ``baseline`` was committed before this run started (resume),
    so rates and the ETA count only what this run committed since ``started`` (same clock as ``now``)."""

    total: int  # input rows
    baseline: Tally
    started: float

    def images_per_second(self, tally: Tally, now: float, generated: int = 0) -> float:
        """This run's rate: its committed images, or the rows past the last model stage (``generated``) while
        they are ahead, since a shard commits only once all its rows are made (1000 by default)."""
        elapsed = now - self.started
        return max(tally.rows - self.baseline.rows, generated) / elapsed if elapsed > 0 else 0.0

    def eta(self, tally: Tally, now: float, generated: int = 0) -> float | None:
        """Seconds left at this run's average row rate (good and error rows), counting rows past the last model
        stage (``generated``, this run's) when they are ahead of the commits; None before the first of either."""
        finished, elapsed = max(tally.done - self.baseline.done, generated), now - self.started
        remaining = max(0, self.total - self.baseline.done - finished)
        if remaining == 0:
            return 0.0
        if finished <= 0 or elapsed <= 0:
            return None
        return remaining / (finished / elapsed)

    def line(self, tally: Tally, now: float, generated: int | None = None) -> str:
        """``[karlo] 1,234/10,000 rows (12.3%) | 45.6 img/s | ETA 3m12s | 2 errors``, with ``| 1,500 generated``
        after the rows when the run reports rows past its last model stage (committed a shard at a time)."""
        percent = 100.0 * tally.done / self.total if self.total else 100.0
        eta = self.eta(tally, now, generated or 0)
        return " | ".join([
            f"{PREFIX} {tally.done:,}/{self.total:,} rows ({percent:.1f}%)",
            *([] if generated is None else [f"{min(self.total, self.baseline.done + generated):,} generated"]),
            f"{format_rate(self.images_per_second(tally, now, generated or 0))} img/s",
            "ETA " + ("--" if eta is None else format_duration(eta)),
            plural(tally.errors, "error"),
        ])


class MarkerTally:
    """Sums the row and error counts of the commit markers under an output URL, reading each marker once."""

    def __init__(self, output_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = output_filesystem(output_url, storage_options)
        self.seen: set[str] = set()
        self.tally = Tally()

    def poll(self) -> Tally:
        new = sorted(set(marker_names(self.fs, self.root)) - self.seen)
        # A marker is written atomically and never changes, so one read per name is enough.
        for marker in read_markers(self.fs, self.root, new):
            # Rows below the minimum CLIP score were generated too: done, like written ones.
            self.tally += Tally(marker["rows"] + marker.get("rejected", 0), marker["errors"])
        self.seen.update(new)
        return self.tally


class ProgressReporter:
    """Writes ``Progress.line`` every ``interval`` seconds from a daemon thread until ``stop``."""

    def __init__(self, tally: MarkerTally, total: int, interval: float, write: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, generated: Callable[[], int] | None = None):
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.tally, self.interval, self.write, self.clock = tally, interval, write, clock
        self.generated = generated  # rows past the last model stage in this run, when the run can tell
        # The first poll is the baseline: rows committed by earlier attempts do not count towards the rate.
        self.progress = Progress(total=total, baseline=tally.poll(), started=clock())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="karlo-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                tally = self.tally.poll()
                generated = self.generated() if self.generated else None
            except Exception as e:  # a storage or Ray hiccup costs one status line, never the run
                logger.warning("progress: could not read the run's progress: %s", e)
                continue
            self.write(self.progress.line(tally, self.clock(), generated))


@contextlib.contextmanager
def report_progress(output_url: str, storage_options: dict[str, Any] | None, *, total: int, interval: float,
                    write: Callable[[str], None], generated: Callable[[], int] | None = None) -> Iterator[None]:
    """Status lines about ``output_url`` every ``interval`` seconds while the body runs; 0 turns them off."""
    if interval <= 0:
        yield
        return
    reporter = ProgressReporter(MarkerTally(output_url, storage_options), total, interval, write,
                                generated=generated)
    reporter.start()
    try:
        yield
    finally:
        reporter.stop()
