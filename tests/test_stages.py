"""The model stages as plain callables (no Ray): parity with Karlo.generate, error rows, per-row failures."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pipeline_utils import PROMPTS, STEPS, assert_batch_independent

from pipeline import columns as C
from pipeline.stages import DecoderStage, PriorStage, SuperResStage

SEEDS = [11, 22, 33, 44]


@pytest.fixture(scope="module")
def stages(tiny_model):
    return (
        PriorStage(tiny_model, steps=STEPS["prior_steps"]),
        DecoderStage(tiny_model, steps=STEPS["decoder_steps"]),
        SuperResStage(tiny_model, steps=STEPS["super_res_steps"]),
    )


@pytest.fixture(scope="module")
def karlo(tiny_model):
    from karlo_model import Karlo

    return Karlo.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def generated(karlo):
    """Karlo.generate on the first four prompts as one batch."""
    return karlo.generate(PROMPTS[:4], SEEDS, **STEPS)


def prepared(prompts, seeds, *, errors=None, negative=None, prior_scale=4.0, decoder_scale=8.0):
    """A batch as the prepare step hands it to the prior stage: numpy columns, strings as objects."""
    n = len(prompts)
    errors = errors or [""] * n
    return {
        C.KEY: np.array([f"row-{i}" for i in range(n)], dtype=object),
        C.PROMPT: np.array(prompts, dtype=object),
        C.SEED: np.array(seeds, dtype=np.int64),
        C.NEGATIVE_PROMPT: np.array(negative or [""] * n, dtype=object),
        C.PRIOR_GUIDANCE_SCALE: np.broadcast_to(np.asarray(prior_scale, np.float64), (n,)).copy(),
        C.DECODER_GUIDANCE_SCALE: np.broadcast_to(np.asarray(decoder_scale, np.float64), (n,)).copy(),
        C.ERROR: np.array(errors, dtype=object),
        C.ERROR_STAGE: np.array(["prepare" if e else "" for e in errors], dtype=object),
    }


def run_stage(stage, batch):
    """What the actor does: hand the stage its declared columns, drop what it consumes, add what it returns."""
    out = stage({name: batch[name] for name in set(stage.inputs) | {C.ERROR, C.ERROR_STAGE}})
    result = {name: values for name, values in batch.items() if name not in stage.consumes}
    result.update(out)
    return result


def run_chain(stages, batch):
    for stage in stages:
        batch = run_stage(stage, batch)
    return batch


def test_chain_equals_generate_bitwise(stages, generated):
    out = run_chain(stages, prepared(PROMPTS[:4], SEEDS))
    assert out[C.IMAGE].dtype == np.uint8 and out[C.IMAGE].shape == generated.images.shape
    np.testing.assert_array_equal(out[C.IMAGE], generated.images)
    np.testing.assert_array_equal(out[C.IMAGE_EMB], generated.image_embeds)
    np.testing.assert_array_equal(out[C.TEXT_EMB], generated.text_embeds)
    assert list(out[C.ERROR]) == [""] * 4 and list(out[C.ERROR_STAGE]) == [""] * 4
    assert not out[C.PROMPT_TRUNCATED].any()
    # Hand-off columns are consumed on the way: only the final outputs and the row's own columns remain.
    assert not [name for name in out if C.is_internal(name)]


def test_per_row_settings_equal_generate(stages, karlo, generated):
    prompts = PROMPTS[:3]
    negative = ["blurry", "", "low quality, text"]
    prior_scale = [4.0, 1.0, 2.5]
    decoder_scale = [8.0, 1.0, 5.0]  # the middle row runs without guidance
    out = run_chain(
        stages, prepared(prompts, SEEDS[:3], negative=negative, prior_scale=prior_scale, decoder_scale=decoder_scale)
    )
    ref = karlo.generate(prompts, SEEDS[:3], negative_prompts=negative, prior_guidance_scale=prior_scale,
                         decoder_guidance_scale=decoder_scale, **STEPS)
    np.testing.assert_array_equal(out[C.IMAGE], ref.images)
    np.testing.assert_array_equal(out[C.IMAGE_EMB], ref.image_embeds)
    np.testing.assert_array_equal(out[C.TEXT_EMB], ref.text_embeds)
    # The settings matter: with the run defaults (4, 8, no negative prompt) every row comes out differently (far
    # more than batch size changes it; the random model saturates most pixels, which agree either way).
    for i in range(3):
        assert (out[C.IMAGE][i] == generated.images[i]).mean() < 0.99, i
        assert np.abs(out[C.IMAGE_EMB][i] - generated.image_embeds[i]).max() > 1e-3


def test_error_rows_pass_through_with_zero_outputs(stages, karlo):
    prompts = PROMPTS[:4]
    errors = ["", "prompt is empty", "", "seed must be an integer in [0, 2**63), got -1"]
    out = run_chain(stages, prepared(prompts, SEEDS, errors=errors))
    assert list(out[C.ERROR]) == errors
    assert list(out[C.ERROR_STAGE]) == ["", "prepare", "", "prepare"]
    for i in (1, 3):
        assert not out[C.IMAGE][i].any() and not out[C.IMAGE_EMB][i].any() and not out[C.TEXT_EMB][i].any()
        assert not out[C.PROMPT_TRUNCATED][i]
    # The good rows ran as one batch of two: the same batch through generate gives the same bits.
    good = [0, 2]
    ref = karlo.generate([prompts[i] for i in good], [SEEDS[i] for i in good], **STEPS)
    np.testing.assert_array_equal(out[C.IMAGE][good], ref.images)
    np.testing.assert_array_equal(out[C.IMAGE_EMB][good], ref.image_embeds)
    np.testing.assert_array_equal(out[C.TEXT_EMB][good], ref.text_embeds)


def test_all_error_batch_runs_no_model(stages, monkeypatch):
    for stage in stages:
        for method in ("prior_stage", "decoder_stage", "super_res_stage"):
            monkeypatch.setattr(stage.model, method, lambda *a, **k: pytest.fail("model called for error rows"))
    out = run_chain(stages, prepared(PROMPTS[:2], [1, 2], errors=["prompt is null", "prompt is empty"]))
    assert list(out[C.ERROR]) == ["prompt is null", "prompt is empty"]
    assert list(out[C.ERROR_STAGE]) == ["prepare", "prepare"]
    dim = stages[0].model.config.prior.embedding_dim
    size = stages[2].model.config.image_size
    assert out[C.IMAGE_EMB].shape == (2, dim) and not out[C.IMAGE_EMB].any()
    assert out[C.IMAGE].shape == (2, size, size, 3) and out[C.IMAGE].dtype == np.uint8 and not out[C.IMAGE].any()


def test_prior_failure_on_one_row_becomes_its_error(stages, karlo, generated, monkeypatch):
    prior = stages[0]
    prompts = PROMPTS[:4]
    bad = prompts[2]
    original = prior.model.prior_stage

    def flaky(prompts, *args, **kwargs):
        if bad in prompts:
            raise RuntimeError(f"cannot encode {bad!r}")
        return original(prompts, *args, **kwargs)

    monkeypatch.setattr(prior.model, "prior_stage", flaky)
    after_prior = run_stage(prior, prepared(prompts, SEEDS))
    assert list(after_prior[C.ERROR_STAGE]) == ["", "", "prior", ""]
    assert after_prior[C.ERROR][2] == f"RuntimeError: cannot encode {bad!r}"
    assert not after_prior[C.IMAGE_EMB][2].any()
    # The batch failed, so the other rows were retried one by one: their prior outputs are exactly those of
    # a batch of that row alone.
    good = [0, 1, 3]
    for i in good:
        alone = original([prompts[i]], [SEEDS[i]], steps=STEPS["prior_steps"])
        np.testing.assert_array_equal(after_prior[C.IMAGE_EMB][i], alone.image_embeds[0].numpy())
        np.testing.assert_array_equal(after_prior[C.TEXT_EMB][i], alone.text.embeds[0].numpy())
        np.testing.assert_array_equal(after_prior[C.RNG_STATE][i], alone.rng_state[0])

    out = run_chain(stages[1:], after_prior)
    assert list(out[C.ERROR_STAGE]) == ["", "", "prior", ""]
    assert out[C.ERROR][2] == f"RuntimeError: cannot encode {bad!r}"
    assert not out[C.IMAGE][2].any()
    assert_batch_independent(out[C.IMAGE][good], generated.images[good])


def test_decoder_failure_on_one_row_becomes_its_error(stages, generated, monkeypatch):
    prior, decoder, super_res = stages
    after_prior = run_stage(prior, prepared(PROMPTS[:4], SEEDS))
    poison = after_prior[C.IMAGE_EMB][1].copy()
    original = decoder.model.decoder_stage

    def flaky(image_embeds, *args, **kwargs):
        if any(np.array_equal(row, poison) for row in np.asarray(image_embeds)):
            raise FloatingPointError("NaN in the decoder")
        return original(image_embeds, *args, **kwargs)

    monkeypatch.setattr(decoder.model, "decoder_stage", flaky)
    after_decoder = run_stage(decoder, after_prior)
    assert list(after_decoder[C.ERROR_STAGE]) == ["", "decoder", "", ""]
    assert after_decoder[C.ERROR][1] == "FloatingPointError: NaN in the decoder"
    assert not after_decoder[C.IMAGE_64][1].any()
    # The survivors were decoded one by one: each equals the decoder stage on a batch of that row alone.
    monkeypatch.setattr(decoder.model, "decoder_stage", original)
    good = [0, 2, 3]
    for i in good:
        alone = run_stage(decoder, {name: values[i : i + 1] for name, values in after_prior.items()})
        np.testing.assert_array_equal(after_decoder[C.IMAGE_64][i], alone[C.IMAGE_64][0])
        np.testing.assert_array_equal(after_decoder[C.RNG_STATE][i], alone[C.RNG_STATE][0])

    out = run_stage(super_res, after_decoder)
    assert list(out[C.ERROR_STAGE]) == ["", "decoder", "", ""]
    assert out[C.ERROR][1] == "FloatingPointError: NaN in the decoder"
    assert not out[C.IMAGE][1].any()
    # The prior ran for the failed row before the decoder did: its embeddings stay in the (error) row.
    np.testing.assert_array_equal(out[C.IMAGE_EMB][1], poison)
    np.testing.assert_array_equal(out[C.IMAGE_EMB][good], generated.image_embeds[good])
    assert_batch_independent(out[C.IMAGE][good], generated.images[good])


def test_long_error_messages_are_cut(stages, monkeypatch):
    prior = stages[0]

    def explode(*args, **kwargs):
        raise ValueError("x" * 5000)

    monkeypatch.setattr(prior.model, "prior_stage", explode)
    out = run_stage(prior, prepared(PROMPTS[:2], [1, 2]))
    assert list(out[C.ERROR_STAGE]) == ["prior", "prior"]
    assert all(e.startswith("ValueError: xxx") and len(e) == 1000 for e in out[C.ERROR])


def test_actor_modules_leave_transformers_and_optional_stages_unimported():
    """A decoder or super-res actor, an encoder actor and a write task start without importing transformers or
    the optional stages' modules: each costs seconds of CPU per process at start-up."""
    code = ("import sys, pipeline.actors, pipeline.stages, pipeline.encode, pipeline.sinks, pipeline.schema; "
            "print(sorted(m for m in ('transformers', 'pipeline.scoring', 'pipeline.variations') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
