"""Placement, `karlo plan`, `generate --dry-run` and runs on multi-node Ray clusters on one machine (127.0.0.1).

Nodes declare GPUs they do not have: Ray's GPU count is a logical resource, so placement is what is tested. Runs
on GPU-shaped configs use measurement mode (synthetic stage outputs, real encoding and writes), since a node
without a GPU cannot run the networks in CUDA.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pipeline_utils import PROMPTS, read_output, write_table
from ray_cluster import can_hide_folders, local_cluster

pytestmark = pytest.mark.slow

KARLO = str(Path(sys.executable).with_name("karlo"))
CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "stage-configs"
STAGES = ("prior", "decoder", "super_res")


def karlo(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([KARLO, *args], env=env, capture_output=True, text=True, timeout=timeout)


def plan_json(env: dict, config: str) -> tuple[int, dict, str]:
    result = karlo(env, "plan", "--stage-config", str(CONFIGS / config), "--device", "cuda", "--dtype", "bfloat16",
                   "--json")
    return result.returncode, json.loads(result.stdout), result.stderr


def assert_every_gpu_holds_one_of_each(report: dict, nodes: dict[int, int]) -> None:
    """``nodes``: GPUs per node that must be reserved -> how many such nodes."""
    assert report["error"] is None and report["unplaced"] == {s: 0 for s in STAGES}
    reserved = [node for node in report["nodes"] if node["gpus"]]
    assert Counter(len(node["gpus"]) for node in reserved) == nodes
    for node in reserved:
        indices = [gpu["index"] for gpu in node["gpus"]]
        assert len(set(indices)) == len(indices) and set(indices) <= set(range(node["gpus_total"]))
        for gpu in node["gpus"]:
            assert gpu["actors"] == {"super_res": 1, "decoder": 1, "prior": 1}
            assert gpu["share"] == pytest.approx(0.98)


@pytest.fixture(scope="module")
def two_nodes_of_four():
    """A CPU-only head (the driver's node) and two worker nodes of 4 logical GPUs each."""
    with local_cluster(head_cpus=2) as cluster:
        cluster.add_node(cpus=16, gpus=4)
        cluster.add_node(cpus=16, gpus=4)
        yield cluster


def test_plan_two_nodes_of_four_gpus(two_nodes_of_four):
    rc, report, err = plan_json(two_nodes_of_four.client_env(), "gpu-8.yaml")
    assert rc == 0, err
    assert_every_gpu_holds_one_of_each(report, {4: 2})
    assert "joined the Ray cluster at RAY_ADDRESS" in err and "3 nodes, 34 CPUs, 8 GPUs" in err


def test_plan_that_does_not_fit_names_what_is_missing(two_nodes_of_four):
    rc, report, err = plan_json(two_nodes_of_four.client_env(), "gpu-64.yaml")
    assert rc == 2
    assert report["unplaced"] == {"prior": 56, "decoder": 56, "super_res": 56}
    assert "the stage actors need 64 GPUs" in report["error"] and "the Ray cluster has 8" in report["error"]
    assert err.strip().splitlines()[-1] == f"error: {report['error']}"
    # Text output ends with the same refusal; the reservation was released (a fitting plan still places).
    text = karlo(two_nodes_of_four.client_env(), "plan", "--stage-config", str(CONFIGS / "gpu-64.yaml"),
                 "--device", "cuda")
    assert text.returncode == 2 and text.stdout.strip().splitlines()[-1].startswith("error: the stage actors need 64")
    assert plan_json(two_nodes_of_four.client_env(), "gpu-8.yaml")[0] == 0


def test_cluster_started_on_this_machine_is_joined_without_ray_address(two_nodes_of_four):
    """`ray start --head` running and RAY_ADDRESS unset: the command joins that cluster, as ray.init() does, and
    says so, instead of failing on the resource arguments of a local start."""
    result = karlo(two_nodes_of_four.client_env(by_address=False), "plan", "--stage-config",
                   str(CONFIGS / "gpu-8.yaml"), "--device", "cuda")
    assert result.returncode == 0, result.stderr
    assert "joined the Ray cluster started on this machine" in result.stderr and "8 GPUs" in result.stderr
    assert "ValueError" not in result.stderr


MEASURE = """
import json, sys
from pipeline.config import RunConfig, load_stage_config_file
from pipeline.run import run
stages = load_stage_config_file(open(sys.argv[3]).read(), "cuda", "bfloat16")
cfg = RunConfig(input_url=sys.argv[1], output_url=sys.argv[2], model=sys.argv[4], skip_networks=True,
                device="cuda", dtype="bfloat16", stages=stages, prior_steps=2, decoder_steps=2, super_res_steps=2,
                rows_per_shard=4)
summary = run(cfg, echo=print)
print(json.dumps({"written": summary.written, "errors": summary.errors, "rows_in": summary.rows_in}))
"""


def test_run_places_every_gpu_the_configured_mix_across_nodes(two_nodes_of_four, tmp_path, tiny_model):
    """A run of 2 + 2 GPUs' worth of pools (4 actors per stage) on nodes of 4 GPUs: the actors that ran are one
    of each stage per GPU, as the manifest records them, and every row is written."""
    config = tmp_path / "gpu-4.yaml"
    config.write_text("defaults: {device: cuda, dtype: bfloat16, num_cpus: 0.5}\n"
                      "prior: {batch_size: 4, actors: 4, num_gpus: 0.08}\n"
                      "decoder: {batch_size: 4, actors: 4, num_gpus: 0.3}\n"
                      "super_res: {batch_size: 4, actors: 4, num_gpus: 0.6}\n")
    table = write_table(tmp_path / "prompts.parquet", prompt=(PROMPTS * 4)[:32])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", MEASURE, str(table), str(out), str(config), tiny_model],
                            env=two_nodes_of_four.client_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    counts = [line for line in result.stdout.splitlines() if line.startswith('{"written"')]  # Ray logs around it
    assert json.loads(counts[-1]) == {"written": 32, "errors": 0, "rows_in": 32}
    manifest = read_output(out).manifest
    placement = manifest["placement"]
    assert placement["gpus"] == 4 and all(b["actors"] == {"super_res": 1, "decoder": 1, "prior": 1}
                                          for b in placement["bundles"])
    # Ray Data does not wait for a pool's last actors: one still loading when the rows run out never records
    # itself. Every actor that ran has a GPU of its own among its stage's, shared with at most one actor of each
    # other stage.
    actors = manifest["actors"]
    started = Counter(a["stage"] for a in actors)
    assert set(started) == set(STAGES) and max(started.values()) <= 4, started
    per_gpu: dict[tuple, list[str]] = {}
    for a in actors:
        assert len(a["gpu_ids"]) == 1, a
        per_gpu.setdefault((a["node_id"], a["gpu_ids"][0]), []).append(a["stage"])
    assert len(per_gpu) <= 4 and all(len(stages) == len(set(stages)) for stages in per_gpu.values()), per_gpu
    assert max(len(v) for v in per_gpu.values()) == 3  # some GPU ran one actor of each stage
    head = {a["node_id"] for a in actors} & {b["node_id"] for b in placement["bundles"]}
    assert head == {a["node_id"] for a in actors}  # every actor ran on a node the reservation named


def test_dry_run_reports_placement_and_input_and_writes_nothing(two_nodes_of_four, tmp_path, tiny_model):
    table = write_table(tmp_path / "in" / "prompts.parquet", prompt=PROMPTS[:5])
    out = tmp_path / "out"
    result = karlo(two_nodes_of_four.client_env(), "generate", str(tmp_path / "in"), str(out), "--model", tiny_model,
                   "--stage-config", str(CONFIGS / "gpu-8.yaml"), "--dry-run", "--rows-per-shard", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum("super_res x1, decoder x1, prior x1" in line for line in lines) == 8
    assert "input " in result.stdout and "1 file(s), 5 rows" in result.stdout
    assert "0 rows already committed, 5 to generate in at least 3 shard(s)" in result.stdout
    assert lines[-1] == "dry run: nothing was written"
    assert not out.exists()
    assert table.exists()


@pytest.mark.skipif(not can_hide_folders(), reason="needs a private mount namespace (unshare -m) to hide a folder")
def test_local_paths_a_node_cannot_see_are_refused_before_any_work(two_nodes_of_four, tmp_path, tiny_model):
    """A node whose disk lacks the folder of a local input, model and OUTPUT (as a second machine without a
    shared mount would): the run is refused with exit 2 and one line naming them, before any work, leaving no
    manifest; the dry run refuses the same. (Last user of the module's cluster: the node is killed at the end.)"""
    local = tmp_path / "local"
    table = write_table(local / "prompts.parquet", prompt=PROMPTS[:2])
    model = local / "model"
    shutil.copytree(tiny_model, model)
    out = local / "out"
    blind = two_nodes_of_four.add_node(cpus=1, hide=local)
    try:
        env = two_nodes_of_four.client_env()
        result = karlo(env, "generate", str(table), str(out), "--model", str(model), "--progress-interval", "0")
        assert result.returncode == 2, result.stderr[-5000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: input {table}, model {model}, OUTPUT {out}: local paths that 1 of the "
                               "cluster's 4 nodes cannot see"), last
        assert "object storage (s3://...) or a filesystem mounted at the same path on every node" in last
        assert "Traceback" not in result.stderr
        assert not out.exists()  # created for the probe, removed with it: no manifest to refuse the fixed rerun
        dry = karlo(env, "generate", str(table), str(out), "--model", str(model), "--dry-run")
        assert dry.returncode == 2, dry.stderr[-5000:]
        assert dry.stderr.strip().splitlines()[-1].startswith(f"error: input {table}, model {model}: local paths")
        assert sorted(p.name for p in local.iterdir()) == ["model", "prompts.parquet"]
    finally:
        blind.kill()


@pytest.fixture(scope="module")
def one_node_of_eight():
    with local_cluster(head_cpus=32, head_gpus=8) as cluster:
        yield cluster


def test_plan_one_node_of_eight_gpus(one_node_of_eight):
    rc, report, err = plan_json(one_node_of_eight.client_env(), "gpu-8.yaml")
    assert rc == 0, err
    assert_every_gpu_holds_one_of_each(report, {8: 1})
    rc, report, err = plan_json(one_node_of_eight.client_env(), "gpu-1.yaml")
    assert rc == 0, err
    assert_every_gpu_holds_one_of_each(report, {1: 1})


def test_plan_eight_nodes_of_eight_gpus(tmp_path):
    """gpu-64.yaml on 8 x 8: every GPU of every node holds one actor of each stage. (Light nodes: 26 CPUs each,
    for the 24 one-CPU stage actors and the read tasks.)"""
    with local_cluster(head_cpus=26, head_gpus=8) as cluster:
        for _ in range(6):
            cluster.add_node(cpus=26, gpus=8, wait=False)
        cluster.add_node(cpus=26, gpus=8)
        cluster.wait_for_nodes(8, cluster.nodes[-1])
        rc, report, err = plan_json(cluster.client_env(), "gpu-64.yaml")
    assert rc == 0, err
    assert_every_gpu_holds_one_of_each(report, {8: 8})


KILL_IDS = [f"row-{i:02d}" for i in range(12)]
KILL_SEEDS = [3000 + 11 * i for i in range(12)]
# Two actors per stage, one row per batch: actors on both nodes, and every image equals Karlo.generate of its row
# alone (bit for bit), whichever actor or attempt made it.
TWO_ACTOR_STAGES = "".join(f"{name}: {{batch_size: 1, actors: 2}}\n" for name in STAGES)


def test_worker_node_killed_mid_run_loses_and_duplicates_nothing(tmp_path, tiny_model):
    """kill -9 of every process of the second node once the first shard is committed: the run completes, or its
    rerun does, with every row exactly once and every image what an uninterrupted run makes."""
    from processes import FEW_STEPS, generate, run_generate, wait_until

    prompts = [PROMPTS[i % len(PROMPTS)] + f", view {i}" for i in range(len(KILL_IDS))]
    table = write_table(tmp_path / "prompts.parquet", id=KILL_IDS, prompt=prompts, seed=KILL_SEEDS)
    stages = tmp_path / "stages.yaml"
    stages.write_text(TWO_ACTOR_STAGES)
    out = tmp_path / "out"
    args = [str(table), str(out), "--model", tiny_model, *FEW_STEPS, "--rows-per-shard", "2", "--stage-config",
            str(stages), "--progress-interval", "0"]
    with local_cluster(head_cpus=2) as cluster:
        worker = cluster.add_node(cpus=2)
        env = cluster.client_env()
        with generate(args, tmp_path / "first.log", env) as g:
            wait_until(lambda: len(list((out / "_commits").glob("*.json"))) >= 1 if (out / "_commits").is_dir()
                       else False, g, timeout=400, what="first commit")
            assert any("ray::" in " ".join(p.cmdline()) for p in worker.processes()), "no worker ran on node 2"
            worker.kill()
            rc = g.wait(timeout=500)
        if rc != 0:  # the attempt may fail with the node; the rerun must finish
            rc, second = run_generate(args, tmp_path / "second.log", env, timeout=500)
            assert rc == 0, second[-5000:]
    result = read_output(out)
    assert sorted(result.keys) == KILL_IDS and result.errors.num_rows == 0
    assert sum(m["rows"] for m in result.markers) == len(KILL_IDS)
    from pipeline_utils import reference

    expected, _, _ = reference(tiny_model, prompts, KILL_SEEDS, threads=1)
    images = result.images()
    for key, image in zip(KILL_IDS, expected):
        np.testing.assert_array_equal(images[key], image, err_msg=key)


def test_remote_model_is_downloaded_once_per_node(tmp_path, tiny_model, s3_bucket):
    """A model on S3 and three nodes, each with its own cache (its own disk): every weight file is fetched once
    per node that runs a stage needing it, however many of that stage's actors start there together, and no
    actor loads a half-written copy (every load is strict: a partial file fails it)."""
    from s3_proxy import FaultyS3Proxy

    s3_bucket.fs.put(tiny_model, f"{s3_bucket.url}/models/tiny", recursive=True)
    table = write_table(tmp_path / "prompts.parquet", prompt=PROMPTS[:6])
    stages = tmp_path / "stages.yaml"
    # Four decoders on three nodes: some node runs two or more of them, starting at once.
    stages.write_text("prior: {batch_size: 2, actors: 1}\ndecoder: {batch_size: 2, actors: 4}\n"
                      "super_res: {batch_size: 2, actors: 1}\n")
    caches = [tmp_path / f"cache-{i}" for i in range(3)]
    with FaultyS3Proxy(s3_bucket.endpoint) as proxy, local_cluster(
            head_cpus=2, head_env={"KARLO_CACHE": str(caches[0]), "AWS_ENDPOINT_URL": proxy.url}) as cluster:
        for cache in caches[1:]:
            cluster.add_node(cpus=2, env={"KARLO_CACHE": str(cache), "AWS_ENDPOINT_URL": proxy.url})
        env = cluster.client_env(KARLO_CACHE=str(caches[0]), AWS_ENDPOINT_URL=proxy.url)
        result = karlo(env, "generate", str(table), str(tmp_path / "out"), "--model", f"{s3_bucket.url}/models/tiny",
                       "--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2", "--stage-config",
                       str(stages), "--progress-interval", "0")
        assert result.returncode == 0, result.stderr[-5000:]
        reads = Counter(proxy.object_reads)
    out = read_output(tmp_path / "out")
    assert len(out.keys) == 6
    nodes_per_stage = {s: {a["node_id"] for a in out.manifest["actors"] if a["stage"] == s} for s in STAGES}
    assert max(Counter((a["stage"], a["node_id"]) for a in out.manifest["actors"]).values()) >= 2
    weight_files = sorted(p.relative_to(tiny_model).as_posix() for p in Path(tiny_model).rglob("*.safetensors"))
    for rel in weight_files:
        copies = [c for c in caches if any(p.is_file() for p in c.glob(f"models/*/{rel}"))]
        fetched = reads[f"/{s3_bucket.url.removeprefix('s3://')}/models/tiny/{rel}"]
        assert fetched == len(copies), (rel, fetched, len(copies))
        assert fetched <= 3
    assert sum(reads[f"/{s3_bucket.url.removeprefix('s3://')}/models/tiny/{rel}"] for rel in weight_files) >= \
        len(weight_files)
    assert len(set().union(*nodes_per_stage.values())) >= 2  # the stages ran on more than one node
    assert not [p for c in caches for p in c.rglob(".tmp-*")]


def test_node_that_joins_mid_run_gets_actors_of_autoscaling_pools(tmp_path, tiny_model):
    """An autoscaling decoder pool that has outgrown the head's CPUs: a node that joins mid-run runs some of its
    actors (as the manifest records), and every row is still written once."""
    from processes import generate, wait_until

    # Ray Data grows an actor pool only while its actors have about two tasks each in flight (utilisation >= 1.75),
    # and a task is one input block. One row per file and per prior batch: 24 one-row blocks reach the decoder, so
    # its queue stays that deep until the last few rows, whenever the node joins. (Read as one table, the 24 rows
    # came as 4 blocks: 2 decoders seldom held all 4 at once, and the pool then never grew onto the new node.)
    table = tmp_path / "prompts"
    for i, prompt in enumerate((PROMPTS * 4)[:24]):
        write_table(table / f"part-{i:02d}.parquet", prompt=[prompt])
    stages = tmp_path / "stages.yaml"
    # The head (2 CPUs) holds the prior, super-res and encoder and one or two 0.5-CPU decoders; the pool may grow to 6.
    stages.write_text("prior: {batch_size: 1, actors: 1}\ndecoder: {batch_size: 1, actors: [1, 6], num_cpus: 0.5}\n"
                      "super_res: {batch_size: 4, actors: 1}\n")
    out = tmp_path / "out"
    # No --model: the embedded default, which the joining node (a disk of its own) builds in its own cache.
    node_cache = tmp_path / "node-cache"
    # Enough decoder work that the pool is still growing when the node has joined, however fast the start-up.
    args = [str(table), str(out), "--prior-steps", "2", "--decoder-steps", "100",
            "--super-res-steps", "2", "--stage-config", str(stages), "--progress-interval", "0"]
    with local_cluster(head_cpus=2) as cluster:
        with generate(args, tmp_path / "run.log", cluster.client_env()) as g:
            wait_until(lambda: "started" in g.output() or "MapBatches" in g.output(), g, timeout=300,
                       what="the pipeline's start")
            joined = cluster.add_node(cpus=2, wait=False, env={"KARLO_CACHE": str(node_cache)})
            rc = g.wait(timeout=600)
            assert rc == 0, g.output()[-5000:]
        assert joined.proc.poll() is None
        result = read_output(out)
    assert len(result.keys) == 24 and result.errors.num_rows == 0
    nodes = {a["node_id"] for a in result.manifest["actors"] if a["stage"] == "decoder"}
    assert len(nodes) == 2, result.manifest["actors"]
    built = sorted(p.relative_to(node_cache).as_posix() for p in node_cache.rglob("*.safetensors"))
    assert built == sorted(p.relative_to(Path(tiny_model).parent).as_posix()
                           for p in Path(tiny_model).rglob("*.safetensors"))
    for rel in built:  # the same bytes as the driver's copy, which the run's identity hashed
        assert (node_cache / rel).read_bytes() == (Path(tiny_model).parent / rel).read_bytes(), rel
