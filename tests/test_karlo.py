"""The Karlo model API (karlo_model.karlo) on the tiny random models that make_tiny_model writes.

* a row's image depends on its own prompt, seed and settings only: alone or inside a batch of 5, with per-row
  guidance scales and negative prompts mixed in one batch. Pixels are compared in float64: in float32 a matmul's
  rounding depends on the batch size (~1e-6 on CPU), and on random networks the first steps amplify that on the
  few pixels whose x0 estimate escapes the clamp (guidance x8, 1/sqrt(abar_999) ~ 2e4), up to hundreds of levels for
  some seeds. float64 leaves only the logic under test; float32 is checked on the embeddings;
* the stage API (prior_stage -> decoder_stage -> super_res_stage, handing over numpy arrays and generator states)
  equals ``generate`` exactly, also when the decoder stage runs in another process;
* seeds: same seed, same image; another seed, another image;
* negative prompts: [""] is the default bit for bit, and a negative prompt is the unconditional text of both the
  prior and the decoder;
* prompts over 77 tokens are flagged; argument lists of the wrong length are refused with a clear message;
* make_tiny_model is deterministic and writes the hub's model_index.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity_utils import single_thread  # noqa: F401 (fixture)

from karlo_model import Karlo, make_tiny_model

STEPS = dict(prior_steps=3, decoder_steps=3, super_res_steps=3)

PROMPTS = [
    "a horse in a field",
    "a red cube on a wooden table",
    "an astronaut riding a horse on the moon",
    "",
    "a bowl of soup that looks like a monster, knitted out of wool",
]
SEEDS = [101, 7, 4242, 0, 99]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def model(repo) -> Karlo:
    return Karlo.from_pretrained(repo)


@pytest.fixture(scope="module")
def model64(tmp_path_factory) -> Karlo:
    """The other tiny preset (64 px output, so float64 stays fast), in float64."""
    repo = make_tiny_model(tmp_path_factory.mktemp("tiny-alt") / "model", seed=3, preset_name="tiny-alt")
    return Karlo.from_pretrained(repo, dtype=torch.float64)


def assert_same_image(a: np.ndarray, b: np.ndarray, max_levels: int = 1, min_identical: float = 0.999) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    identical = float((diff == 0).mean())
    assert identical >= min_identical and diff.max() <= max_levels, (
        f"{identical:.4%} of pixels identical, max diff {diff.max()} levels"
    )


def assert_different_image(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert (diff > 2).mean() > 0.1, "the images should differ"


# ---------------------------------------------------------------------------------------------------------------
# Batch independence


def test_row_alone_equals_row_in_batch(model64):
    batch = model64.generate(PROMPTS, SEEDS, **STEPS)
    assert batch.images.shape == (5, model64.config.image_size, model64.config.image_size, 3)
    for i in range(5):
        alone = model64.generate([PROMPTS[i]], [SEEDS[i]], **STEPS)
        assert_same_image(alone.images[0], batch.images[i])
        np.testing.assert_allclose(alone.image_embeds[0], batch.image_embeds[i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(alone.text_embeds[0], batch.text_embeds[i], rtol=0, atol=1e-5)
    assert_different_image(batch.images[0], batch.images[1])


def test_row_alone_equals_row_in_batch_float32_embeddings(model):
    batch = model.prior_stage(PROMPTS, SEEDS, steps=STEPS["prior_steps"])
    for i in (0, 3, 4):
        alone = model.prior_stage([PROMPTS[i]], [SEEDS[i]], steps=STEPS["prior_steps"])
        torch.testing.assert_close(alone.image_embeds[0], batch.image_embeds[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(alone.text.embeds[0], batch.text.embeds[i], rtol=0, atol=1e-5)
        assert np.array_equal(alone.rng_state[0], batch.rng_state[i])  # the same draws were consumed


# ---------------------------------------------------------------------------------------------------------------
# Stage API


def _prior_arrays(result) -> dict[str, np.ndarray]:
    """Everything the prior stage hands over, as plain numpy arrays."""
    return dict(
        image_embeds=result.image_embeds.numpy(),
        text_embeds=result.text.embeds.numpy(), text_hidden=result.text.hidden.numpy(),
        text_mask=result.text.mask.numpy(), truncated=result.text.truncated,
        neg_embeds=result.negative.embeds.numpy(), neg_hidden=result.negative.hidden.numpy(),
        neg_mask=result.negative.mask.numpy(),
        rng_state=result.rng_state,
    )


def test_stages_equal_generate(model):
    prompts, seeds = PROMPTS[:3], SEEDS[:3]
    whole = model.generate(prompts, seeds, **STEPS)
    p = _prior_arrays(model.prior_stage(prompts, seeds, steps=STEPS["prior_steps"]))
    assert p["rng_state"].dtype == np.uint8 and p["rng_state"].shape[0] == 3
    d = model.decoder_stage(
        p["image_embeds"],
        model.text_encoding(p["text_embeds"], p["text_hidden"], p["text_mask"], p["truncated"]),
        model.text_encoding(p["neg_embeds"], p["neg_hidden"], p["neg_mask"]),
        p["rng_state"],
        steps=STEPS["decoder_steps"],
    )
    images = model.super_res_stage(d.image_64.numpy(), d.rng_state, steps=STEPS["super_res_steps"])
    assert np.array_equal(images, whole.images)
    assert np.array_equal(p["image_embeds"], whole.image_embeds)
    assert np.array_equal(p["text_embeds"], whole.text_embeds)


DECODER_IN_ANOTHER_PROCESS = """
import sys
import numpy as np
import torch
from karlo_model import Karlo

