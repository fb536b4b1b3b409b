"""The table ``karlo generate`` and ``karlo variations`` print when a run ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.outputs import (
    CLIP_EMB_DIR,
    ERRORS_DIR,
    IMAGES_DIR,
    IMG_EMB_DIR,
    MANIFEST,
    METADATA_DIR,
    RAW_IMG_EMB_DIR,
    REJECTED_DIR,
    TEXT_EMB_DIR,
)
from pipeline.progress import PREFIX, format_duration

if TYPE_CHECKING:  # annotations only: pipeline.run imports Ray, which the summary does not need
    from pipeline.run import RunSummary


def format_summary(s: RunSummary) -> str:
    """The table printed when a run ends: counts, speed, where the output is, and what to do if incomplete."""
    status = "complete" if s.complete else "INCOMPLETE"
    if s.complete and s.left_out:
        status += f" for the first {s.rows_in // s.images_per_prompt} input rows (--limit)"
    rows = [
        ("rows read", f"{s.rows_in}" if s.images_per_prompt == 1 else
         f"{s.rows_in // s.images_per_prompt} {'prompts' if s.task == 'generate' else 'input images'} x "
         f"{s.images_per_prompt} images = {s.rows_in} rows"),
        *([("left out", f"{s.left_out} input rows after --limit; rerun without it (or with a larger one) to "
                        "continue")] if s.left_out else []),
        # Committed rows found at the start count error and rejected rows too: the images are the difference.
        ("images written", f"{s.written}" + (f" ({s.written - s.images_this_run} from earlier attempts)"
                                             if s.written > s.images_this_run else "")),
        ("error rows", f"{s.errors}" + (f"  -> see {ERRORS_DIR}/" if s.errors else "")),
        *([("rejected rows", f"{s.rejected}  (below --min-clip-score) -> see {REJECTED_DIR}/")] if s.rejected else []),
        ("shards", f"{s.shards}"),
        ("images/s", f"{s.images_per_second:.2f} ({s.images_this_run} in {s.seconds:.1f} s{_after_start_up(s)})"),
        ("time", format_duration(s.seconds)),
        ("output", f"{s.output_url}  ({', '.join(_folders(s))}, {MANIFEST})"),
    ]
    rows += [("unreadable file", f"{source}: {reason}") for source, reason in s.bad_files]
    lines = [f"{PREFIX} run {status}"] + [f"  {label:<16} {value}" for label, value in rows]
    if not s.complete:
        lines.append("  INCOMPLETE: rows are missing; rerun the same command to finish")
    return "\n".join(lines)


def _folders(s: RunSummary) -> list[str]:
    """The run's folders that hold something: a shard writes a folder's file exactly when it has rows for it
    (pipeline.sinks), so the committed counts say which folders exist."""
    good = [IMAGES_DIR, IMG_EMB_DIR, TEXT_EMB_DIR, RAW_IMG_EMB_DIR, METADATA_DIR] + [CLIP_EMB_DIR] * s.clip_scored
    folders = good * bool(s.written) + [ERRORS_DIR] * bool(s.errors) + [REJECTED_DIR] * bool(s.rejected)
    return [f"{folder}/" for folder in folders]


def _after_start_up(s: RunSummary) -> str:
    rate = s.images_per_second_after_start_up
    if rate is None:
        return ""
    return f"; {rate:.2f} after {s.start_up_seconds:.1f} s of start-up"
