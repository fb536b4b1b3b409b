"""What the benchmark sections share: the prompts they generate from, timing, and the result objects' report."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Iterable, Mapping

import torch

PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen, studio lighting",
    "an isometric illustration of a tiny city",
)
STAGES = ("prior", "decoder", "super_res")
ReportRow = tuple[str, str, Any]  # (section, figure, value)


def prompts(n: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]}, variation {i}" for i in range(n)]


def rate(fn: Callable[[], int], repeats: int) -> float:
    """Median items/s over ``repeats`` timed calls, after one untimed warm-up call."""
    fn()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def mean_rate(*rates: float) -> float:
    """The rate of the measurements together: the mean of their seconds per item."""
    return len(rates) / sum(1 / r for r in rates)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Result:
    """A section's figures. ``as_dict`` is its JSON form (``karlo bench --json``), which ``result[key]`` reads too;
    ``report_rows`` are its lines of the plain-text report."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def report_rows(self) -> Iterable[ReportRow]:
        raise NotImplementedError


def as_json(results: Mapping[str, Result]) -> dict[str, Any]:
    """``{section: figures}`` of ``karlo bench --json``."""
    return {name: result.as_dict() for name, result in results.items()}


def format_report(results: Mapping[str, Result]) -> str:
    """One plain-text table: section, figure, value."""
    lines = [f"{'section':<14}{'figure':<52}value"]
    for result in results.values():
        for section, figure, value in result.report_rows():
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"{section:<14}{figure:<52}{text}")
    return "\n".join(lines)
