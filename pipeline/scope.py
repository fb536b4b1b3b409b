"""Which rows a run covers: the first input rows (``--limit``) and the images per input row (``--images-per-prompt``).

Neither is part of the run's settings identity (:meth:`pipeline.config.RunConfig.output_settings`): they choose
rows, not pixels. A trial run over the first rows and the full run after it are one run, with the same keys and
images; so are runs that add images per prompt. The manifest records the scope, and a later run into the same
OUTPUT may widen it but not narrow it: every committed row then stays one of the rows the run plans, so
rows in = written + errors + rejected keeps holding and resume skips exactly the committed rows. A narrower
scope is refused like other settings are (``--overwrite`` starts over).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import columns as C
from .config import RunConfig
from .reader import InputError, InputPlan, first_rows


@dataclass(frozen=True)
class Scope:
    input_rows: int  # rows of the readable input files
    taken: int  # the first of them the run takes: all, without a limit
    limit: int | None
    images_per_prompt: int

    @property
    def rows(self) -> int:
        """The rows the run accounts for: one per image of every input row taken (error rows included)."""
        return self.taken * self.images_per_prompt

    @property
    def left_out(self) -> int:
        """Input rows after the limit, which the run does not read."""
        return self.input_rows - self.taken

    def record(self) -> dict[str, Any]:
        """What the manifest says of the scope, beside ``input_rows`` (:attr:`rows`); nothing for a run over every
        input row with one image each, whose manifest stays what it was."""
        out: dict[str, Any] = {}
        if self.limit is not None:
            out["limit"] = {"limit": self.limit, "input_rows_taken": self.taken, "input_rows_left_out": self.left_out}
        if self.images_per_prompt > 1:
            out["images_per_prompt"] = self.images_per_prompt
        return out

    def narrowing(self, previous: dict[str, Any]) -> str:
        """Why this scope cannot continue the run whose manifest is ``previous`` ("" when it can): OUTPUT may hold
        rows this scope leaves out. One image per row cannot grow into several either: the committed metadata has
        no ``sample_index`` column, and files with and without it do not load as one dataset."""
        before = previous.get("limit")
        taken_before = before["input_rows_taken"] if before else None  # None: every input row
        if taken_before is None and self.left_out:
            return (f"a run over all {self.input_rows} input rows, which --limit {self.limit} would cut to the first "
                    f"{self.taken}; drop --limit to continue it")
        if taken_before is not None and self.taken < taken_before:
            return (f"a run over the first {taken_before} input rows, more than --limit {self.limit} takes; give "
                    f"--limit {taken_before} or more, or no --limit, to continue it")
        n_before = previous.get("images_per_prompt", 1)
        if self.images_per_prompt < n_before:
            return (f"a run of {n_before} images per prompt, more than --images-per-prompt {self.images_per_prompt}; "
                    f"give {n_before} or more to continue it")
        if n_before == 1 < self.images_per_prompt:
            return (f"a run of one image per prompt, whose metadata has no {C.SAMPLE_INDEX} column: "
                    f"--images-per-prompt {self.images_per_prompt} cannot add images to it")
        return ""


def take_rows(cfg: RunConfig, plan: InputPlan) -> tuple[InputPlan, Scope]:
    """The plan cut to ``cfg.limit`` rows, and the run's scope; raises InputError for an input column that
    ``--images-per-prompt`` would overwrite."""
    if cfg.images_per_prompt > 1 and C.SAMPLE_INDEX in plan.schema.names:
        raise InputError(f"{plan.url}: the input has a {C.SAMPLE_INDEX!r} column, which --images-per-prompt "
                         "writes; rename it")
    taken = plan if cfg.limit is None else first_rows(plan, cfg.limit)
    return taken, Scope(input_rows=plan.total_rows, taken=taken.total_rows, limit=cfg.limit,
                        images_per_prompt=cfg.images_per_prompt)
