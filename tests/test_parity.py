"""Parity with diffusers' UnCLIPPipeline on tiny random weights that diffusers itself initialised and saved.

For each of two tiny configs that differ in every dimension ("tiny", "tiny-alt"), a diffusers pipeline is built
with diffusers'/transformers' own seeded init and written with ``save_pretrained`` (tests/parity_utils.py); our
``Karlo.from_pretrained`` loads that folder as diffusers wrote it, and diffusers runs from the same folder.

* the loaded configs are our presets; diffusers' own model_index spelling of text_proj loads;
* tokenizer ids and masks equal diffusers' tokenizer (long, empty and unicode prompts), plus CLIP's known ids;
* every network forward (text encoder, prior, text_proj, decoder, both super-res) on the same random inputs;
* ``Karlo.generate(prompts, seeds)`` against ``UnCLIPPipeline(prompts, generator=[one per seed])``: the uint8
  images, the prior's image embeddings and the text embeddings, with guidance, without, with only the decoder
  guided, for one prompt and for a batch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity_utils import KARLO_SCHEDULERS, load_pipeline, save_pipeline, single_thread  # noqa: F401 (fixture)

from karlo_model import Karlo, preset
from karlo_model.text import tokenize

PRESET_SEEDS = {"tiny": 0, "tiny-alt": 7}
STEPS = dict(prior=3, decoder=3, super_res=3)

# Per-pixel agreement demanded of whole images (uint8).
MIN_IDENTICAL = 0.999
MAX_LEVELS = 2


@dataclass
class Reference:
    name: str
    repo: Path
    pipe: object  # diffusers UnCLIPPipeline
    karlo: Karlo


@pytest.fixture(scope="module", params=sorted(PRESET_SEEDS))
def ref(request, tmp_path_factory) -> Reference:
    name = request.param
    repo = save_pipeline(name, PRESET_SEEDS[name], tmp_path_factory.mktemp(f"diffusers-{name}"))
    return Reference(name, repo, load_pipeline(repo), Karlo.from_pretrained(repo))


def assert_rel_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-5) -> None:
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().item()
    assert scale > 0
    err = (ours - theirs).abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} vs output scale {scale:.3g}"


def assert_images_match(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    identical = float((diff == 0).mean())
    assert identical >= MIN_IDENTICAL and diff.max() <= MAX_LEVELS, (
        f"{identical:.4%} of pixels identical, max diff {diff.max()} levels"
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading what diffusers wrote


def test_loaded_config_is_the_preset(ref: Reference):
    ours, expected = ref.karlo.config, preset(ref.name)
    for component in ("prior", "text_proj", "decoder", "super_res_first", "super_res_last"):
        assert getattr(ours, component) == getattr(expected, component), component
    for name, values in KARLO_SCHEDULERS.items():
        cfg = getattr(ours, name)
        assert {k: getattr(cfg, k) for k in values} == values
    for key in ("hidden_size", "projection_dim", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                "vocab_size", "max_position_embeddings", "eos_token_id", "hidden_act"):
        assert ours.text_encoder[key] == expected.text_encoder[key], key
    assert ours.super_res_last.sample_size == expected.super_res_last.sample_size
    assert ours.image_size == ref.pipe.super_res_first.config.sample_size


def test_diffusers_model_index_spelling_loads(ref: Reference):
    """diffusers writes ["diffusers", "UnCLIPTextProjModel"]; the hub says ["unclip", ...]; both load."""
    index = json.loads((ref.repo / "model_index.json").read_text())
    assert index["text_proj"] == ["diffusers", "UnCLIPTextProjModel"]
    assert set(ref.karlo.modules) == {"text_encoder", "prior", "text_proj", "decoder", "super_res_first",
                                      "super_res_last"}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

PROMPTS = [
    "a photo of a cat",
    "",
    "Ein Pferd auf dem Mond — 月の馬 🐴, café naïve!",
    " ".join(["a horse galloping over green hills at sunset"] * 12),  # > 77 tokens
    "A   MiXeD   Case\tprompt\nwith  odd whitespace & punctuation?!",
]


def test_tokenizer_matches_diffusers(ref: Reference):
    ids, mask, truncated = tokenize(ref.karlo.tokenizer, PROMPTS)
    theirs = ref.pipe.tokenizer(PROMPTS, padding="max_length", max_length=ref.pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
    assert ids.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, theirs.input_ids)
    assert torch.equal(mask, theirs.attention_mask.bool())
    assert truncated.tolist() == [False, False, False, True, False]


def test_tokenizer_uses_clip_vocabulary_and_karlo_padding(ref: Reference):
    ids, mask, _ = tokenize(ref.karlo.tokenizer, ["a photo of a cat", ""])
    # CLIP BPE ids: <|startoftext|> a photo of a cat <|endoftext|>, then pad "!" = 0 (the hub tokenizer's pad token).
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert ids[0, 7:].eq(0).all()
    assert ids[1, :3].tolist() == [49406, 49407, 0]
    assert mask[0].sum() == 7 and mask[0, :7].all()
    assert mask[1].tolist() == [True, True] + [False] * 75


# ---------------------------------------------------------------------------------------------------------------
# Network forwards on the same random inputs


def _lengths_mask(lengths: list[int], n: int = 77) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, n) bool


@torch.no_grad()
def test_text_encoder_forward(ref: Reference):
    enc = ref.karlo.encode_text(PROMPTS)
    ids = ref.pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    out = ref.pipe.text_encoder(ids)
    assert_rel_close(enc.embeds, out.text_embeds)
    assert_rel_close(enc.hidden, out.last_hidden_state)


@torch.no_grad()
@pytest.mark.parametrize("timestep", [999, 0, "per-row"])
def test_prior_forward(ref: Reference, timestep):
    g = torch.Generator().manual_seed(1)
    b, d = 4, ref.karlo.config.prior.embedding_dim
    x, embeds = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    hidden = torch.randn(b, 77, d, generator=g)
    mask = _lengths_mask([77, 2, 10, 40])
    t = torch.tensor([0, 250, 999, 17]) if timestep == "per-row" else torch.tensor(timestep)
    ours = ref.karlo.modules["prior"](x, t, embeds, hidden, mask)
    theirs = ref.pipe.prior(x, timestep=t, proj_embedding=embeds, encoder_hidden_states=hidden,
                            attention_mask=mask).predicted_image_embedding
    assert_rel_close(ours, theirs)
    assert_rel_close(ref.karlo.modules["prior"].unnormalise(ours), ref.pipe.prior.post_process_latents(theirs))


@torch.no_grad()
@pytest.mark.parametrize("guidance", [True, False])
def test_text_proj_forward(ref: Reference, guidance):
    g = torch.Generator().manual_seed(2)
    b, d = 3, ref.karlo.config.text_proj.clip_embeddings_dim
    n = 2 * b if guidance else b
    image = torch.randn(b, d, generator=g)
    embeds, hidden = torch.randn(n, d, generator=g), torch.randn(n, 77, d, generator=g)
    ctx_theirs, add_theirs = ref.pipe.text_proj(image_embeddings=image, prompt_embeds=embeds,
                                                text_encoder_hidden_states=hidden,
                                                do_classifier_free_guidance=guidance)
    proj = ref.karlo.modules["text_proj"]
    if guidance:
        image = torch.cat([proj.unconditional_image_embeds(b, torch.float32), image])
    ctx, add = proj(image, embeds, hidden)
    assert_rel_close(ctx, ctx_theirs)
    assert_rel_close(add, add_theirs)


@torch.no_grad()
@pytest.mark.parametrize("timestep", [999, 500, 0])
def test_decoder_forward(ref: Reference, timestep):
    g = torch.Generator().manual_seed(3)
    cfg = ref.karlo.config
    b, s = 4, cfg.decoder.sample_size
    x = torch.randn(b, 3, s, s, generator=g)
    context = torch.randn(b, 81, cfg.decoder.cross_attention_dim, generator=g)
    additive = torch.randn(b, cfg.text_proj.time_embed_dim, generator=g)
    mask = F.pad(_lengths_mask([77, 2, 10, 40]), (4, 0), value=True)
    t = torch.tensor(timestep)
    ours = ref.karlo.modules["decoder"](x, t, context, mask, additive)
    theirs = ref.pipe.decoder(sample=x, timestep=t, encoder_hidden_states=context, class_labels=additive,
                              attention_mask=mask).sample
    assert ours.shape == (b, 6, s, s)
    assert_rel_close(ours, theirs)


@torch.no_grad()
@pytest.mark.parametrize("component", ["super_res_first", "super_res_last"])
def test_super_res_forward(ref: Reference, component):
    g = torch.Generator().manual_seed(4)
    s = ref.karlo.config.image_size
    x = torch.randn(2, 6, s, s, generator=g)
    for t in (torch.tensor(999), torch.tensor(0)):
        ours = ref.karlo.modules[component](x, t)
        theirs = getattr(ref.pipe, component)(sample=x, timestep=t).sample
        assert ours.shape == (2, 3, s, s)
        assert_rel_close(ours, theirs)


# ---------------------------------------------------------------------------------------------------------------
# Whole text-to-image runs


@dataclass
class DiffusersRun:
    images: np.ndarray  # (B, H, W, 3) uint8
    image_embeds: np.ndarray  # (B, D) output of the prior (after post_process_latents)
    text_embeds: np.ndarray  # (B, D) the prompts' text embeddings


def run_diffusers(pipe, prompts, seeds, *, output_type="np", **kwargs) -> DiffusersRun:
    captured: dict[str, torch.Tensor] = {}
    post_process = pipe.prior.post_process_latents

    def capture_embeds(latents):
        captured["image_embeds"] = out = post_process(latents)
        return out

    def capture_text(module, args, output):
        captured.setdefault("text_embeds", output.text_embeds)  # the first call encodes the prompts

    pipe.prior.post_process_latents = capture_embeds
    handle = pipe.text_encoder.register_forward_hook(capture_text)
    try:
        images = pipe(
            prompts,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            prior_num_inference_steps=STEPS["prior"],
            decoder_num_inference_steps=STEPS["decoder"],
            super_res_num_inference_steps=STEPS["super_res"],
            output_type=output_type,
            **kwargs,
        ).images
    finally:
        handle.remove()
        del pipe.prior.post_process_latents
    if output_type == "pil":
        images = np.stack([np.asarray(im) for im in images])
    else:
        images = (images * 255).round().astype(np.uint8)  # what diffusers' numpy_to_pil does
    return DiffusersRun(images, captured["image_embeds"].numpy(), captured["text_embeds"].numpy())


CASES = {
    # name: (prompts, seeds, prior scale, decoder scale, output_type)
    "guided-batch": (["a horse", "a red cube on a wooden table", ""], [11, 22, 33], 4.0, 8.0, "np"),
    "unguided-batch": (["a horse", "a red cube on a wooden table", ""], [11, 22, 33], 1.0, 1.0, "np"),
    "decoder-guided-only": (["an astronaut riding a horse", "café 🐴"], [5, 6], 1.0, 3.0, "np"),
    "single-prompt-pil": ([PROMPTS[3]], [123], 4.0, 8.0, "pil"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generate_matches_diffusers(ref: Reference, case):
    prompts, seeds, prior_scale, decoder_scale, output_type = CASES[case]
    theirs = run_diffusers(ref.pipe, prompts, seeds, output_type=output_type,
                           prior_guidance_scale=prior_scale, decoder_guidance_scale=decoder_scale)
    ours = ref.karlo.generate(
        prompts, seeds, prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"],
        super_res_steps=STEPS["super_res"], prior_guidance_scale=prior_scale, decoder_guidance_scale=decoder_scale,
    )
    size = ref.karlo.config.image_size
    assert theirs.images.shape == (len(prompts), size, size, 3)
    if len(prompts) > 1:  # the comparison below is not between constant images
        assert not np.array_equal(theirs.images[0], theirs.images[1])
    assert_images_match(ours.images, theirs.images)
    for name in ("image_embeds", "text_embeds"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.shape == b.shape
        assert np.abs(b).max() > 0.1  # not degenerate
        assert np.abs(a - b).max() <= 1e-4, name


def test_injected_latents_match_diffusers(ref: Reference):
    """Starting latents given for the three chains replace the generators' first draws, as diffusers'
    prior_latents, decoder_latents and super_res_latents do (image-to-image starts the decoder this way)."""
    prompts, seeds = ["a horse", "a red cube on a wooden table"], [11, 22]
    cfg, g = ref.karlo.config, torch.Generator().manual_seed(99)
    dec = cfg.decoder
    latents = dict(
        prior_latents=torch.randn((2, cfg.prior.embedding_dim), generator=g),
        decoder_latents=torch.randn((2, dec.in_channels, dec.sample_size, dec.sample_size), generator=g),
        super_res_latents=torch.randn((2, 3, cfg.image_size, cfg.image_size), generator=g),
    )
    steps = dict(prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"], super_res_steps=STEPS["super_res"])
    theirs = run_diffusers(ref.pipe, prompts, seeds, **latents)
    ours = ref.karlo.generate(prompts, seeds, **steps, **latents)
    assert_images_match(ours.images, theirs.images)
    assert np.abs(ours.image_embeds - theirs.image_embeds).max() <= 1e-4
    assert not np.array_equal(ours.images, ref.karlo.generate(prompts, seeds, **steps).images)
    expected = re.escape(f"latents: expected shape {(2, dec.in_channels, dec.sample_size, dec.sample_size)}")
    with pytest.raises(ValueError, match=expected):
        ref.karlo.generate(prompts, seeds, **steps, decoder_latents=latents["decoder_latents"][:1])
