"""Image-to-image on the model (karlo_model.img2img, Karlo.generate / run_decoder with init images):

* strength 1 is text-to-image bit for bit;
* the decoder's first input is sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps the row's own draw, at the timestep
  the strength selects, and the decoder network runs exactly the steps it selects;
* a batch mixing strengths and rows without an init image equals each row alone (float64);
* the init image moves the output towards itself as the strength falls;
* through the pipeline: a table mixing image-to-image and text-to-image rows, bad cells as error rows, the
  metadata and the manifest's settings.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_utils import STEPS as STEPS_PIPELINE
from pipeline_utils import assert_batch_independent, read_output, reference, write_table

from karlo_model import Karlo, make_tiny_model
from karlo_model.img2img import init_image_tensor, start_steps, steps_run
from karlo_model.noise import draw_noise, generators_from_seeds
from karlo_model.sampling import Guidance
from pipeline import columns as C
from pipeline.config import ConfigError, RunConfig, StageConfig
from pipeline.dry_run import dry_run
from pipeline.run import OutputConflict, plan_run, run

STEPS = dict(prior_steps=3, decoder_steps=6, super_res_steps=3)
PROMPTS = ["a horse in a field", "a red cube on a wooden table", "a bowl of soup"]
SEEDS = [101, 7, 4242]


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


INIT = [_image(1, 80, 120), _image(2, 64, 64), _image(3, 300, 200)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Karlo:
    return Karlo.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def model64(tmp_path_factory) -> Karlo:
    repo = make_tiny_model(tmp_path_factory.mktemp("tiny-alt") / "model", seed=3, preset_name="tiny-alt")
    return Karlo.from_pretrained(repo, dtype=torch.float64)


def test_steps_run_follow_diffusers_rounding_with_at_least_one_step():
    assert [steps_run(s, 25) for s in (1.0, 0.8, 0.5, 0.01)] == [25, 20, 12, 1]
    assert steps_run(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert start_steps([1.0, 0.5], 6) == [0, 3]
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength must be in"):
            steps_run(bad, 10)


def test_init_image_is_resized_on_its_shorter_side_and_centre_cropped():
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, 32:96] = 255  # the centre half white: after the crop, all of the image
    x = init_image_tensor([wide, None], 64)
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x[0], torch.ones(3, 64, 64)) and torch.equal(x[1], torch.zeros(3, 64, 64))


def test_strength_one_is_text_to_image_bit_for_bit(model):
    plain = model.generate(PROMPTS, SEEDS, **STEPS)
    full = model.generate(PROMPTS, SEEDS, **STEPS, init_images=INIT, strength=1.0)
    assert np.array_equal(plain.images, full.images)


class _Calls:
    """Records the decoder network's sample input at each call (the conditional half with guidance)."""

    def __init__(self, net: torch.nn.Module):
        self.inputs: list[torch.Tensor] = []
        self.handle = net.register_forward_pre_hook(lambda _, args: self.inputs.append(args[0].detach().clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("strength", [0.5, 0.2])
def test_the_chain_starts_from_the_noised_init_image_and_runs_the_selected_steps(model, strength):
    n, steps = len(PROMPTS), STEPS["decoder_steps"]
    text = model.encode_text(PROMPTS)
    negative = model.encode_text([""] * n)
    embeds = torch.randn(n, text.embeds.shape[1], generator=torch.Generator().manual_seed(0))
    guidance = Guidance.of(4.0, 8.0, n)
    size = model.decoder.cfg.sample_size
    x0 = init_image_tensor(INIT, size)
    eps = draw_noise(generators_from_seeds(SEEDS), (3, size, size), torch.float32, model.device)
    with _Calls(model.decoder) as calls:
        model.run_decoder(embeds, text, negative, generators_from_seeds(SEEDS), guidance, steps=steps,
                          init_images=x0, strength=[strength] * n)
    assert len(calls.inputs) == steps_run(strength, steps)
    t = model.decoder_schedule.timesteps(steps)[start_steps([strength], steps)[0]]
    abar = model.decoder_schedule.alphas_cumprod[t]
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    first = calls.inputs[0][n:]  # guidance runs [uncond; cond] on the same x
    assert torch.allclose(first, expected, atol=1e-6)


def test_a_mixed_batch_equals_each_row_alone(model64):
    init = [INIT[0], None, INIT[2]]
    strength = [0.5, 0.7, 0.9]
    batch = model64.generate(PROMPTS, SEEDS, **STEPS, init_images=init, strength=strength)
    for i in range(len(PROMPTS)):
        alone = model64.generate([PROMPTS[i]], [SEEDS[i]], **STEPS, init_images=[init[i]], strength=strength[i])
        assert np.abs(batch.images[i].astype(int) - alone.images[0].astype(int)).max() <= 1
    plain = model64.generate(PROMPTS[1:2], SEEDS[1:2], **STEPS)  # no init image: text-to-image
    assert np.abs(batch.images[1].astype(int) - plain.images[0].astype(int)).max() <= 1


def test_lower_strength_keeps_more_of_the_init_image(model):
    """The 64 px decoder output moves towards the init image as the strength falls (on random weights too: the
    fewer steps run, the less of x_t the network replaces)."""
    n, steps = len(PROMPTS), STEPS["decoder_steps"]
    text = model.encode_text(PROMPTS)
    negative = model.encode_text([""] * n)
    embeds = torch.randn(n, text.embeds.shape[1], generator=torch.Generator().manual_seed(0))
    x0 = init_image_tensor(INIT, model.decoder.cfg.sample_size)

    def distance(strength: float) -> float:
        out = model.run_decoder(embeds, text, negative, generators_from_seeds(SEEDS), Guidance.of(4.0, 8.0, n),
                                steps=steps, init_images=x0, strength=[strength] * n)
        return (out - x0).abs().mean().item()

    assert distance(0.2) < distance(0.6) < distance(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Through the pipeline


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_generate_with_init_images(tmp_path, ray_local, tiny_model):
    """One table mixing image-to-image rows (bytes, a path, own and run strength) with text-to-image rows and
    bad cells: each image equals Karlo.generate of its row alone; bad cells are error rows; the metadata records
    strength, steps run and the image's path; a rerun with another --strength is refused."""
    (tmp_path / "img.png").write_bytes(_png(INIT[2]))
    ids = ["bytes", "path", "text", "bad-image", "bad-strength"]
    table = write_table(
        tmp_path / "in" / "prompts.parquet",
        id=ids,
        prompt=PROMPTS[:3] + ["x", "y"],
        seed=[1, 2, 3, 4, 5],
        init_image=[{"bytes": _png(INIT[0]), "path": None}, {"bytes": None, "path": str(tmp_path / "img.png")},
                    None, {"bytes": b"\x89PNG truncated", "path": None}, {"bytes": _png(INIT[1]), "path": None}],
        strength=[0.5, None, 0.3, None, 1.5],
    )
    steps = dict(STEPS_PIPELINE)
    stages = {n: StageConfig(batch_size=2) for n in ("prior", "decoder", "super_res")}
    out = tmp_path / "out"
    summary = run(RunConfig(str(table), str(out), model=tiny_model, strength=0.7, stages=stages, **steps))
    assert (summary.rows_in, summary.written, summary.errors) == (5, 3, 2)

    o = read_output(out)
    assert sorted(o.error_keys) == ["bad-image", "bad-strength"]
    errors = dict(zip(o.errors.column("key").to_pylist(), o.errors.column(C.ERROR).to_pylist()))
    assert "cannot be decoded" in errors["bad-image"] and "strength must be a number in (0, 1]" in errors["bad-strength"]
    meta = {r["key"]: r for r in o.metadata.to_pylist()}
    assert [meta[k][C.STRENGTH] for k in ids[:3]] == [0.5, 0.7, None]
    d = steps["decoder_steps"]
    assert [meta[k][C.DECODER_STEPS_RUN] for k in ids[:3]] == [steps_run(0.5, d), steps_run(0.7, d), d]
    assert [meta[k][C.INIT_IMAGE_PATH] for k in ids[:3]] == [None, str(tmp_path / "img.png"), None]
    assert C.INIT_IMAGE_INPUT not in o.metadata.column_names
    expected, _, _ = reference(tiny_model, PROMPTS[:3], [1, 2, 3], init_images=[INIT[0], INIT[2], None],
                               strength=[0.5, 0.7, 1.0], **steps)
    assert_batch_independent(o.images(), dict(zip(ids[:3], expected)))
    assert o.manifest["identity"]["settings"]["strength"] == 0.7

    with pytest.raises(OutputConflict, match="strength"):
        run(RunConfig(str(table), str(out), model=tiny_model, strength=0.4, stages=stages, **steps))


def test_strength_without_init_images_is_refused(tmp_path, tiny_model):
    table = write_table(tmp_path / "prompts.parquet", prompt=["a"], strength=[0.5])
    with pytest.raises(ConfigError, match="no 'init_image' column"):
        plan_run(RunConfig(str(table), str(tmp_path / "out"), model=tiny_model))
    plain = write_table(tmp_path / "plain" / "prompts.parquet", prompt=["a"])
    with pytest.raises(ConfigError, match="--strength is for image-to-image"):
        plan_run(RunConfig(str(plain), str(tmp_path / "out"), model=tiny_model, strength=0.5))
    with pytest.raises(ConfigError, match="--strength is for image-to-image"):  # before any placement
        dry_run(RunConfig(str(plain), str(tmp_path / "out"), model=tiny_model, strength=0.5), echo=print)