repo, arrays, out, threads, steps = sys.argv[1:]
torch.set_num_threads(int(threads))  # float reductions depend on the thread count
model = Karlo.from_pretrained(repo, stages=("decoder",))
assert set(model.modules) == {"text_proj", "decoder"}
a = np.load(arrays)
d = model.decoder_stage(
    a["image_embeds"],
    model.text_encoding(a["text_embeds"], a["text_hidden"], a["text_mask"]),
    model.text_encoding(a["neg_embeds"], a["neg_hidden"], a["neg_mask"]),
    a["rng_state"],
    steps=int(steps),
)
np.savez(out, image_64=d.image_64.numpy(), rng_state=d.rng_state)
"""


def test_stage_handover_to_another_process(model, repo, tmp_path):
    """The prior runs here, the decoder in a fresh interpreter from the saved arrays, the super-res here again."""
    prompts, seeds = PROMPTS[1:4], SEEDS[1:4]
    whole = model.generate(prompts, seeds, **STEPS)
    np.savez(tmp_path / "prior.npz", **_prior_arrays(model.prior_stage(prompts, seeds, steps=STEPS["prior_steps"])))
    subprocess.run(
        [sys.executable, "-c", DECODER_IN_ANOTHER_PROCESS, str(repo), str(tmp_path / "prior.npz"),
         str(tmp_path / "decoder.npz"), str(torch.get_num_threads()), str(STEPS["decoder_steps"])],
        check=True, timeout=300,
    )
    d = np.load(tmp_path / "decoder.npz")
    images = model.super_res_stage(d["image_64"], d["rng_state"], steps=STEPS["super_res_steps"])
    assert np.array_equal(images, whole.images)


# ---------------------------------------------------------------------------------------------------------------
# Seeds


def test_seeds(model):
    prompts = [PROMPTS[2], PROMPTS[2]]
    a = model.generate(prompts, [5, 6], **STEPS)
    b = model.generate(prompts, [5, 6], **STEPS)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.image_embeds, b.image_embeds)
    assert_different_image(a.images[0], a.images[1])  # same prompt, another seed
    assert np.abs(a.image_embeds[0] - a.image_embeds[1]).max() > 1e-2
    c = model.generate(prompts, [6, 5], **STEPS)
    assert np.array_equal(c.images[::-1], a.images)  # a row's image follows its seed, not its position


# ---------------------------------------------------------------------------------------------------------------
# Guidance settings and negative prompts

MIXED = [
    # prompt, seed, prior scale, decoder scale, negative prompt
    (PROMPTS[0], 5, 4.0, 8.0, "a blurry photo"),
    (PROMPTS[0], 5, 1.0, 1.0, ""),  # no guidance at all
    (PROMPTS[2], 6, 2.0, 5.0, ""),
    (PROMPTS[2], 6, 4.0, 1.0, "text, watermark"),  # guidance on through the prior scale only
]


def test_per_row_settings_in_one_batch_equal_each_row_alone(model64):
    prompts, seeds, prior_scales, decoder_scales, negatives = map(list, zip(*MIXED))
    batch = model64.generate(prompts, seeds, prior_guidance_scale=prior_scales, decoder_guidance_scale=decoder_scales,
                           negative_prompts=negatives, **STEPS)
    for i, (prompt, seed, ps, ds, neg) in enumerate(MIXED):
        alone = model64.generate([prompt], [seed], prior_guidance_scale=ps, decoder_guidance_scale=ds,
                                 negative_prompts=[neg], **STEPS)
        assert_same_image(alone.images[0], batch.images[i])
        np.testing.assert_allclose(alone.image_embeds[0], batch.image_embeds[i], rtol=0, atol=1e-5)
    # The settings matter: same prompt and seed, other scales / negative prompt -> another image.
    assert_different_image(batch.images[0], batch.images[1])
    assert_different_image(batch.images[2], batch.images[3])


def test_empty_negative_prompt_is_the_default(model):
    prompts, seeds = PROMPTS[:2], SEEDS[:2]
    default = model.generate(prompts, seeds, **STEPS)
    empty = model.generate(prompts, seeds, negative_prompts=["", ""], **STEPS)
    assert np.array_equal(default.images, empty.images)
    assert np.array_equal(default.image_embeds, empty.image_embeds)
    single = model.generate(prompts[:1], seeds[:1], negative_prompts=[""], **STEPS)
    assert np.array_equal(model.generate(prompts[:1], seeds[:1], **STEPS).images, single.images)
    other = model.generate(prompts, seeds, negative_prompts=["a blurry photo", ""], **STEPS)
    assert_different_image(other.images[0], default.images[0])


def test_negative_prompt_is_the_unconditional_text_of_both_stages(model):
    negative = "a blurry photo of text"
    calls: dict[str, list[dict]] = {"prior": [], "decoder": []}

    def record(name):
        def hook(module, args, kwargs):
            calls[name].append({k: v.clone() for k, v in kwargs.items()})
        return hook

    handles = [model.modules[n].register_forward_pre_hook(record(n), with_kwargs=True) for n in calls]
    try:
        model.generate([PROMPTS[1]], [SEEDS[1]], negative_prompts=[negative], **STEPS)
    finally:
        for h in handles:
            h.remove()
    neg, text = model.encode_text([negative]), model.encode_text([PROMPTS[1]])
    assert int(neg.mask.sum()) != int(model.encode_text([""]).mask.sum())  # distinguishable from ""

    assert len(calls["prior"]) == STEPS["prior_steps"]
    for kw in calls["prior"]:  # rows: [unconditional; conditional]
        torch.testing.assert_close(kw["text_embeds"], torch.cat([neg.embeds, text.embeds]), rtol=0, atol=1e-6)
        torch.testing.assert_close(kw["text_hidden"], torch.cat([neg.hidden, text.hidden]), rtol=0, atol=1e-6)
        assert torch.equal(kw["text_mask"], torch.cat([neg.mask, text.mask]))

    proj = model.modules["text_proj"]
    u_context, u_additive = proj(proj.unconditional_image_embeds(1, torch.float32), neg.embeds, neg.hidden)
    assert len(calls["decoder"]) == STEPS["decoder_steps"]
    for kw in calls["decoder"]:
        assert torch.equal(kw["context_mask"][0], F.pad(neg.mask[0], (4, 0), value=True))
        assert torch.equal(kw["context_mask"][1], F.pad(text.mask[0], (4, 0), value=True))
        torch.testing.assert_close(kw["context"][:1], u_context, rtol=0, atol=1e-5)
        torch.testing.assert_close(kw["class_labels"][:1], u_additive, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Prompts and arguments


def test_long_prompts_are_flagged_truncated(model):
    fits, one_over = "a " * 75, "a " * 76  # 75 / 76 tokens between <|startoftext|> and <|endoftext|>
    long = " ".join(["a horse galloping over green hills at sunset"] * 12)
    enc = model.encode_text([fits, one_over, long, "a horse"])
    assert enc.truncated.tolist() == [False, True, True, False]
    assert bool(enc.mask[0].all()) and bool(enc.mask[2].all())
    result = model.prior_stage([long, "a horse"], [1, 2], steps=2)
    assert result.text.truncated.tolist() == [True, False]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prior_guidance_scale=[4.0, 4.0]), "prior_guidance_scale: expected 1 or 3 values, got 2"),
        (dict(decoder_guidance_scale=[8.0] * 4), "decoder_guidance_scale: expected 1 or 3 values, got 4"),
        (dict(negative_prompts=[""]), "negative_prompts: expected 3 values, got 1"),
        (dict(seeds=[1, 2]), "got 3 prompts but 2 seeds"),
    ],
)
def test_argument_lengths_checked(model, kwargs, message):
    args = dict(seeds=[1, 2, 3]) | kwargs
    with pytest.raises(ValueError, match=message):
        model.generate(PROMPTS[:3], args.pop("seeds"), **args, **STEPS)


def test_stage_api_checks_guidance_lengths(model):
    p = model.prior_stage(PROMPTS[:2], [1, 2], steps=2)
    with pytest.raises(ValueError, match="decoder_guidance_scale: expected 1 or 2 values, got 3"):
        model.decoder_stage(p.image_embeds, p.text, p.negative, p.rng_state, steps=2,
                            decoder_guidance_scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="prior_guidance_scale: expected 1 or 2 values, got 3"):
        model.prior_stage(PROMPTS[:2], [1, 2], steps=2, prior_guidance_scale=[1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------------------------------
# make_tiny_model


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_tiny_model_is_deterministic(repo, tmp_path):
    again = _files(make_tiny_model(tmp_path / "again", seed=0))
    first = _files(repo)
    assert again.keys() == first.keys()
    assert [k for k in first if first[k] != again[k]] == []
    other = _files(make_tiny_model(tmp_path / "other", seed=1))
    weights = [k for k in first if k.endswith(".safetensors")]
    assert len(weights) == 6
    assert all(other[k] != first[k] for k in weights)
    assert all(other[k] == first[k] for k in first if k.endswith("config.json") and "text_encoder" not in k)


def test_make_tiny_model_writes_the_hub_model_index(repo, model):
    index = json.loads((repo / "model_index.json").read_text())
    assert index["_class_name"] == "UnCLIPPipeline"
    # The hub's model_index.json names text_proj as a pipeline-local module
    expected = {
        "decoder": ["diffusers", "UNet2DConditionModel"], "decoder_scheduler": ["diffusers", "UnCLIPScheduler"],
        "prior": ["diffusers", "PriorTransformer"], "prior_scheduler": ["diffusers", "UnCLIPScheduler"],
        "super_res_first": ["diffusers", "UNet2DModel"], "super_res_last": ["diffusers", "UNet2DModel"],
        "super_res_scheduler": ["diffusers", "UnCLIPScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_proj": ["unclip", "UnCLIPTextProjModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    assert {k: v for k, v in index.items() if not k.startswith("_")} == expected
    assert json.loads((repo / "super_res_last" / "config.json").read_text())["sample_size"] is None
    assert model.config.image_size == 256 and model.config.decoder.sample_size == 64
