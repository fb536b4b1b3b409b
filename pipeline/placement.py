"""Place the GPU stages' actors so that every GPU holds the configured mix, on one node or many.

Ray assigns a fractional-GPU actor to the first GPU with room for it, in the order the actors are created, and
Ray Data creates the pools in pipeline order (prior, decoder, super-res). With the shares 0.08 / 0.3 / 0.6 on
8 GPUs that put 8 priors and a decoder on GPU 0, three decoders on GPUs 1 and 2, and left 3 of the 8 super-res
actors unplaced for the whole run. So the run packs the actors itself and reserves the result:

- every GPU actor of every stage (a pool's maximum size) is packed first-fit decreasing into whole GPUs: the
  largest share first, each actor into the first GPU with room; for equal pools of 0.6 / 0.3 / 0.08 that gives
  each GPU one actor of each stage;
- one placement group holds one bundle per packed GPU, ``{"GPU": 1, "CPU": the CPUs of its actors}``, strategy
  PACK (fill a node's GPUs before the next node's); a bundle of whole GPUs is placed by GPU count alone, so Ray's
  per-GPU first fit plays no part;
- each actor is created in its own bundle: the n-th actor of a stage goes to the n-th GPU the packing gave the
  stage. An actor that Ray restarts (a crash, a lost node) keeps its bundle, and Ray re-places the bundles of a
  lost node when another has room.

CPU stages reserve nothing: CPUs are one pool per node, not packed per device.

Before any work the reservation must succeed. A cluster with fewer GPUs than the packing needs is refused at
once, naming the shortfall; one that has enough but not free (other jobs hold them) is refused after
``timeout`` seconds. On an autoscaling cluster (KubeRay with ``enableInTreeAutoscaling``) a pending reservation
is a resource demand the autoscaler acts on: give a timeout long enough for GPU nodes to start
(``--placement-timeout``), and the shortfall check waits for them instead of refusing.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import ConfigError, StageConfig

# Shares are packed in units of 1/10,000 of a GPU, Ray's own resolution for fractional resources, so that float
# sums such as 0.3 + 0.6 + 0.08 are compared exactly.
UNITS = 10_000
# How long a reservation that the cluster can hold may stay pending before it is refused (nodes report resources
# freed by other work with a short delay).
PENDING_GRACE_S = 30.0


class PlacementError(ConfigError):
    """The cluster cannot hold the stage actors; the message says what does not fit."""


def _units(share: float) -> int:
    return round(share * UNITS)


@dataclass(frozen=True)
class Packing:
    """GPU actors packed into whole GPUs; ``slots[stage][n]`` is the GPU of the stage's n-th actor."""

    bins: tuple[tuple[str, ...], ...]  # per GPU: stage names, one per actor
    cpus: tuple[float, ...]  # per GPU: the CPUs its actors reserve
    shares: tuple[float, ...]  # per GPU: the GPU share its actors reserve
    slots: Mapping[str, tuple[int, ...]]

    @property
    def gpus(self) -> int:
        return len(self.bins)

    def counts(self, gpu: int) -> dict[str, int]:
        """Stage -> actors packed onto GPU ``gpu``."""
        return {name: self.bins[gpu].count(name) for name in dict.fromkeys(self.bins[gpu])}

    def bundles(self) -> list[dict[str, float]]:
        return [{"GPU": 1, **({"CPU": c} if c > 0 else {})} for c in self.cpus]


def pack(stages: Mapping[str, StageConfig]) -> Packing:
    """First-fit decreasing packing of every GPU stage's actors (its pool's maximum) into whole GPUs."""
    gpu_stages = sorted(((n, s) for n, s in stages.items() if s.num_gpus > 0),
                        key=lambda item: -_units(item[1].num_gpus))
    free: list[int] = []  # units left per GPU
    bins: list[list[str]] = []
    cpus: list[float] = []
    slots: dict[str, list[int]] = {}
    for name, stage in gpu_stages:
        need = _units(stage.num_gpus)
        if need > UNITS:
            raise PlacementError(f"stage {name} asks for {stage.num_gpus:g} GPUs per actor; an actor holds at most "
                                 "one GPU (num_gpus <= 1)")
        for _ in range(stage.max_actors):
            index = next((i for i, left in enumerate(free) if left >= need), None)
            if index is None:
                free.append(UNITS)
                bins.append([])
                cpus.append(0.0)
                index = len(free) - 1
            free[index] -= need
            bins[index].append(name)
            cpus[index] += stage.num_cpus
            slots.setdefault(name, []).append(index)
    return Packing(bins=tuple(tuple(b) for b in bins), cpus=tuple(cpus),
                   shares=tuple((UNITS - left) / UNITS for left in free),
                   slots={n: tuple(v) for n, v in slots.items()})


