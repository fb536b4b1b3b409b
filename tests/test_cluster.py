"""Placement, `karlo plan`, `generate --dry-run` and runs on multi-node Ray clusters on one machine (127.0.0.1).

Nodes declare GPUs they do not have: Ray's GPU count is a logical resource, so placement is what is tested. Runs
on GPU-shaped configs use measurement mode (synthetic stage outputs, real encoding and writes), since a node
without a GPU cannot run the networks in CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline_utils import PROMPTS, read_output, write_table
from ray_cluster import local_cluster

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
        assert sorted(gpu["index"] for gpu in node["gpus"]) == list(range(node["gpus_total"]))
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
    actors = manifest["actors"]
    assert Counter(a["stage"] for a in actors) == {s: 4 for s in STAGES}
    per_gpu = Counter((a["node_id"], tuple(a["gpu_ids"])) for a in actors)
    assert len(per_gpu) == 4 and set(per_gpu.values()) == {3}
    for (node, gpus), _ in per_gpu.items():
        assert len(gpus) == 1
        assert sorted(a["stage"] for a in actors if (a["node_id"], tuple(a["gpu_ids"])) == (node, gpus)) == sorted(STAGES)
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
    """gpu-64.yaml on 8 x 8: every GPU of every node holds one actor of each stage. (Light nodes: 24 CPUs each
    for the 24 one-CPU stage actors.)"""
    with local_cluster(head_cpus=24, head_gpus=8) as cluster:
        for _ in range(6):
            cluster.add_node(cpus=24, gpus=8, wait=False)
        cluster.add_node(cpus=24, gpus=8)
        cluster.wait_for_nodes(8, cluster.nodes[-1])
        rc, report, err = plan_json(cluster.client_env(), "gpu-64.yaml")
    assert rc == 0, err
    assert_every_gpu_holds_one_of_each(report, {8: 8})
