"""Local paths on a multi-node cluster: every node that may run a read, stage or write task must see them.

A local INPUT, model or OUTPUT is fine on one machine, and on a cluster whose nodes mount the same shared
filesystem at the same path. Anywhere else the run would fail late and confusingly: read tasks on another node
find no file, actors there find no model, and write tasks write into that node's own disk, where the driver never
looks. So before any work the driver asks one task on every other node what it sees: the input's first file, the
model folder, and a probe file the driver has just written into OUTPUT (the same path on another disk is not
enough for OUTPUT: it must be the same filesystem).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig
    from .reader import InputPlan

logger = logging.getLogger(__name__)

# How long a node's answer is awaited. A node that does not answer (busy, or leaving) is not a reason to refuse.
PROBE_TIMEOUT_S = 60.0
PROBE_PREFIX = ".karlo-node-check-"


class SharedPathError(ConfigError):
    """A local path that some node of the cluster cannot see."""


@dataclass(frozen=True)
class LocalPath:
    role: str  # "input", "model", "CLIP model", "OUTPUT": how the message names it
    path: str  # absolute, on the driver


def local_path(url: str | None) -> str | None:
    """The local path of ``url``, None for object storage and other remote URLs."""
    if url is None:
        return None
    if url.startswith("file://"):
        return url.removeprefix("file://")
    return None if "://" in url else url


@ray.remote(num_cpus=0)
def _missing(paths: list[str]) -> tuple[str, list[str]]:
    """On one node: its address and which of ``paths`` it cannot see."""
    return ray.util.get_node_ip_address(), [p for p in paths if not os.path.exists(p)]


def other_nodes() -> list[str]:
    """Node ids of the alive nodes other than the driver's that can run tasks (a node of no CPUs and no GPUs,
    such as a head kept free of work, runs none)."""
    here = ray.get_runtime_context().get_node_id()
    return [n["NodeID"] for n in ray.nodes()
            if n.get("Alive") and n["NodeID"] != here
            and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]


def check_shared(paths: list[LocalPath], output_root: str | None = None) -> None:
    """Refuse (SharedPathError, one line) if a node other than the driver's cannot see one of ``paths``; with
    ``output_root`` (a local OUTPUT folder that exists), also check that every node sees the same folder."""
    nodes = other_nodes()
    if not nodes or not (paths or output_root):
        return
    probe = None
    checks = {p.path: p for p in paths}
    if output_root is not None:
        probe = os.path.join(output_root, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        with open(probe, "w"):
            pass
        checks[probe] = LocalPath("OUTPUT", output_root)
    try:
        refs = [_missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(list(checks)) for node in nodes]
        answers = []
        for ref in refs:
            try:
                answers.append(ray.get(ref, timeout=PROBE_TIMEOUT_S))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
                logger.warning("a node did not say which local paths it sees (%s); not checked there",
                               type(e).__name__)
    finally:
        if probe is not None:
            os.remove(probe)
    blind = [(ip, [checks[p] for p in missing]) for ip, missing in answers if missing]
    if not blind:
        return
    ip, unseen = blind[0]
    named = ", ".join(f"{p.role} {p.path}" for p in unseen)
    raise SharedPathError(
        f"{named}: local path{'s' * (len(unseen) > 1)} that {len(blind)} of the cluster's {len(nodes) + 1} nodes "
        f"cannot see (node {ip} among them); on a multi-node cluster use object storage (s3://...) or a "
        "filesystem mounted at the same path on every node"
    )


def check_run_paths(cfg: RunConfig, plan: InputPlan, *, probe_output: bool = True) -> None:
    """:func:`check_shared` for a run's local input, model, CLIP and curation models and OUTPUT. With
    ``probe_output`` a local OUTPUT folder is created if need be (and removed again if the run is refused); without
    (a dry run, which writes nothing), an OUTPUT that does not exist yet is not checked."""
    named = (("input", local_path(plan.files[0].url) if plan.files else None), ("model", local_path(cfg.model)),
             ("CLIP model", local_path(cfg.clip_model)), ("aesthetic model", local_path(cfg.aesthetic_model)),
             ("safety checker", local_path(cfg.safety_checker)))
    paths = [LocalPath(role, path) for role, path in named if path is not None]
    output = local_path(cfg.output_url)
    if output is None or not probe_output:
        if output is not None and os.path.isdir(output):
            paths.append(LocalPath("OUTPUT", output))
        check_shared(paths)
        return
    created = not os.path.exists(output)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError:  # opening OUTPUT reports it, with the run's usual message
        check_shared(paths)
        return
    try:
        check_shared(paths, output_root=output)
    except SharedPathError:
        if created:
            os.rmdir(output)
        raise