@dataclass
class Reservation:
    """A placement group holding the packing, and the scheduling of each stage's actors into it."""

    packing: Packing
    group: PlacementGroup

    def remote_args_fn(self, stage: str) -> Callable[[], dict[str, Any]]:
        """Ray Data calls this before creating each actor of ``stage``: the n-th actor goes to the stage's n-th
        GPU. (The pool never creates more actors than its maximum, which is what was packed; the cycle only
        matters if Ray Data replaces an actor it gave up on.)"""
        slots = itertools.cycle(self.packing.slots[stage])

        def args() -> dict[str, Any]:
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=next(slots), placement_group_capture_child_tasks=False)}

        return args

    def bundle_nodes(self) -> list[str]:
        """The node id of each bundle (GPU of the packing)."""
        table = ray.util.placement_group_table(self.group)
        return [table["bundles_to_node_id"][i] for i in range(self.packing.gpus)]

    def release(self) -> None:
        remove_placement_group(self.group)


def _gpus(n: int) -> str:
    return f"{n} GPU{'s' * (n != 1)}"


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0.0)


def shortfall_message(packing: Packing, stages: Mapping[str, StageConfig], have: float) -> str:
    per_stage = ", ".join(f"{n} {s.max_actors} x {s.num_gpus:g}" for n, s in stages.items() if s.num_gpus > 0)
    fit = max(0, math.floor(have))
    return (f"the stage actors need {_gpus(packing.gpus)} ({per_stage} GPU per actor, packed so that each GPU holds "
            f"its share of every stage) but the Ray cluster has {have:g}; lower the pools' actors to fit {fit} "
            "GPUs, or on an autoscaling cluster give --placement-timeout to wait for GPU nodes")


def reserve(stages: Mapping[str, StageConfig], *, timeout: float = 0.0,
            echo: Callable[[str], None] | None = None) -> Reservation | None:
    """Reserve the packing of ``stages``' GPU actors (None if no stage uses a GPU); refuse before any work when
    it cannot be placed. ``timeout`` > 0 waits that long for GPUs that are busy or not there yet."""
    packing = pack(stages)
    if packing.gpus == 0:
        return None
    have = cluster_gpus()
    if have < packing.gpus and timeout <= 0:
        raise PlacementError(shortfall_message(packing, stages, have))
    group = placement_group(packing.bundles(), strategy="PACK", name="")
    if echo and have < packing.gpus:
        echo(f"waiting up to {timeout:g} s for {_gpus(packing.gpus)} (the cluster has {have:g} now)")
    wait = max(timeout, PENDING_GRACE_S)
    if not group.wait(wait):
        remove_placement_group(group)
        have = cluster_gpus()
        if have < packing.gpus:
            raise PlacementError(shortfall_message(packing, stages, have))
        raise PlacementError(
            f"could not reserve {_gpus(packing.gpus)} with {max(packing.cpus):g} CPUs beside each on their nodes "
            f"within {wait:g} s: other work holds them, or no node has the CPUs a GPU's actors need (see `karlo plan`)")
    return Reservation(packing, group)


@contextlib.contextmanager
def reserved(stages: Mapping[str, StageConfig], *, timeout: float = 0.0,
             echo: Callable[[str], None] | None = None) -> Iterator[Reservation | None]:
    """``reserve`` for the length of a run, released whatever way the run ends."""
    reservation = reserve(stages, timeout=timeout, echo=echo)
    try:
        yield reservation
    finally:
        if reservation is not None:
            reservation.release()


def placement_record(reservation: Reservation | None) -> dict[str, Any] | None:
    """The reservation for the manifest: per reserved GPU, its node and the stage actors packed onto it."""
    if reservation is None:
        return None
    packing = reservation.packing
    return {"gpus": packing.gpus, "strategy": "PACK", "bundles": [
        {"node_id": node, "actors": packing.counts(i), "share": packing.shares[i], "cpus": packing.cpus[i]}
        for i, node in enumerate(reservation.bundle_nodes())]}


def map_batches_args(reservation: Reservation | None, stage: str) -> dict[str, Any]:
    """The ``map_batches`` arguments that put ``stage``'s actors in their bundles (none for a CPU stage)."""
    if reservation is None or stage not in reservation.packing.slots:
        return {}
    return {"ray_remote_args_fn": reservation.remote_args_fn(stage)}


