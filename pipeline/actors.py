"""Ray Data wiring of the model stages: Arrow blocks in, Arrow blocks out.

Blocks stay in Arrow format between stages so that pass-through columns of any type (lists, structs,
timestamps) reach the writer untouched; a stage sees only the columns it declared, as numpy arrays.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import ray
from ray.actor import ActorHandle
from ray.data import ActorPoolStrategy, Dataset
from ray.data.block import BlockAccessor
from ray.data.extensions import ArrowTensorArray

from . import columns as C
from . import crashes, embedded
from .config import STAGE_NAMES, RunConfig, StageConfig
from .placement import Reservation, map_batches_args, per_actor_scheduling


class StageActor:
    """One actor of a stage's pool: loads the stage's model components once, then maps batches.

    Each stage has its subclass beside it (``PriorActor`` in pipeline.stages, ...), naming the stage class: Ray
    ships the subclass by reference, so an actor imports only its own stage's module, and a decoder actor does not
    pay for the imports of CLIP scoring or image variations when it starts. One subclass per stage also names the
    operators in Ray's progress and stats (``MapBatches(PriorActor)``, ...).
    """

    stage_class: type  # a pipeline.stages.Stage

    def __init__(self, kwargs: dict, crash_ledger: ActorHandle):
        self.stage_name = self.stage_class.name
        # Where this actor runs, for the manifest: recorded before the model loads, so an actor the run ends
        # while it is still loading is counted too (not awaited: the ledger is on the driver's node).
        crash_ledger.placed.remote(self.stage_name, ray.get_runtime_context().get_node_id(),
                                   [int(i) for i in ray.get_gpu_ids()], os.getpid())
        self.stage = self.stage_class(**{**kwargs, "model": embedded.resolve(kwargs["model"])})
        made = set(self.stage.empty(0)) - {C.ERROR, C.ERROR_STAGE}
        if made != set(self.stage.outputs):  # a stage whose outputs and declaration differ is a bug: fail early
            raise TypeError(f"{self.stage_name} stage makes {sorted(made)}, declares {sorted(self.stage.outputs)}")
        self.columns = sorted(set(self.stage.inputs) | {C.ERROR, C.ERROR_STAGE})
        self.crash_ledger = crash_ledger

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return table  # possibly without columns (see pipeline.shards.iter_shards)
        return crashes.guarded(self._map, table, self.stage_name, self.crash_ledger)

    def _map(self, table: pa.Table) -> pa.Table:
        batch = BlockAccessor.for_block(table.select(self.columns)).to_batch_format("numpy")
        out = self.stage(batch)
        keep = [c for c in table.column_names if c not in self.stage.consumes and c not in out]
        result = table.select(keep)
        for name, values in out.items():
            result = result.append_column(name, to_arrow(values))
        return result


def to_arrow(values: np.ndarray) -> pa.Array:
    """numpy column -> Arrow: (N, ...) arrays become Ray tensor columns, strings stay strings."""
    values = np.asarray(values)
    if values.ndim > 1:
        return ArrowTensorArray.from_numpy(np.ascontiguousarray(values))
    if values.dtype == object:
        return pa.array(values.tolist(), pa.string())
    return pa.array(values)


def add_stage(
    ds: Dataset, actor: type[StageActor], stage: StageConfig, cfg: RunConfig, model: str | embedded.EmbeddedModel,
    ledger: ActorHandle, reservation: Reservation | None, **settings: object,
) -> Dataset:
    """Append the stage of ``actor`` as a pool of such actors; ``model`` is the Karlo repo, or the CLIP tower of
    the score stage (an EmbeddedModel: the embedded default, which each node builds for itself);
    ``ledger`` the run's crash ledger (pipeline.crashes); ``reservation`` the GPUs reserved for the stage actors
    (pipeline.placement), None when no stage uses a GPU; ``settings`` the stage's own (the CLIP score stage's
    ``reference`` column)."""
    name = actor.stage_class.name
    kwargs: dict = dict(
        model=model,
        device=stage.device,
        dtype=stage.dtype,
        storage_options=cfg.storage_options,
        torch_threads=stage.torch_threads if stage.device == "cpu" else None,
        skip_networks=cfg.skip_networks,
        **settings,
    )
    if name in STAGE_NAMES:  # the sampling stages
        kwargs["steps"] = cfg.steps(name)
        if cfg.lora:
            kwargs["lora"] = cfg.lora
    with per_actor_scheduling():
        return ds.map_batches(
            actor,
            fn_constructor_args=(kwargs, ledger),
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=stage.min_actors, max_size=stage.max_actors),
            num_cpus=stage.num_cpus,
            num_gpus=stage.num_gpus,
            **map_batches_args(reservation, name),
        )
