"""The packing of GPU stage actors into whole GPUs (pipeline.placement.pack): no Ray needed."""

from pathlib import Path

import pytest

from pipeline.config import StageConfig, load_stage_config_file
from pipeline.placement import PlacementError, pack

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "stage-configs"


def gpu_stage(share: float, actors: int | tuple[int, int], cpus: float = 1) -> StageConfig:
    low, high = (actors, actors) if isinstance(actors, int) else actors
    return StageConfig(batch_size=8, min_actors=low, max_actors=high, num_cpus=cpus, num_gpus=share, device="cuda",
                       dtype="bfloat16")


@pytest.mark.parametrize("name, gpus", [("gpu-1", 1), ("gpu-8", 8), ("gpu-64", 64)])
def test_shipped_configs_give_every_gpu_one_actor_of_each_stage(name, gpus):
    stages = load_stage_config_file((CONFIGS / f"{name}.yaml").read_text(), "cuda", "bfloat16")
    packing = pack(stages)
    assert packing.gpus == gpus
    assert all(sorted(b) == ["decoder", "prior", "super_res"] for b in packing.bins)
    assert all(share == pytest.approx(0.98) for share in packing.shares)
    assert all(cpus == 3 for cpus in packing.cpus)
    # The n-th actor of every stage shares the n-th GPU.
    assert packing.slots == {stage: tuple(range(gpus)) for stage in ("prior", "decoder", "super_res")}
    assert packing.bundles()[0] == {"GPU": 1, "CPU": 3}


def test_largest_share_first_whatever_the_pipeline_order():
    """The pools in pipeline order (small shares first) are what Ray's first fit packs badly; the packing starts
    from the largest share."""
    stages = {"prior": gpu_stage(0.08, 4), "decoder": gpu_stage(0.3, 4), "super_res": gpu_stage(0.6, 4)}
    packing = pack(stages)
    assert packing.gpus == 4
    assert [sorted(b) for b in packing.bins] == [["decoder", "prior", "super_res"]] * 4


def test_autoscaling_pools_reserve_their_maximum():
    """README's example: decoder [1, 4] at 0.3, super-res [2, 8] at 0.6, one prior at 0.1."""
    stages = {"prior": gpu_stage(0.1, 1), "decoder": gpu_stage(0.3, (1, 4)), "super_res": gpu_stage(0.6, (2, 8))}
    packing = pack(stages)
    assert packing.gpus == 8
    assert packing.bins[0] == ("super_res", "decoder", "prior")
    assert packing.bins[3] == ("super_res", "decoder")
    assert packing.bins[7] == ("super_res",)
    assert packing.shares[0] == pytest.approx(1.0)  # 0.6 + 0.3 + 0.1 fills a GPU exactly


def test_shares_that_do_not_pair_take_their_own_gpus():
    stages = {"decoder": gpu_stage(0.5, 3), "super_res": gpu_stage(0.7, 2)}
    packing = pack(stages)
    # 0.7 + 0.5 > 1: the super-res GPUs take no decoder; the decoders pair up on the GPUs after them.
    assert [sorted(b) for b in packing.bins] == [["super_res"], ["super_res"], ["decoder", "decoder"], ["decoder"]]
    assert packing.slots["decoder"] == (2, 2, 3)
    assert packing.cpus == (1, 1, 2, 1)


def test_cpu_stages_are_not_packed():
    cpu = StageConfig(batch_size=4)
    packing = pack({"prior": cpu, "decoder": cpu, "super_res": gpu_stage(0.6, 2), "clip_score": cpu})
    assert packing.gpus == 2 and set(packing.slots) == {"super_res"}
    assert pack({"prior": cpu, "decoder": cpu}).gpus == 0


def test_an_actor_larger_than_one_gpu_is_refused():
    with pytest.raises(PlacementError, match=r"stage super_res asks for 2 GPUs per actor; an actor holds at most one"):
        pack({"super_res": gpu_stage(2, 1)})
