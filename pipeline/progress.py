"""A periodic one-line status of a running generation.

The driver learns how far a run got from the shards' commit markers (``_commits/X.json``, each holding its
row and error counts): a background thread lists that folder every ``interval`` seconds and reads only the
markers it has not seen. Committed rows are the run's durable progress (what a restart would keep), the
cost is one listing plus one small read per new shard on S3, and nothing depends on Ray Data internals.
Committed progress moves one shard (``--rows-per-shard`` rows) at a time, so the line also shows the rows that
have passed the last model stage (counted by the run's crash ledger, :mod:`pipeline.crashes`), and the ETA
follows whichever is further along.

Without a terminal (Ray job logs, Kubernetes) the status is a plain newline-terminated line per interval. In a
terminal it is one bar redrawn in place every second; Ray Data's own bars, which would fight it for the bottom
line, are off unless ``--verbose`` turns them on (and then the plain lines are used).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Iterator, TextIO

from .outputs import marker_names, output_filesystem, read_markers

logger = logging.getLogger(__name__)

PREFIX = "[karlo]"
DEFAULT_INTERVAL = 10.0  # seconds between status lines
LIVE_INTERVAL = 1.0  # seconds between redraws of the terminal bar
BAR_WIDTH = 24


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

    def line(self, tally: Tally, now: float, generated: int | None = None, failed: int = 0) -> str:
        """``[karlo] 1,234/10,000 rows (12.3%) | 45.6 img/s | ETA 3m12s | 2 errors``, with ``| 1,500 generated``
        after the rows when the run reports images past its last model stage (committed a shard at a time);
        ``failed``: error rows past it, counted in the ETA and the errors before their shard commits."""
        return " | ".join([f"{PREFIX} {self._rows(tally)}", *self._fields(tally, now, generated, failed)])

    def bar(self, tally: Tally, now: float, generated: int | None = None, failed: int = 0) -> str:
        """``line`` with a bar of the committed rows: ``[karlo] [=====>      ] 1,234/10,000 rows (12.3%) | ...``."""
        fraction = tally.done / self.total if self.total else 1.0
        filled = min(BAR_WIDTH, int(fraction * BAR_WIDTH))
        bar = "=" * filled + (">" if filled < BAR_WIDTH else "") + " " * max(0, BAR_WIDTH - filled - 1)
        return " | ".join([f"{PREFIX} [{bar}] {self._rows(tally)}", *self._fields(tally, now, generated, failed)])

    def _rows(self, tally: Tally) -> str:
        percent = 100.0 * tally.done / self.total if self.total else 100.0
        return f"{tally.done:,}/{self.total:,} rows ({percent:.1f}%)"

    def _fields(self, tally: Tally, now: float, generated: int | None, failed: int) -> list[str]:
        past = (generated or 0) + failed  # rows past the last model stage, good or not
        eta = self.eta(tally, now, past)
        return [
            *([] if generated is None else [f"{min(self.total, self.baseline.rows + generated):,} generated"]),
            f"{format_rate(self.images_per_second(tally, now, generated or 0))} img/s",
            "ETA " + ("--" if eta is None else format_duration(eta)),
            plural(max(tally.errors, self.baseline.errors + failed), "error"),
        ]


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
    """Writes ``Progress.line`` every ``interval`` seconds from a daemon thread until ``stop``; with ``live`` (a
    terminal's stream), redraws ``Progress.bar`` in place on it every second instead."""

    def __init__(self, tally: MarkerTally, total: int, interval: float, write: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic,
                 generated: Callable[[], tuple[int, int]] | None = None, live: TextIO | None = None):
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.tally, self.write, self.clock, self.live = tally, write, clock, live
        self.interval = min(interval, LIVE_INTERVAL) if live is not None else interval
        # (images, error rows) past the last model stage in this run, when the run can tell
        self.generated = generated
        # The first poll is the baseline: rows committed by earlier attempts do not count towards the rate.
        self.progress = Progress(total=total, baseline=tally.poll(), started=clock())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="karlo-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.live is not None and self._drawn:
            self.live.write("\n")  # the summary starts below the last bar
            self.live.flush()

    _drawn = False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                tally = self.tally.poll()
                images, failed = self.generated() if self.generated else (None, 0)
            except Exception as e:  # a storage or Ray hiccup costs one status line, never the run
                logger.warning("progress: could not read the run's progress: %s", e)
                continue
            if self.live is None:
                self.write(self.progress.line(tally, self.clock(), images, failed))
            else:
                # Back to the line's start and clear it: the bar redraws where it was.
                self.live.write("\r\x1b[K" + self.progress.bar(tally, self.clock(), images, failed))
                self.live.flush()
                self._drawn = True


@contextlib.contextmanager
def report_progress(output_url: str, storage_options: dict[str, Any] | None, *, total: int, interval: float,
                    write: Callable[[str], None], generated: Callable[[], tuple[int, int]] | None = None,
                    live: TextIO | None = None) -> Iterator[None]:
    """Status lines about ``output_url`` every ``interval`` seconds while the body runs (a bar redrawn on
    ``live``, a terminal, instead); 0 turns them off."""
    if interval <= 0:
        yield
        return
    reporter = ProgressReporter(MarkerTally(output_url, storage_options), total, interval, write,
                                generated=generated, live=live)
    reporter.start()
    try:
        yield
    finally:
        reporter.stop()
