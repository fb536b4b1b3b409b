"""The benchmark suite (jobs/bench.py) on tiny settings: the structure and sanity of its results, not timings.

* the FLOP counter gives the reference's per-forward counts for the full-size networks (meta device, no weights);
* the diffusers reference built from an in-memory model holds the same weights: it makes the same images;
* model, stage, pipeline and driver-memory sections return consistent figures; the device peak comes from the GPU
  table or a measured CPU matmul; the CLI refuses unusable combinations with a clear message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from parity_utils import single_thread  # noqa: F401 (fixture)
from torch.utils.flop_counter import FlopCounterMode

from jobs import bench
from jobs.cli import main
from karlo_model import Karlo, preset
from karlo_model.repo import build_module

STEPS = (2, 2, 2)


@pytest.fixture(scope="module")
def model(tiny_model) -> Karlo:
    return Karlo.from_pretrained(tiny_model)


def test_flop_counts_of_the_full_size_networks_match_the_reference():
    """The published full-size architecture counts (docs/gpu.md): prior and decoder forward on the guidance pair, SR forward on one image, in GFLOP."""
    bench._count_cpu_attention()
    cfg = preset("karlo-v1-alpha")
    with torch.device("meta"):
        t = torch.tensor(5)
        nets = {name: build_module(cfg, name) for name in ("prior", "decoder", "super_res_first")}
        calls = {
            "prior": lambda: nets["prior"](torch.randn(2, 768), t, torch.randn(2, 768), torch.randn(2, 77, 768),
                                           torch.ones(2, 77, dtype=torch.bool)),
            "decoder": lambda: nets["decoder"](torch.randn(2, 3, 64, 64), t, torch.randn(2, 81, 1536),
                                               torch.ones(2, 81, dtype=torch.bool), torch.randn(2, 1280)),
            "super_res_first": lambda: nets["super_res_first"](torch.randn(1, 6, 256, 256), t),
        }
        for name, expected in {"prior": 328.8, "decoder": 1216.6, "super_res_first": 8497.4}.items():
            with FlopCounterMode(display=False) as counter:
                calls[name]()
            assert counter.get_total_flops() / 1e9 == pytest.approx(expected, abs=0.05), name


def test_diffusers_reference_holds_the_same_weights(model):
    pipe = bench.diffusers_pipeline(model, torch.float32)
    prompts, seeds = ["a red cube"], [3]
    ours = model.generate(prompts, seeds, prior_steps=2, decoder_steps=2, super_res_steps=2)
    with torch.no_grad():
        theirs = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], prior_num_inference_steps=2,
                      decoder_num_inference_steps=2, super_res_num_inference_steps=2, output_type="np").images
    theirs = (np.clip(theirs, 0, 1) * 255).round().astype(np.uint8)
    # Weights that differed anywhere would change every pixel; float rounding moves a few (test_parity.py bounds).
    assert (ours.images == theirs).mean() >= 0.999


def test_model_section(tiny_model):
    result = bench.bench_model(bench.ModelSource(model_dir=tiny_model), batch_sizes=(1, 2), steps=STEPS, repeats=1)
    assert [row["batch"] for row in result["batches"]] == [1, 2]
    for row in result["batches"]:
        assert row["karlo_images_per_s"] > 0 and row["diffusers_images_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["karlo_images_per_s"] / row["diffusers_images_per_s"])
    assert result["batch_1_ratio"] == result["batches"][0]["ratio"]
    best_ours = max(result["batches"], key=lambda r: r["karlo_images_per_s"])
    best_theirs = max(result["batches"], key=lambda r: r["diffusers_images_per_s"])
    expected = best_ours["karlo_images_per_s"] / best_theirs["diffusers_images_per_s"]
    assert result["best_ratio"] == pytest.approx(expected)
    assert result["karlo"] == {"dtype": "float32", "fast": False, "compile": False}
    assert "model" in bench.format_report({"model": result})


def test_stages_section_counts_flops_per_image(model):
    two = bench.bench_stages(model, batch_size=2, steps=STEPS, repeats=1)
    three = bench.bench_stages(model, batch_size=2, steps=(3, 3, 3), repeats=1)
    assert [row["stage"] for row in two["stages"]] == list(bench.STAGES)
    assert sum(row["flop_share"] for row in two["stages"]) == pytest.approx(1.0)
    assert "measured" in two["peak_source"] and two["peak_tflops"] > 0
    for a, b in zip(two["stages"], three["stages"]):
        assert a["images_per_s"] > 0 and 0 < a["flop_utilisation"] < 1
        assert a["flop_utilisation"] == pytest.approx(a["gflop_per_image"] * 1e9 * a["images_per_s"]
                                                      / (two["peak_tflops"] * 1e12))
        if a["stage"] == "super_res":  # only UNet forwards count: FLOPs grow exactly with the steps
            assert b["gflop_per_image"] == pytest.approx(a["gflop_per_image"] * 1.5)
        else:  # plus one text encoding (prior) or text projection (decoder) per image
            assert a["gflop_per_image"] < b["gflop_per_image"] < a["gflop_per_image"] * 1.5
    assert "FLOP utilisation" in bench.format_report({"stages": two})


@pytest.mark.parametrize("name, dtype, tflops", [("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
                                                 ("NVIDIA H100 PCIe", torch.float16, 756.0),
                                                 ("NVIDIA H200", torch.bfloat16, 989.4),
                                                 ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0)])
def test_gpu_peak_from_the_table(monkeypatch, name, dtype, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = bench.device_peak(torch.device("cuda"), dtype)
    assert peak == tflops * 1e12 and name in source


def test_unknown_gpu_peak_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    with pytest.raises(ValueError, match="no peak FLOP/s known for Some GPU"):
        bench.device_peak(torch.device("cuda"), torch.bfloat16)


def test_model_source_needs_exactly_one_origin():
    with pytest.raises(ValueError, match="either a model folder or a preset"):
        bench.ModelSource()
    with pytest.raises(ValueError, match="either a model folder or a preset"):
        bench.ModelSource(model_dir="x", preset="tiny")
    assert bench.ModelSource(preset="tiny").describe() == "tiny (random weights)"


def test_rss_sampler_sees_a_peak():
    with bench.RssSampler(interval=0.01) as sampler:
        before = bench._rss_bytes()
        block = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched
        block[::4096] = 2
        del block
    assert sampler.peak >= before + 48 * 2**20


@pytest.mark.parametrize(
    "args, message",
    [(["model", "--random-weights"], "give --preset NAME together with --random-weights"),
     (["model", "--preset", "tiny"], "give --preset NAME together with --random-weights"),
     (["all", "--preset", "tiny", "--random-weights", "--only", "pipeline"], "needs a model folder"),
     (["stages", "--model", "x", "--preset", "tiny", "--random-weights"], "not both")],
)
def test_bench_cli_usage_errors(args, message):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_bench_cli_refuses_cuda_without_a_gpu():
    result = CliRunner().invoke(main, ["bench", "stages", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_bench_cli_stages_json_with_random_weights():
    result = CliRunner().invoke(main, ["bench", "stages", "--preset", "tiny", "--random-weights", "--steps", "2", "2",
                                       "2", "--repeats", "1", "--batch-size", "1", "--json"])
    assert result.exit_code == 0, result.output
    stages = json.loads(result.output)["stages"]
    assert [row["stage"] for row in stages["stages"]] == list(bench.STAGES)


@pytest.mark.slow
def test_pipeline_and_driver_memory_sections(ray_local, tiny_model):
    result = bench.bench_pipeline(tiny_model, rows=8, steps=STEPS, data_plane_rows=300, repeats=1)
    assert set(result["stage_images_per_s"]) == set(result["stage_images_per_s_one_actor"]) == set(bench.STAGES)
    slots = os.cpu_count()
    assert result["actors_per_stage_pool"] == slots
    pool, one = result["stage_images_per_s"], result["stage_images_per_s_one_actor"]
    assert result["compute_bound_images_per_s"] == pytest.approx(1 / sum(1 / r for r in pool.values()))
    assert result["ideal_bound_images_per_s"] == pytest.approx(slots / sum(1 / r for r in one.values()))
    assert result["compute_bound_images_per_s"] <= result["slowest_stage_images_per_s"] == min(pool.values())
    for key in ("pipeline_efficiency", "pipeline_over_generate", "data_plane_efficiency",
                "pipeline_efficiency_after_start_up", "pipeline_over_generate_after_start_up",
                "data_plane_efficiency_after_start_up"):
        assert 0 < result[key] < 5
    # Leaving the start-up out can only raise a run's rate.
    assert result["pipeline_images_per_s_after_start_up"] > result["pipeline_images_per_s"]
    assert result["data_plane_rows_per_s_after_start_up"] > result["data_plane_rows_per_s"]
    mem = bench.bench_driver_memory(rows=2000, rows_per_shard=500)
    assert mem["rows"] == 2000 and mem["driver_rss_peak_mb"] >= mem["driver_rss_before_mb"]
    report = bench.format_report({"pipeline": result, "driver_memory": mem})
    assert "pipeline efficiency" in report and "peak RSS growth MB" in report


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_example_gpu_stage_configs_parse(gpus):
    """examples/stage-configs: one actor of each stage per GPU, the shares of one GPU adding up to at most 1."""
    from pipeline.config import load_stage_config_file

    text = (Path(__file__).parent.parent / "examples" / "stage-configs" / f"gpu-{gpus}.yaml").read_text()
    stages = load_stage_config_file(text, "cpu", "float32")
    assert {s.device for s in stages.values()} == {"cuda"} and {s.dtype for s in stages.values()} == {"bfloat16"}
    assert {(s.min_actors, s.max_actors) for s in stages.values()} == {(gpus, gpus)}
    assert sum(s.num_gpus for s in stages.values()) <= 1.0
    assert stages["super_res"].num_gpus > stages["decoder"].num_gpus > stages["prior"].num_gpus


def test_commit_timeline_separates_start_up_from_the_sustained_rate(tmp_path):
    commits = tmp_path / "_commits"
    commits.mkdir()
    # Shards committed at t = 100 + 30 s (start-up), then at 40 s and 50 s: 500 rows each.
    for name, at in (("a", 130.0), ("b", 140.0), ("c", 150.0)):
        marker = commits / f"{name}.json"
        marker.write_text('{"rows": 500, "errors": 0}')
        os.utime(marker, (at, at))
    first, sustained = bench.commit_timeline(tmp_path, started=100.0)
    assert first == pytest.approx(30.0)
    assert sustained == pytest.approx(1000 / 20)  # from the quarter (a) to three quarters (c) of the rows
    # A slow start and a slow drain around a steady middle: only the middle half of the rows counts.
    for name, at in (("d", 200.0), ("e", 300.0)):
        marker = commits / f"{name}.json"
        marker.write_text('{"rows": 500, "errors": 0}')
        os.utime(marker, (at, at))
    for name in ("a", "b", "c"):
        os.utime(commits / f"{name}.json", (dict(a=110.0, b=190.0, c=195.0)[name],) * 2)
    first, sustained = bench.commit_timeline(tmp_path, started=100.0)  # quarter at b (1000), 3/4 at d (2000)
    assert first == pytest.approx(10.0) and sustained == pytest.approx(1000 / 10)
    for name in ("b", "c", "d", "e"):
        (commits / f"{name}.json").unlink()
    first, sustained = bench.commit_timeline(tmp_path, started=100.0)
    assert first == pytest.approx(10.0) and sustained != sustained  # one shard: no sustained rate (nan)


def test_scale_bench_resumes_past_the_committed_rows_and_counts_every_repeat(tmp_path, monkeypatch):
    """The bench at a small size: the built OUTPUT is half committed (less the shards in flight), the resumed run
    finds exactly the input's repeated ids, and its first batch holds rows still to make."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.bench import scale

    monkeypatch.setattr(scale, "FILE_ROWS", 4000)  # several input files
    result = scale.bench_scale(tmp_path, sizes=(20_000,), rows_per_shard=100)
    (size,) = result["sizes"]
    ids = pq.read_table(tmp_path / "rows-20000" / "input", columns=["id"]).column("id")
    assert len(list((tmp_path / "rows-20000" / "input").iterdir())) == 5
    assert size["repeats"] == len(ids) - len(pc.unique(ids)) > 0
    assert size["committed"] == 99 * 100  # 100 shards of 100 rows, every hundredth in flight
    assert size["first_batch_rows"] > 0 and set(size["seconds"]) == {"ray", "plan", "resume", "duplicates",
                                                                     "first_batch"}
    assert size["workers_mb"] and all(rss >= private > 0 for rss, private in size["workers_mb"].values())
    figures = {figure for _, figure, _ in result.report_rows()}
    assert {"0.02M rows: resume s (per 1M rows)", "0.02M rows: driver peak RSS growth MB"} <= figures
