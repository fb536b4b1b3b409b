"""The status line of a running generation (formatting, rate and ETA maths, the commit-marker tally and the
reporting thread) and the summary table; one real `karlo generate` prints both."""

from __future__ import annotations

import io
import logging
import re
import threading
import time

import pytest

from jobs.run_report import format_summary
from pipeline.progress import (
    MarkerTally,
    Progress,
    ProgressReporter,
    Tally,
    format_duration,
    format_rate,
    report_progress,
)
from pipeline.run import RunSummary
from pipeline.sinks import write_json_atomic

LINE = re.compile(r"\[karlo\] [\d,]+/[\d,]+ rows \(\d+\.\d%\)( \| [\d,]+ generated)? \| [\d.]+ img/s \| ETA (--|\w+) \| [\d,]+ errors?")


@pytest.mark.parametrize("seconds, text", [
    (-3, "0s"), (0, "0s"), (59.9, "59s"), (60, "1m00s"), (192, "3m12s"), (3599, "59m59s"), (3600, "1h00m"),
    (3720, "1h02m"), (86399, "23h59m"), (86400 + 3 * 3600 + 59, "1d03h"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("rate, text", [
    (0.0, "0.000"), (0.1234, "0.123"), (4.567, "4.57"), (45.64, "45.6"), (456.4, "456"), (45_600.2, "45600"),
])
def test_format_rate(rate, text):
    assert format_rate(rate) == text


def test_line_shows_rows_rate_eta_and_errors():
    p = Progress(total=10_000, baseline=Tally(), started=100.0)
    # 1,232 images and 2 error rows in 27 s: 45.63 img/s; 8,766 rows left at 1,234 rows / 27 s = 191.8 s.
    line = p.line(Tally(rows=1_232, errors=2), now=127.0)
    assert line == "[karlo] 1,234/10,000 rows (12.3%) | 45.6 img/s | ETA 3m11s | 2 errors"
    assert LINE.fullmatch(line)


def test_rate_and_eta_count_only_this_run_when_resuming():
    p = Progress(total=10_000, baseline=Tally(rows=5_000, errors=10), started=0.0)
    tally = Tally(rows=5_090, errors=20)  # this run: 90 images + 10 error rows in 100 s, 1 row/s
    assert p.images_per_second(tally, now=100.0) == pytest.approx(0.9)
    assert p.eta(tally, now=100.0) == pytest.approx(10_000 - 5_110)
    assert p.line(tally, now=100.0) == "[karlo] 5,110/10,000 rows (51.1%) | 0.900 img/s | ETA 1h21m | 20 errors"


def test_eta_is_unknown_before_the_first_commit_and_zero_when_done():
    p = Progress(total=8, baseline=Tally(rows=2, errors=1), started=10.0)
    assert p.eta(Tally(rows=2, errors=1), now=50.0) is None
    assert p.line(Tally(rows=2, errors=1), now=50.0) == "[karlo] 3/8 rows (37.5%) | 0.000 img/s | ETA -- | 1 error"
    assert p.eta(Tally(rows=7, errors=1), now=60.0) == 0.0
    assert p.line(Tally(rows=7, errors=1), now=60.0).startswith("[karlo] 8/8 rows (100.0%) | 0.100 img/s | ETA 0s")
    empty = Progress(total=0, baseline=Tally(), started=0.0)
    assert empty.line(Tally(), now=0.0).startswith("[karlo] 0/0 rows (100.0%)")


def marker(fs_root, shard: str, rows: int, errors: int) -> None:
    from fsspec.implementations.local import LocalFileSystem

    write_json_atomic(LocalFileSystem(), f"{fs_root}/_commits/{shard}.json",
                      {"shard": shard, "rows": rows, "errors": errors, "files": [], "bytes": 0})


def test_marker_tally_reads_each_new_marker_once(tmp_path):
    tally = MarkerTally(str(tmp_path))
    assert tally.poll() == Tally()  # no _commits/ yet
    marker(tmp_path, "a" * 16, rows=3, errors=1)
    marker(tmp_path, "b" * 16, rows=2, errors=0)
    (tmp_path / "_commits" / ".tmp-cccccccccccccccc.json-0123456789ab").write_text("{")  # a marker being written
    (tmp_path / "_commits" / "notes.json").write_text("{")
    assert tally.poll() == Tally(rows=5, errors=1)
    # A marker never changes once written, so a seen one is not read again.
    marker(tmp_path, "a" * 16, rows=100, errors=100)
    marker(tmp_path, "d" * 16, rows=4, errors=2)
    assert tally.poll() == Tally(rows=9, errors=3)
    assert tally.poll() == Tally(rows=9, errors=3)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_reporter_prints_lines_until_stopped(tmp_path):
    marker(tmp_path, "a" * 16, rows=10, errors=0)  # committed by an earlier attempt
    lines: list[str] = []
    clock = iter(range(1000)).__next__  # one second per call: started at 0, the first line at 1, ...
    reporter = ProgressReporter(MarkerTally(str(tmp_path)), total=40, interval=0.02, write=lines.append, clock=clock)
    assert reporter.progress.baseline == Tally(rows=10)
    reporter.start()
    wait_until(lambda: len(lines) >= 2)
    assert lines[0].startswith("[karlo] 10/40 rows (25.0%) | 0.000 img/s | ETA -- | 0 errors")
    marker(tmp_path, "b" * 16, rows=8, errors=2)
    wait_until(lambda: "20/40 rows" in lines[-1])
    reporter.stop()
    assert not reporter._thread.is_alive()
    count = len(lines)
    time.sleep(0.1)
    assert len(lines) == count
    assert all(LINE.fullmatch(line) and "\r" not in line for line in lines)
    assert "| 2 errors" in lines[-1]


def test_live_reporter_redraws_one_bar_in_place(tmp_path):
    """In a terminal: the bar is redrawn on one line (carriage return, clear), and the summary starts below it."""
    marker(tmp_path, "a" * 16, rows=10, errors=0)
    stream = io.StringIO()
    reporter = ProgressReporter(MarkerTally(str(tmp_path)), total=40, interval=10.0, write=pytest.fail,
                                live=stream, generated=lambda: (4, 1))
    assert reporter.interval == 1.0  # a terminal redraws every second, whatever the interval of plain lines
    reporter.interval = 0.02
    reporter.start()
    wait_until(lambda: stream.getvalue().count("\r") >= 2)
    reporter.stop()
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    draws = [d for d in text.rstrip("\n").split("\r\x1b[K") if d]
    assert len(draws) >= 2
    for d in draws:
        assert d.startswith("[karlo] [======>                 ] 10/40 rows (25.0%) | 14 generated | ")
        assert d.endswith("| 1 error") and "\n" not in d


def test_error_rows_past_the_last_stage_count_as_errors_not_images():
    """3 rows past the last stage, 2 of them error rows: 1 generated image, 2 errors, and the ETA counts all 3."""
    p = Progress(total=3, baseline=Tally(), started=0.0)
    line = p.line(Tally(), now=30.0, generated=1, failed=2)
    assert line == "[karlo] 0/3 rows (0.0%) | 1 generated | 0.033 img/s | ETA 0s | 2 errors"


def test_reporter_survives_storage_errors(tmp_path, caplog):
    class Flaky(MarkerTally):
        calls = 0

        def poll(self) -> Tally:
            self.calls += 1
            if self.calls == 2:
                raise OSError("connection reset")
            return super().poll()

    lines: list[str] = []
    reporter = ProgressReporter(Flaky(str(tmp_path)), total=5, interval=0.02, write=lines.append)
    with caplog.at_level(logging.WARNING, logger="pipeline.progress"):
        reporter.start()
        wait_until(lambda: len(lines) >= 2)
        reporter.stop()
    assert "could not read the run's progress: connection reset" in caplog.text


def test_zero_interval_turns_progress_off():
    before = threading.active_count()
    lines: list[str] = []
    # Nothing is opened either: the URL's scheme does not even exist.
    with report_progress("nosuchscheme://bucket/out", None, total=5, interval=0, write=lines.append):
        assert threading.active_count() == before
    assert lines == []
    with pytest.raises(ValueError, match="interval must be > 0"):
        ProgressReporter(MarkerTally("/nonexistent"), total=1, interval=0, write=lines.append)


def test_summary_table():
    s = RunSummary(output_url="s3://bucket/out", rows_in=10, written=6, errors=2, resumed=3, shards=4,
                   bad_files=[("b.parquet", "not a Parquet file")], seconds=125.0, images_this_run=3)
    assert format_summary(s).splitlines() == [
        "[karlo] run INCOMPLETE",
        "  rows read        10",
        "  images written   6 (3 from earlier attempts)",
        "  error rows       2  -> see errors/",
        "  shards           4",
        "  images/s         0.02 (3 in 125.0 s)",
        "  time             2m05s",
        "  output           s3://bucket/out  (images/, img_emb/, text_emb/, raw_img_emb/, metadata/, errors/, manifest.json)",
        "  unreadable file  b.parquet: not a Parquet file",
        "  INCOMPLETE: rows are missing; rerun the same command to finish",
    ]


def test_summary_rate_after_start_up():
    s = RunSummary(output_url="out", rows_in=8, written=8, errors=0, resumed=0, shards=1, bad_files=[],
                   seconds=50.0, images_this_run=8, start_up_seconds=10.0)
    assert s.images_per_second_after_start_up == pytest.approx(8 / 40)
    assert "  images/s         0.16 (8 in 50.0 s; 0.20 after 10.0 s of start-up)" in format_summary(s).splitlines()
    # A resumed run with nothing left to do has no start-up to speak of.
    none = RunSummary(output_url="out", rows_in=8, written=8, errors=0, resumed=8, shards=1, bad_files=[],
                      seconds=3.0, images_this_run=0)
    assert none.images_per_second_after_start_up is None and "start-up" not in format_summary(none)


def test_summary_counts_images_apart_from_error_rows_of_earlier_attempts():
    """7 rows committed before this attempt, 3 of them error rows: 4 of the images are from earlier attempts."""
    s = RunSummary(output_url="out", rows_in=12, written=8, errors=3, resumed=7, shards=3, bad_files=[],
                   seconds=10.0, images_this_run=4, rejected=1)
    lines = format_summary(s).splitlines()
    assert "  images written   8 (4 from earlier attempts)" in lines
    assert "  output           out  (images/, img_emb/, text_emb/, raw_img_emb/, metadata/, errors/, rejected/, manifest.json)" \
        in lines


def test_summary_lists_the_folders_the_run_has():
    """A scored run has clip_img_emb/; a run whose every row failed has errors/ and no image folders."""
    scored = RunSummary(output_url="out", rows_in=5, written=3, errors=1, resumed=0, shards=2, bad_files=[],
                        seconds=1.0, images_this_run=3, rejected=1, clip_scored=True)
    assert "  output           out  (images/, img_emb/, text_emb/, raw_img_emb/, metadata/, clip_img_emb/, errors/, rejected/, " \
        "manifest.json)" in format_summary(scored).splitlines()
    failed = RunSummary(output_url="out", rows_in=2, written=0, errors=2, resumed=0, shards=1, bad_files=[],
                        seconds=1.0, images_this_run=0)
    assert "  output           out  (errors/, manifest.json)" in format_summary(failed).splitlines()


@pytest.mark.slow
def test_generate_prints_progress_lines_and_the_summary(generated_run):
    result = generated_run.result
    assert result.exit_code == 3, f"{result.exception!r}\n{result.output[-3000:]}"  # one error row
    progress = [line for line in result.stderr.splitlines() if line.startswith("[karlo]")]
    assert progress, result.stderr
    assert all(LINE.fullmatch(line) for line in progress), progress
    assert "\r" not in result.stderr
    done = [int(re.match(r"\[karlo\] (\d+)/6 rows", line).group(1)) for line in progress]
    assert done == sorted(done) and done[-1] <= 6
    assert "[karlo] run complete" in result.stdout
    assert "  images written   5" in result.stdout and "  error rows       1  -> see errors/" in result.stdout
    assert "  shards           6" in result.stdout  # one row per shard


def test_rows_past_the_last_stage_show_before_their_shard_commits():
    p = Progress(total=8, baseline=Tally(rows=2), started=0.0)
    # 3 more rows generated in 30 s, none committed yet: the rate and the ETA follow them (3 rows / 30 s, 3 left).
    line = p.line(Tally(rows=2), now=30.0, generated=3)
    assert line == "[karlo] 2/8 rows (25.0%) | 5 generated | 0.100 img/s | ETA 30s | 0 errors"
    # A batch retried after its actor died may be counted twice: never more than the input.
    assert "| 8 generated |" in p.line(Tally(rows=2), now=30.0, generated=9)
    # Commits ahead of the count (e.g. rows of an error shard): the ETA follows the commits.
    assert p.eta(Tally(rows=5), now=30.0, generated=1) == pytest.approx(30.0)
