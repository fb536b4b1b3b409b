"""The summary of a sweep: one row per point, read back from each point's manifest and committed shards."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline import columns as C
from pipeline.outputs import CommittedRun, is_finished, output_filesystem, read_manifest

from .spec import Point, SweepSpec, format_value

SUMMARY_PARQUET, SUMMARY_MD = "summary.parquet", "summary.md"


SUMMARY_SCHEMA = pa.schema([
    ("point", pa.string()),
    ("status", pa.string()),  # complete | incomplete | failed | not run
    ("rows", pa.int64()),  # input rows
    ("written", pa.int64()),
    ("errors", pa.int64()),
    ("images_per_second", pa.float64()),  # of the point's last attempt
    ("seconds", pa.float64()),
    ("clip_score", pa.float64()),  # mean over written rows; null without CLIP scoring
    ("settings", pa.string()),  # the point's settings as JSON
    ("message", pa.string()),
])


def summarize(spec: SweepSpec, grid: list[Point], failures: dict[str, str]) -> pa.Table:
    """One row per point, read back from each point's manifest and metadata."""
    fs, root = output_filesystem(spec.output)
    rows = []
    for point in grid:
        folder = f"{root}/{point.name}"
        manifest = read_manifest(fs, folder)
        counts = (manifest or {}).get("counts", {})
        attempt = (manifest or {}).get("last_attempt", {})
        if point.name in failures:
            status = "failed"
        elif manifest is None:
            status = "not run"
        else:
            status = "complete" if is_finished(fs, folder) else "incomplete"
        rows.append({
            "point": point.name,
            "status": status,
            "rows": counts.get("input_rows", (manifest or {}).get("input_rows")),
            "written": counts.get("written"),
            "errors": counts.get("errors"),
            "images_per_second": attempt.get("images_per_second"),
            "seconds": attempt.get("seconds"),
            "clip_score": CommittedRun(fs, folder).column_mean(C.CLIP_SCORE) if manifest else None,
            "settings": json.dumps(point.as_dict(spec)["settings"], sort_keys=True),
            "message": failures.get(point.name, ""),
        })
    axes = list(grid[0].axes) if grid else []
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    for j, axis in enumerate(axes):  # one column per axis, after the point name
        table = table.add_column(1 + j, axis, pa.array([format_value(p.axes[axis]) for p in grid], pa.string()))
    return table


def markdown(table: pa.Table) -> str:
    """The summary as a Markdown table (the settings JSON left out: the axis columns show what varies)."""
    columns = [c for c in table.column_names if c != "settings"]

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.select(columns).to_pylist():
        lines.append("| " + " | ".join(cell(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"
