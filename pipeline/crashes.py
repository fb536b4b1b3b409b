"""A row that crashes a stage's worker process becomes an error row instead of crashing it forever.

Ray Data restarts a map actor that dies (a segfault in native code, the out-of-memory killer, ``kill -9``) and
retries its batch, without limit: actor pools run with ``max_restarts=-1`` and ``max_task_retries=-1`` (the
defaults in Ray Data's ``ray/data/_internal/execution/operators/actor_pool_map_operator.py``). That recovers from a
transient crash, but a row that crashes the process every time would be retried forever and the run would never
end. A small ledger actor, owned by the driver, counts for each row the attempts that died while the row was
being computed:

- a batch none of whose rows died before runs as usual;
- a batch holding a row that died before runs one row at a time, so that the crash is pinned on its row;
- a row that died ``MAX_DEATHS`` times becomes an error row of the stage, without running again.

A transient crash therefore costs one restart and a row-by-row pass over one batch; a poisonous row costs
``MAX_DEATHS`` restarts. Rows that finish are forgotten, so the ledger only holds rows in flight.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import columns as C

MAX_DEATHS = 3
LEDGER_TIMEOUT_S = 120

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class CrashLedger:
    """(stage, key) -> attempts that started and neither finished nor were withdrawn."""

    def __init__(self) -> None:
        self.deaths: Counter[tuple[str, str]] = Counter()
        self.finished: Counter[str] = Counter()  # stage -> rows it finished in this run (the progress line)
        self.failed: Counter[str] = Counter()  # stage -> of those, error rows
        self.first_begin: float | None = None  # when a stage began the run's first batch (time.monotonic())
        self.actors: list[dict] = []  # where each stage actor started (pipeline.actors), restarts included

    def begin(self, stage: str, keys: list[str]) -> list[int]:
        """Mark the rows in flight; returns, per row, how many earlier attempts died."""
        if self.first_begin is None:
            self.first_begin = time.monotonic()
        before = [self.deaths[(stage, key)] for key in keys]
        for key in keys:
            self.deaths[(stage, key)] += 1
        return before

    def withdraw(self, stage: str, keys: list[str]) -> None:
        """Take back a ``begin`` whose rows did not run."""
        for key in keys:
            self.deaths[(stage, key)] -= 1

    def finish(self, stage: str, keys: list[str], errors: int = 0) -> None:
        """The rows are done (``errors`` of them error rows): forget them."""
        for key in keys:
            self.deaths.pop((stage, key), None)
        self.finished[stage] += len(keys)
        self.failed[stage] += errors

    def finished_rows(self, stage: str) -> tuple[int, int]:
        """(good rows, error rows) ``stage`` has finished in this run, not yet necessarily committed (a batch Ray
        retries after its actor died past this point counts twice: an estimate for progress, never for
        accounting)."""
        return self.finished[stage] - self.failed[stage], self.failed[stage]

    def placed(self, stage: str, node_id: str, gpu_ids: list[int], pid: int) -> None:
        self.actors.append({"stage": stage, "node_id": node_id, "gpu_ids": gpu_ids, "pid": pid})

    def placements(self) -> list[dict]:
        return self.actors

    def seconds_since_first_batch(self) -> float | None:
        """How long ago the run's first batch began, or None before any batch. A duration, measured on the
        ledger's node alone: its clock need not agree with the driver's."""
        return None if self.first_begin is None else time.monotonic() - self.first_begin


def new_ledger() -> ray.actor.ActorHandle:
    """A ledger for one run. Created by the driver, which then owns it, and on the driver's node: it lives as long
    as the run, whichever actors or worker nodes die, and goes when the run drops its handle. Each run gets its
    own, so runs in one driver or on one cluster never share counts."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return CrashLedger.options(scheduling_strategy=here).remote()


def guarded(
    fn: Callable[[pa.Table], pa.Table], table: pa.Table, stage: str, ledger: ray.actor.ActorHandle
) -> pa.Table:
    """``fn(table)`` for a stage's batch, isolating and finally rejecting rows that keep killing the process."""
    keys = table.column(C.KEY).to_pylist()
    try:
        died = ray.get(ledger.begin.remote(stage, keys), timeout=LEDGER_TIMEOUT_S)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
        # The ledger is a safety net against rows that kill their worker every time; a ledger that cannot be
        # reached (slow, or gone with a driver that is itself ending) must not stall or fail the run, so the
        # batch runs unguarded.
        logger.warning("%s: the crash ledger did not answer (%s); running a batch without it", stage,
                       type(e).__name__)
        return fn(table)
    if not any(died):
        out = fn(table)
        # Not awaited: calls from one process reach the actor in order, and a finish lost with a dying process
        # only makes a retry of this batch run row by row.
        ledger.finish.remote(stage, keys, _errors(out))
        return out
    ray.get(ledger.withdraw.remote(stage, keys))
    pieces = []
    for i, (key, deaths) in enumerate(zip(keys, died)):
        row = table.slice(i, 1)
        if deaths >= MAX_DEATHS:
            pieces.append(fn(_reject(row, stage, deaths)))
            ray.get(ledger.finish.remote(stage, [key], 1))
            continue
        ray.get(ledger.begin.remote(stage, [key]))
        pieces.append(fn(row))
        ray.get(ledger.finish.remote(stage, [key], _errors(pieces[-1])))
    return pa.concat_tables(pieces)


def _errors(out: pa.Table) -> int:
    """How many rows of a stage's output are error rows."""
    return out.num_rows - pc.sum(pc.equal(out.column(C.ERROR), "")).as_py() if out.num_rows else 0


def _reject(row: pa.Table, stage: str, deaths: int) -> pa.Table:
    """The row as an error row of ``stage``; the stage passes error rows through without computing them."""
    if row.column(C.ERROR)[0].as_py():
        return row  # already an error row: it never runs, so it cannot be what crashed
    reason = (
        f"WorkerDied: the {stage} worker process died {deaths} times while computing this row (a crash in "
        "native code, the out-of-memory killer or a signal); it is not retried again"
    )
    for name, value in ((C.ERROR, reason), (C.ERROR_STAGE, stage)):
        row = row.set_column(row.schema.get_field_index(name), name, pa.array([value], pa.string()))
    return row
