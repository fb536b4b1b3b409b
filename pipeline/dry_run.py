"""``karlo generate --dry-run``: everything a run would check and reserve, reported, and nothing written to OUTPUT.

The report has the placement ``karlo plan`` prints (pipeline.placement.layout: the reservation is made and
released), the input plan (files, rows, unreadable files), and what the run would do with OUTPUT: resume the rows
already committed, or refuse because OUTPUT holds a run with other settings.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .config import ConfigError, RunConfig
from .embedded import default_model
from .init_images import uses_init_images
from .manifest import check_adapters, differences, identity_of_run, model_identity
from .outputs import CommittedRun, output_filesystem, read_manifest
from .placement import PlacementError, format_layout, layout
from .reader import plan_inputs
from .redact import display_url
from .run import check_resources, init_ray
from .scope import take_rows
from .scoring import plan_scoring
from .shared_paths import check_run_paths
from .tasks import task_of
from .variations import check_model_kind, image_column_check


def placement_plan(cfg: RunConfig, *, echo: Callable[[str], None]) -> dict[str, Any]:
    """What ``karlo plan`` prints: the layout of ``cfg``'s stage actors on the cluster (reserved, then released),
    its ``error`` the refusal a run would meet, GPUs first, then the CPUs left for reading."""
    init_ray(echo)
    report = layout(cfg.stages, timeout=cfg.placement_timeout)
    if not report["error"]:
        try:
            check_resources(cfg)
        except ConfigError as e:
            report["error"] = str(e)
    return report


def dry_run(cfg: RunConfig, *, echo: Callable[[str], None]) -> dict[str, Any]:
    """The report of a dry run of ``cfg``; raises what ``run`` raises for unusable input, model or settings."""
    variations = cfg.task == "variations"
    whole = plan_inputs(cfg.input_url, cfg.storage_options, cfg.rows_per_read_task,
                        check_columns=image_column_check(cfg.image_column) if variations else None,
                        exclude=cfg.output_url)
    plan, scope = take_rows(cfg, whole)
    uses_init_images(cfg, whole.schema)  # refuses a strength without init images, as the run does
    model = cfg.model or default_model(variations)
    model_id = model_identity(model, cfg.storage_options)
    check_model_kind(cfg.task, model_id)
    if cfg.lora:
        check_adapters(model, cfg.lora, cfg.storage_options)
    # The curation models' weights are part of the identity; checking the CLIP tower comes with them.
    scorers = plan_scoring(cfg, model, task_of(cfg).clip_reference)[2]
    identity = identity_of_run(cfg.input_url, model_id, cfg.output_settings(), scorers)
    placement = placement_plan(cfg, echo=echo)
    if placement["error"]:
        raise PlacementError(placement["error"])
    check_run_paths(cfg, plan, probe_output=False)

    fs, root = output_filesystem(cfg.output_url, cfg.storage_options)
    previous = read_manifest(fs, root)
    conflict = differences(previous.get("identity", {}), identity) if previous else []
    # Rows OUTPUT holds that this scope leaves out (pipeline.scope): refused as other settings are.
    narrower = scope.narrowing(previous) if previous and not conflict else ""
    refused = bool(conflict or narrower)
    committed = 0
    if not refused and fs.exists(root):
        shards = CommittedRun(fs, root)
        committed = shards.written + shards.errors + shards.rejected
    remaining = scope.rows - committed
    return {
        "placement": placement,
        "input": {
            "url": plan.url,
            "files": [{"source": f.source, "rows": f.num_rows} for f in whole.files],
            "rows": scope.input_rows,
            "bad_files": [list(b) for b in plan.bad_files],
            "rows_taken": scope.taken,  # the first rows, with --limit
            "rows_left_out": scope.left_out,
            "images_per_prompt": scope.images_per_prompt,
        },
        "output": {
            "url": display_url(cfg.output_url),
            "rows": scope.rows,  # one per image of every input row taken
            "conflict": conflict,  # a non-empty list: the run would be refused without --overwrite
            "narrower": narrower,  # non-empty: so would it, for leaving out rows OUTPUT holds
            "rows_committed": committed,
            "rows_to_generate": remaining if not refused or cfg.overwrite else 0,
            # Shards are cut per write task, so a run writes at least this many (one more per task that ends with
            # part of a shard).
            "shards_to_write": math.ceil(remaining / cfg.rows_per_shard) if remaining > 0 else 0,
        },
    }


def format_dry_run(report: dict[str, Any]) -> str:
    inp, out = report["input"], report["output"]
    lines = [format_layout(report["placement"]),
             f"input {inp['url']}: {len(inp['files'])} file(s), {inp['rows']} rows"]
    if inp["rows_left_out"]:
        lines.append(f"  --limit: the first {inp['rows_taken']} rows, {inp['rows_left_out']} left out")
    if inp["images_per_prompt"] > 1:
        lines.append(f"  {inp['rows_taken']} rows x {inp['images_per_prompt']} images = {out['rows']} rows")
    lines += [f"  unreadable: {source}: {reason}" for source, reason in inp["bad_files"]]
    if out["conflict"]:
        lines.append(f"output {out['url']}: holds a run with different settings ({'; '.join(out['conflict'][:5])}); "
                     "the run would be refused without --overwrite")
    elif out["narrower"]:
        lines.append(f"output {out['url']}: holds {out['narrower']}; the run would be refused without --overwrite")
    else:
        lines.append(f"output {out['url']}: {out['rows_committed']} rows already committed, "
                     f"{out['rows_to_generate']} to generate in at least {out['shards_to_write']} shard(s)")
    lines.append("dry run: nothing was written")
    return "\n".join(lines)