@contextlib.contextmanager
def per_actor_scheduling() -> Iterator[None]:
    """Ray 2.60 marks ``ray_remote_args_fn`` deprecated for removal in 2.64 (pyproject pins Ray below it) and
    offers no other way to give the actors of one pool different bundles; its warning is nothing a user can act
    on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*deprecated")
        yield


@ray.remote(num_cpus=0)
def _where() -> tuple[str, list[int]]:
    """Run in a bundle: its node and the GPU indices Ray assigned to it."""
    return ray.get_runtime_context().get_node_id(), [int(i) for i in ray.get_gpu_ids()]


def layout(stages: Mapping[str, StageConfig], *, timeout: float = 0.0) -> dict[str, Any]:
    """Reserve what a run of ``stages`` reserves, find where each GPU of the packing landed, release it.

    ``{"nodes": [{"node_id", "address", "cpus", "gpus": [{"index", "actors": {stage: n}, "share"}]}],
    "unplaced": {stage: actors}, "gpus_needed", "cpu_stages": {...}, "error": None or the refusal}``.
    """
    packing = pack(stages)
    nodes = _alive_nodes()
    report: dict[str, Any] = {
        "nodes": [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"],
                   "cpus": n["Resources"].get("CPU", 0.0), "gpus_total": int(n["Resources"].get("GPU", 0)),
                   "gpus": []} for n in nodes],
        "gpus_needed": packing.gpus,
        "cpu_stages": {name: {"actors": [s.min_actors, s.max_actors], "num_cpus": s.num_cpus}
                       for name, s in stages.items() if s.num_gpus == 0},
        "unplaced": {name: 0 for name, s in stages.items() if s.num_gpus > 0},
        "error": None,
    }
    try:
        reservation = reserve(stages, timeout=timeout)
    except PlacementError as e:
        report["error"] = str(e)
        for actors in _unplaced_bins(packing, nodes):
            for name in actors:
                report["unplaced"][name] += 1
        return report
    if reservation is None:
        return report
    try:
        where = ray.get([_where.options(num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            reservation.group, placement_group_bundle_index=i)).remote() for i in range(packing.gpus)])
    finally:
        reservation.release()
    by_node = {n["node_id"]: n for n in report["nodes"]}
    for i, (node_id, gpu_ids) in enumerate(where):
        by_node[node_id]["gpus"].append({"index": gpu_ids[0] if gpu_ids else None, "actors": packing.counts(i),
                                         "share": round(packing.shares[i], 4), "cpus": packing.cpus[i]})
    for node in report["nodes"]:
        node["gpus"].sort(key=lambda g: (g["index"] is None, g["index"]))
    return report


def _alive_nodes() -> list[dict[str, Any]]:
    return sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeManagerAddress"] + n["NodeID"])


def _unplaced_bins(packing: Packing, nodes: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The packed GPUs that the cluster's nodes cannot hold, filling nodes in turn as PACK does (by their total
    resources: an estimate of what does not fit, for the report of a refused reservation)."""
    free = [[n["Resources"].get("GPU", 0.0), n["Resources"].get("CPU", 0.0)] for n in nodes]
    left = []
    for actors, cpus in zip(packing.bins, packing.cpus):
        node = next((f for f in free if f[0] >= 1 and f[1] >= cpus), None)
        if node is None:
            left.append(actors)
            continue
        node[0] -= 1
        node[1] -= cpus
    return left


def format_layout(report: Mapping[str, Any]) -> str:
    """The layout as text: one line per GPU, grouped by node."""
    lines = []
    for node in report["nodes"]:
        lines.append(f"node {node['node_id'][:12]} ({node['address']}): {node['cpus']:g} CPUs, "
                     f"{node['gpus_total']} GPUs, {len(node['gpus'])} reserved")
        for gpu in node["gpus"]:
            actors = ", ".join(f"{n} x{c}" for n, c in gpu["actors"].items())
            lines.append(f"  GPU {gpu['index']}: {actors}  (share {gpu['share']:g}, {gpu['cpus']:g} CPUs)")
    for name, cpu in report["cpu_stages"].items():
        low, high = cpu["actors"]
        lines.append(f"{name}: CPU pool of {low if low == high else f'{low}-{high}'} actors at {cpu['num_cpus']:g} "
                     "CPU each, placed by Ray")
    unplaced = {n: c for n, c in report["unplaced"].items() if c}
    if unplaced:
        lines.append("unplaced: " + ", ".join(f"{n} x{c}" for n, c in unplaced.items()))
    if report["gpus_needed"]:
        lines.append(f"{_gpus(report['gpus_needed'])} reserved for the stage actors" if not report["error"]
                     else f"error: {report['error']}")
    return "\n".join(lines)
