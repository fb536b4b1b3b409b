"""The synthetic world of the small model: scenes, captions, held-out combinations, the judge that reads images
back against the renderer's ground truth, and the training recipe at smoke scale."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from karlo_model import preset
from karlo_model.presets import SMALL_IMAGE_PROCESSOR, SMALL_VISION
from karlo_model.scheduler import UnCLIPSchedule
from karlo_model.small import judge, world
from karlo_model.small.diffusion import noised, variational_bound


def test_caption_grammar_names_what_is_kept():
    scene = world.Scene("yellow", "star", "dark blue", "small", 2, ((0.3, 0.3), (0.7, 0.7)), 0.1)
    assert scene.caption() == "two small yellow stars on a dark blue background"
    assert scene.caption(frozenset({"colour"})) == "yellow shapes"
    assert scene.caption(frozenset({"count", "shape"})) == "two stars"
    single = world.Scene("red", "circle", "white", "large", 1, ((0.5, 0.5),), 0.16)
    assert single.caption() == "a large red circle on a white background"


def test_held_out_triples_leave_every_pair_in_training():
    assert len(world.HELD_OUT) == 16
    training = {(c, s, b) for c in world.COLOUR_NAMES for s in world.SHAPES for b in world.BACKGROUND_NAMES
                } - world.HELD_OUT
    for held in world.HELD_OUT:
        for i, j in itertools.combinations(range(3), 2):
            assert any(t[i] == held[i] and t[j] == held[j] for t in training), (held, i, j)
    rng = np.random.default_rng(0)
    assert all(world.sample_scene(rng).triple not in world.HELD_OUT for _ in range(500))
    assert {s.triple for s in world.evaluation_scenes(100)} == world.HELD_OUT


def test_scenes_place_shapes_apart_and_inside():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = world.sample_scene(rng, size="large", count=3)
        r = scene.radius
        assert all(1.25 * r - 1e-9 <= v <= 1 - 1.25 * r + 1e-9 for c in scene.centres for v in c)
        assert all(math.dist(a, b) > 2.5 * r for a, b in itertools.combinations(scene.centres, 2))


def test_corpus_groups_shape_siblings_and_clip_batches_hold_them_whole():
    from karlo_model.small import train

    corpus = train.make_corpus(50, np.random.default_rng(0))
    assert len(corpus.scenes) == 50 and sorted(i for g in corpus.groups for i in g) == list(range(50))
    for group in corpus.groups[:-1]:
        members = [corpus.scenes[i] for i in group]
        assert len({s.shape for s in members}) == len(members) >= 3  # one held-out triple at most per group
        assert len({(s.colour, s.background, s.size, s.count, s.centres, s.radius) for s in members}) == 1
        assert all(s.triple not in world.HELD_OUT for s in members)
    batch = train.clip_batch(corpus, 16, 0.5, np.random.default_rng(1)).tolist()
    grouped = batch[:8]
    owner = {i: k for k, g in enumerate(corpus.groups) for i in g}
    runs = [list(g) for _, g in itertools.groupby(grouped, key=owner.get)]
    assert all(run == corpus.groups[owner[run[0]]] for run in runs[:-1])  # whole groups, then the cut-off one
    assert len(train.clip_batch(corpus, 16, 0.0, np.random.default_rng(1))) == 16


def test_judge_reads_the_renderer_ground_truth():
    rng = np.random.default_rng(2)
    scenes = [world.sample_scene(rng) for _ in range(60)] + world.evaluation_scenes(20)
    for scene in scenes:
        reading = judge.read(world.render(scene))
        assert (reading.colour, reading.shape, reading.background, reading.regions) == (
            scene.colour, scene.shape, scene.background, scene.count), scene
        assert reading.colour_fractions[scene.colour] == max(reading.colour_fractions.values())


def test_judge_finds_nothing_on_a_plain_background():
    image = np.full((256, 256, 3), world.BACKGROUNDS["gray"], dtype=np.uint8)
    reading = judge.read(image)
    assert (reading.background, reading.colour, reading.shape, reading.regions) == ("gray", None, None, 0)


def test_variational_bound_is_zero_only_at_the_true_posterior():
    schedule = UnCLIPSchedule(preset("small").decoder_scheduler)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    x_t = noised(schedule, x0, t, noise)
    # The true noise and v = -1 (the clipped posterior variance) is the posterior itself.
    exact = variational_bound(schedule, noise, -torch.ones_like(x0), x_t, x0, t)
    assert abs(float(exact)) < 1e-4
    assert float(variational_bound(schedule, noise, torch.ones_like(x0), x_t, x0, t)) > 1e-3
    assert float(variational_bound(schedule, noise + 0.5, -torch.ones_like(x0), x_t, x0, t)) > 1e-3


def test_every_component_trains_at_smoke_scale():
    from karlo_model.repo import clip_tokenizer
    from karlo_model.small import train

    torch.manual_seed(0)
    cfg, budget, logged = preset("small"), train.Budget.smoke(), []
    corpus = train.make_corpus(budget.scenes, np.random.default_rng(0))
    assert corpus.images.shape == (budget.scenes, 3, 64, 64) and corpus.images.dtype == torch.uint8
    captions = train.Captions(clip_tokenizer())
    text, vision, record = train.train_clip(cfg, SMALL_VISION, SMALL_IMAGE_PROCESSOR, corpus, captions, budget, 0,
                                            logged.append)
    embeds = train.image_embeddings(vision, SMALL_IMAGE_PROCESSOR, corpus.images)
    assert embeds.shape == (budget.scenes, 64) and math.isfinite(record["final_loss"])
    prior, record = train.train_prior(cfg, corpus, embeds, text, captions, budget, 0, logged.append)
    assert torch.allclose(prior.clip_mean, embeds.mean(0, keepdim=True)) and math.isfinite(record["final_loss"])
    text_proj, decoder, record = train.train_decoder(cfg, corpus, embeds, text, captions, budget, 0, logged.append)
    assert float(text_proj.learned_classifier_free_guidance_embeddings.abs().sum()) > 0  # trained from zeros
    first, last, record = train.train_super_res(cfg, budget, 0, logged.append)
    assert all(math.isfinite(r["final_loss"]) for r in record.values())
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), last.parameters()))
    assert any(line.startswith("super_res_last") for line in logged)


@pytest.mark.parametrize("flags, autocast", [({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
                                              ({"avx512_f": True, "avx512_bf16": False}, False)])
def test_unets_train_in_bfloat16_only_where_the_cpu_computes_it(monkeypatch, flags, autocast):
    """Emulated bfloat16 is 2.5 times slower than float32 (docs/benchmarks.md): such CPUs train in float32."""
    from karlo_model.small import train

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    with train.mixed_precision():
        y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)


@pytest.mark.parametrize("size", [64, 256])
def test_super_res_batch_pairs_crops_of_one_scene(size):
    from karlo_model.small import train

    target, low = train.super_res_batch(np.random.default_rng(0), torch.Generator().manual_seed(0), 3, 32, size)
    assert target.shape == low.shape == (3, 3, 32, 32)
    assert float((target - low).abs().mean()) < 0.25  # the low-resolution crop is the same place, blurred


def test_train_small_command_writes_a_loadable_repo_and_its_record(tmp_path):
    import json

    from click.testing import CliRunner

    from jobs.cli import main
    from karlo_model import Karlo
    from karlo_model.small.recipe import variations_layout
    from karlo_model.weights import file_digest

    out = tmp_path / "small"
    result = CliRunner().invoke(main, ["train-small", str(out), "--seed", "3", "--smoke"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "training.json").read_text())
    assert record["seed"] == 3 and set(record["stages"]) == {"clip", "prior", "decoder", "super_res"}
    measures = record["evaluation"]
    assert measures["scenes"] == 4 and all(0 <= measures[k] <= 1 for k in (
        "colour_right", "shape_right", "background_right", "clip_top1_of_10"))
    assert record["sha256"] == {p: file_digest(out / p) for p in record["sha256"]} and len(record["sha256"]) == 7
    model = Karlo.from_pretrained(out)
    assert model.config.decoder == preset("small").decoder and model.decoder.conv_in.weight.dtype == torch.float32
    images = model.generate(["a red circle"], [0], prior_steps=2, decoder_steps=2, super_res_steps=2).images
    assert images.shape == (1, 256, 256, 3)
    siblings = Karlo.from_pretrained(variations_layout(out, tmp_path / "variations"))
    assert siblings.prior is None
    assert siblings.variations([images[0]], [0], decoder_steps=2, super_res_steps=2).images.shape == (1, 256, 256, 3)


def test_judge_reads_renders_at_the_decoders_resolution():
    """A 64 px render upsampled as the sampler upsamples it (the sharpness a good decoder with a weak upsampler
    gives) still reads right: the judge measures the scene, not the sharpness."""
    from karlo_model.sampling import to_uint8, upsample
    from karlo_model.small import train

    scenes = world.evaluation_scenes(20, seed=9)
    low = torch.from_numpy(np.stack([train.downscaled(world.render(s)) for s in scenes])).permute(0, 3, 1, 2)
    for scene, image in zip(scenes, to_uint8(upsample(train.to_signed(low), 256)).numpy()):
        reading = judge.read(image)
        assert (reading.colour, reading.shape, reading.background) == scene.triple, scene
