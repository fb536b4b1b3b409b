"""Loading the original kakaobrain checkpoints (karlo_model.original).

* Full size, on the meta device: the original key sets convert to exactly the keys and shapes of diffusers'
  PriorTransformer / UNet2DConditionModel / UnCLIPTextProjModel / UNet2DModel with the hub configs.
* Tiny, numerically: seeded original-layout networks (tests/original_layout.py, with their own forward) are saved as
  real .ckpt files, loaded with load_original, loaded strict into diffusers modules, and must give the same outputs
  in float64. Deliberately wrong conversions (q/k swapped, heads split without the interleave, the extra-token layout
  transposed, two up-block resnets swapped, the SR networks swapped) must fail that check.
* Every error a user can reach, with its message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import fsspec
import pytest
import torch
import torch.nn.functional as F
from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from original_layout import (
    OriginalDecoder,
    OriginalPrior,
    OriginalSuperRes,
    TinyOriginal,
    decoder_checkpoint_state,
    prior_checkpoint_state,
    save_checkpoint,
    super_res_checkpoint_state,
    write_tiny_original,
)

from karlo_model.original import (
    CheckpointError,
    convert_decoder,
    convert_prior,
    convert_super_res,
    load_checkpoint,
    load_clip_stats,
    load_original,
)

StateDict = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------------------------
# Full size (the hub repo's configs; parameter and original key counts of the published checkpoints)

PRIOR_CONFIG = dict(additional_embeddings=4, attention_head_dim=64, dropout=0.0, embedding_dim=768,
                    num_attention_heads=32, num_embeddings=77, num_layers=20)
DECODER_CONFIG = dict(
    act_fn="silu", attention_head_dim=64, block_out_channels=(320, 640, 960, 1280), center_input_sample=False,
    class_embed_type="identity", cross_attention_dim=1536,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=3,
    layers_per_block=3, mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_eps=1e-5,
    norm_num_groups=32, num_class_embeds=None, only_cross_attention=False, out_channels=6,
    resnet_time_scale_shift="scale_shift", sample_size=64,
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
    upcast_attention=False, use_linear_projection=False,
)
TEXT_PROJ_CONFIG = dict(clip_embeddings_dim=768, clip_extra_context_tokens=4, cross_attention_dim=1536,
                        time_embed_dim=1280)
SUPER_RES_CONFIG = dict(
    act_fn="silu", add_attention=False, attention_head_dim=8, block_out_channels=(320, 640, 960, 1280),
    center_input_sample=False, down_block_types=("ResnetDownsampleBlock2D",) * 4,
    up_block_types=("ResnetUpsampleBlock2D",) * 4, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    in_channels=6, layers_per_block=3, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=3,
    resnet_time_scale_shift="default", time_embedding_type="positional", sample_size=256,
)


def _params(sd: StateDict) -> int:
    return sum(t.numel() for t in sd.values())


def assert_same_layout(converted: StateDict, expected: StateDict) -> None:
    missing = sorted(expected.keys() - converted.keys())
    extra = sorted(converted.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & converted.keys() if converted[k].shape != expected[k].shape)
    assert (missing, extra, misshaped) == ([], [], [])


def test_full_size_prior_converts_to_the_diffusers_layout():
    with torch.device("meta"):
        original = prior_checkpoint_state(OriginalPrior())
        expected = PriorTransformer(**PRIOR_CONFIG).state_dict()
        clip_mean, clip_std = torch.empty(768), torch.empty(768)
    assert (len(original), _params(original)) == (256, 1_022_028_544)
    converted = convert_prior(original, clip_mean, clip_std)
    assert_same_layout(converted, expected)
    assert (len(converted), _params(converted)) == (338, 1_022_030_080)


def test_full_size_decoder_converts_to_the_diffusers_layout():
    with torch.device("meta"):
        original = decoder_checkpoint_state(OriginalDecoder())
        expected_unet = UNet2DConditionModel(**DECODER_CONFIG).state_dict()
        expected_text_proj = UnCLIPTextProjModel(**TEXT_PROJ_CONFIG).state_dict()
    assert (len(original), _params(original)) == (595, 893_318_086)
    unet, text_proj = convert_decoder(original)
    assert_same_layout(unet, expected_unet)
    assert_same_layout(text_proj, expected_text_proj)
    assert (len(unet), _params(unet)) == (716, 885_439_686)
    assert _params(text_proj) == 7_878_400


def test_full_size_super_res_converts_to_the_diffusers_layout():
    with torch.device("meta"):
        original = super_res_checkpoint_state(OriginalSuperRes(), OriginalSuperRes())
        expected = UNet2DModel(**SUPER_RES_CONFIG).state_dict()
    assert (len(original), _params(original)) == (816, 2 * 691_579_523)
    first, last = convert_super_res(original)
    for converted in (first, last):
        assert_same_layout(converted, expected)
        assert (len(converted), _params(converted)) == (408, 691_579_523)


# ---------------------------------------------------------------------------------------------------------------
# Tiny, numerical. Sizes differ between the decoder (3 levels x 2 res blocks, attention on levels 1-2 and the
# middle) and the super-res nets (2 levels x 1 res block): the structure is read from the keys, not assumed.
# Every attention has >= 2 heads, so a wrong per-head split changes the output.

TEXT_CTX, CLIP_DIM, PRIOR_WIDTH, PRIOR_HEADS, XF_WIDTH, HEAD_DIM, EXTRA_TOKENS = 7, 12, 16, 2, 24, 16, 4

TINY_PRIOR = dict(num_attention_heads=PRIOR_HEADS, attention_head_dim=PRIOR_WIDTH // PRIOR_HEADS, num_layers=2,
                  embedding_dim=CLIP_DIM, num_embeddings=TEXT_CTX, additional_embeddings=4, dropout=0.0)
TINY_DECODER = dict(
    sample_size=8, in_channels=3, out_channels=6, block_out_channels=(32, 32, 64), layers_per_block=2,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=XF_WIDTH, attention_head_dim=HEAD_DIM,
    resnet_time_scale_shift="scale_shift", class_embed_type="identity", norm_num_groups=32,
)
TINY_TEXT_PROJ = dict(clip_extra_context_tokens=EXTRA_TOKENS, clip_embeddings_dim=CLIP_DIM, time_embed_dim=128,
                      cross_attention_dim=XF_WIDTH)
TINY_SUPER_RES = dict(
    sample_size=8, in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
    add_attention=False, resnet_time_scale_shift="default", norm_num_groups=32,
)


@dataclass(repr=False)
class Tiny(TinyOriginal):
    converted: dict[str, StateDict]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    tmp = tmp_path_factory.mktemp("original")
    # float64, so that a correct conversion agrees to ~1e-12 and a wrong one stands out
    nets = write_tiny_original(tmp, text_ctx=TEXT_CTX, clip_dim=CLIP_DIM, prior_width=PRIOR_WIDTH,
                               prior_heads=PRIOR_HEADS, xf_width=XF_WIDTH, head_dim=HEAD_DIM,
                               extra_tokens=EXTRA_TOKENS, decoder_size=8, dtype=torch.float64)
    files = nets.files
    converted = load_original(str(files["prior"]), str(files["decoder"]), str(files["sr"]), str(files["stats"]),
                              prior_num_heads=PRIOR_HEADS, attention_head_dim=HEAD_DIM)
    return Tiny(**vars(nets), converted=converted)


def _strict(module: torch.nn.Module, sd: StateDict) -> torch.nn.Module:
    module = module.double().eval()
    module.load_state_dict(sd, strict=True)
    return module


def _text_inputs(rows: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP text embedding (rows, clip), hidden states (rows, ctx, clip), and a mask with a different number of real
    tokens per row (always >= 1: BOS is never padding)."""
    emb = torch.randn(rows, CLIP_DIM, generator=g, dtype=torch.float64)
    seq = torch.randn(rows, TEXT_CTX, CLIP_DIM, generator=g, dtype=torch.float64)
    lengths = torch.tensor([TEXT_CTX, 3, 1, 5][:rows])
    mask = torch.arange(TEXT_CTX)[None, :] < lengths[:, None]
    return emb, seq, mask


@torch.no_grad()
def prior_error(tiny: Tiny, converted: dict[str, StateDict]) -> float:
    """Max |original - diffusers| over the prior's x0 prediction and its un-normalisation."""
    prior = _strict(PriorTransformer(**TINY_PRIOR), converted["prior"])
    g = torch.Generator().manual_seed(10)
    text_emb, text_enc, mask = _text_inputs(3, g)
    x = torch.randn(3, CLIP_DIM, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 411, 999])
    expected = tiny.prior(x, t, text_emb, text_enc, mask)
    got = prior(x, t, proj_embedding=text_emb, encoder_hidden_states=text_enc, attention_mask=mask)
    got = got.predicted_image_embedding
    unnormalised = prior.post_process_latents(got) - (got * tiny.clip_std + tiny.clip_mean)
    return max((got - expected).abs().max().item(), unnormalised.abs().max().item())


@torch.no_grad()
def decoder_error(tiny: Tiny, converted: dict[str, StateDict]) -> float:
    """Max |original - diffusers| of the decoder output for a classifier-free-guidance batch: the unconditional rows
    take cf_param as image embedding (text_proj prepends them), the conditional rows the given embedding."""
    unet = _strict(UNet2DConditionModel(**TINY_DECODER), converted["decoder"])
    text_proj = _strict(UnCLIPTextProjModel(**TINY_TEXT_PROJ), converted["text_proj"])
    g = torch.Generator().manual_seed(11)
    txt_feat, txt_feat_seq, mask = _text_inputs(4, g)  # rows [uncond 0, uncond 1, cond 0, cond 1]
    image_emb = torch.randn(2, CLIP_DIM, generator=g, dtype=torch.float64)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([999, 500, 999, 17])
    y = torch.cat([tiny.decoder.cf_param.expand(2, -1), image_emb])
    expected = tiny.decoder(x, t, txt_feat, txt_feat_seq, mask, y)
    hidden, additive = text_proj(image_embeddings=image_emb, prompt_embeds=txt_feat,
                                 text_encoder_hidden_states=txt_feat_seq, do_classifier_free_guidance=True)
    got = unet(x, t, encoder_hidden_states=hidden, class_labels=additive,
               attention_mask=F.pad(mask, (EXTRA_TOKENS, 0), value=True)).sample
    return (got - expected).abs().max().item()


@torch.no_grad()
def super_res_error(tiny: Tiny, converted: dict[str, StateDict]) -> float:
    """Max |original - diffusers| for both SR networks on cat([noisy x, low-res]) inputs."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    low_res = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([999, 166])
    errors = []
    for name, original in (("super_res_first", tiny.sr_first), ("super_res_last", tiny.sr_last)):
        unet = _strict(UNet2DModel(**TINY_SUPER_RES), converted[name])
        got = unet(torch.cat([x, low_res], dim=1), t).sample
        errors.append((got - original(x, t, low_res)).abs().max().item())
    return max(errors)


def test_tiny_prior_matches_the_original_computation(tiny):
    assert prior_error(tiny, tiny.converted) < 1e-10


def test_tiny_decoder_and_text_proj_match_the_original_computation(tiny):
    assert decoder_error(tiny, tiny.converted) < 1e-10


def test_tiny_super_res_matches_the_original_computation(tiny):
    assert super_res_error(tiny, tiny.converted) < 1e-10


def test_outputs_are_large_enough_for_the_check_to_mean_something(tiny):
    # The controls below must move outputs by far more than 1e-10; outputs of O(0.1..10) make that possible.
    with torch.no_grad():
        g = torch.Generator().manual_seed(10)
        text_emb, text_enc, mask = _text_inputs(3, g)
        x = torch.randn(3, CLIP_DIM, generator=g, dtype=torch.float64)
        out = tiny.prior(x, torch.tensor([0, 411, 999]), text_emb, text_enc, mask)
    assert out.abs().mean() > 0.05


# Wrong conversions, each a plausible converter bug. The numerical checks above must notice them.


def _swap(sd: StateDict, a: str, b: str) -> StateDict:
    """Exchange the tensors of modules `a` and `b`."""
    out = {}
    for key, value in sd.items():
        if key.startswith(a + "."):
            key = b + key[len(a):]
        elif key.startswith(b + "."):
            key = a + key[len(b):]
        out[key] = value
    return out


def _split_without_interleave(fused_w: torch.Tensor, fused_b: torch.Tensor, dst: str) -> StateDict:
    """q/k/v as three contiguous thirds of the fused rows, i.e. ignoring the (heads, 3, head_dim) layout."""
    out = {}
    for name, w, b in zip(("to_q", "to_k", "to_v"), fused_w.chunk(3), fused_b.chunk(3)):
        out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = w, b
    return out


def _prior_heads_not_interleaved(tiny: Tiny, sd: StateDict) -> StateDict:
    attn = tiny.prior.transformer.resblocks[1].attn
    return sd | _split_without_interleave(attn.c_qkv.weight, attn.c_qkv.bias, "transformer_blocks.1.attn1")


def _decoder_heads_not_interleaved(tiny: Tiny, sd: StateDict) -> StateDict:
    attn = tiny.decoder.middle_block[1]
    return sd | _split_without_interleave(attn.qkv.weight[..., 0], attn.qkv.bias, "mid_block.attentions.0")


def _tokens_transposed(tiny: Tiny, sd: StateDict) -> StateDict:
    # Reading clip_tok_proj's output as token-major (n, W) instead of channel-first (W, n).
    sd = dict(sd)
    for p in ("weight", "bias"):
        rows = sd[f"clip_extra_context_tokens_proj.{p}"]
        rows = rows.reshape(EXTRA_TOKENS, XF_WIDTH, *rows.shape[1:]).transpose(0, 1)
        sd[f"clip_extra_context_tokens_proj.{p}"] = rows.reshape(XF_WIDTH * EXTRA_TOKENS, *rows.shape[2:])
    return sd


CORRUPTIONS = {
    "prior q and k swapped": (
        "prior", prior_error,
        lambda tiny, sd: _swap(sd, "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k")),
    "prior heads split without the interleave": ("prior", prior_error, _prior_heads_not_interleaved),
    "prior mean and std swapped": (
        "prior", prior_error, lambda tiny, sd: sd | {"clip_mean": sd["clip_std"], "clip_std": sd["clip_mean"]}),
    "decoder attention k and v swapped": (
        "decoder", decoder_error,
        lambda tiny, sd: _swap(sd, "down_blocks.1.attentions.0.to_k", "down_blocks.1.attentions.0.to_v")),
    "decoder text keys and values swapped": (
        "decoder", decoder_error,
        lambda tiny, sd: _swap(sd, "up_blocks.0.attentions.2.add_k_proj", "up_blocks.0.attentions.2.add_v_proj")),
    "decoder heads split without the interleave": ("decoder", decoder_error, _decoder_heads_not_interleaved),
    "extra-token layout transposed": ("text_proj", decoder_error, _tokens_transposed),
    # Same shapes (32 + 32 -> 32 channels): only the numbers can tell which skip tensor each resnet consumes.
    "up-block resnets 1 and 2 swapped": (
        "decoder", decoder_error, lambda tiny, sd: _swap(sd, "up_blocks.2.resnets.1", "up_blocks.2.resnets.2")),
    "super-res first and last swapped": (
        "super_res_first", super_res_error, lambda tiny, sd: tiny.converted["super_res_last"]),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_wrong_conversion_fails_the_numerical_check(tiny, name):
    component, error, corrupt = CORRUPTIONS[name]
    converted = tiny.converted | {component: corrupt(tiny, tiny.converted[component])}
    assert error(tiny, converted) > 1e-4


def test_converted_tensors_are_contiguous_and_keep_dtype(tiny):
    for component, sd in tiny.converted.items():
        for key, value in sd.items():
            assert value.is_contiguous() and value.dtype == torch.float64, (component, key)


def test_checkpoints_load_from_fsspec_urls(tiny):
    fs = fsspec.filesystem("memory")
    fs.pipe("/karlo/prior.ckpt", tiny.files["prior"].read_bytes())
    fs.pipe("/karlo/stats.th", tiny.files["stats"].read_bytes())
    local = load_checkpoint(str(tiny.files["prior"]))
    remote = load_checkpoint("memory://karlo/prior.ckpt")
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)
    mean, std = load_clip_stats("memory://karlo/stats.th")
    assert torch.equal(mean, tiny.clip_mean) and torch.equal(std, tiny.clip_std)


# ---------------------------------------------------------------------------------------------------------------
# Error paths


class Opaque:
    """A custom class: loading it would need arbitrary unpickling."""


def test_missing_file_is_named(tmp_path, tiny):
    missing = tmp_path / "prior-ckpt-step=01000000-of-01000000.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_checkpoint(str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "stats.th"))):
        load_original(*(str(tiny.files[k]) for k in ("prior", "decoder", "sr")), str(tmp_path / "stats.th"))


def test_pickled_custom_object_is_refused(tmp_path, tiny):
    path = tmp_path / "decoder.ckpt"
    torch.save({"state_dict": load_checkpoint(str(tiny.files["decoder"])), "hyper_parameters": Opaque()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*decoder\.ckpt.*never unpickled"):
        load_checkpoint(str(path))
    stats = tmp_path / "stats.th"
    torch.save((Opaque(), Opaque()), stats)
    with pytest.raises(CheckpointError, match="never unpickled"):
        load_clip_stats(str(stats))


def test_checkpoint_without_state_dict(tmp_path):
    path = tmp_path / "prior.ckpt"
    torch.save({"weights": {"model.prd_emb": torch.zeros(1, 1, 4)}}, path)
    with pytest.raises(CheckpointError, match=r"prior\.ckpt has no 'state_dict' entry \(found: \['weights'\]\)"):
        load_checkpoint(str(path))
    torch.save({"state_dict": {"model.prd_emb": torch.zeros(1), "model.step": 3}}, path)
    with pytest.raises(CheckpointError, match=r"not tensors: \['model.step'\]"):
        load_checkpoint(str(path))


def test_bad_clip_stats(tmp_path, tiny):
    path = tmp_path / "stats.th"
    torch.save({"mean": tiny.clip_mean}, path)
    with pytest.raises(CheckpointError, match=r"should hold \(clip_mean, clip_std\).*got dict"):
        load_clip_stats(str(path))
    sd = load_checkpoint(str(tiny.files["prior"]))
    with pytest.raises(CheckpointError, match=r"clip_mean has shape \(11,\), the prior predicts 12-d embeddings"):
        convert_prior(sd, tiny.clip_mean[:11], tiny.clip_std, num_heads=PRIOR_HEADS)


def test_unexpected_keys_are_listed_with_the_file(tmp_path, tiny):
    sd = load_checkpoint(str(tiny.files["prior"]))
    extra = {"model.ema.decay": torch.tensor(0.999), "model.transformer.resblocks.0.attn.rotary": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"2 unexpected keys.*\['model.ema.decay', "
                                              r"'model.transformer.resblocks.0.attn.rotary'\]"):
        convert_prior(sd | extra, tiny.clip_mean, tiny.clip_std, num_heads=PRIOR_HEADS)
    # Through load_original the message also names the file.
    sr = load_checkpoint(str(tiny.files["sr"]))
    path = save_checkpoint(tmp_path / "sr.ckpt", sr | {"model_first_steps.input_blocks.1.1.weight": torch.zeros(1)})
    message = re.escape(str(path)) + r": 1 unexpected keys.*'model_first_steps\.input_blocks\.1\.1\.weight'"
    with pytest.raises(CheckpointError, match=message):
        load_original(*(str(tiny.files[k]) for k in ("prior", "decoder")), str(path), str(tiny.files["stats"]),
                      prior_num_heads=PRIOR_HEADS, attention_head_dim=HEAD_DIM)


def test_missing_key_is_named(tiny):
    sd = load_checkpoint(str(tiny.files["decoder"]))
    del sd["model.output_blocks.3.0.emb_layers.1.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'model.output_blocks.3.0.emb_layers.1.bias'"):
        convert_decoder(sd, attention_head_dim=HEAD_DIM)


def test_wrong_shapes_are_named(tiny):
    sd = load_checkpoint(str(tiny.files["decoder"]))
    bad = sd | {"model.input_blocks.4.1.qkv.weight": sd["model.input_blocks.4.1.qkv.weight"][:-3]}
    with pytest.raises(CheckpointError, match=r"'model.input_blocks.4.1.qkv.weight' has shape \(93, 32, 1\), "
                                              r"expected \(96, 32, 1\)"):
        convert_decoder(bad, attention_head_dim=HEAD_DIM)
    with pytest.raises(CheckpointError, match=r"'model.input_blocks.4.1': 32 channels do not split into heads of 24"):
        convert_decoder(sd, attention_head_dim=24)
    prior = load_checkpoint(str(tiny.files["prior"]))
    with pytest.raises(CheckpointError, match=r"'model.transformer.resblocks.0': width 16 does not split into 3 heads"):
        convert_prior(prior, tiny.clip_mean, tiny.clip_std, num_heads=3)


def test_unreadable_unet_structure(tiny):
    # Without its last output block the SR net has no consistent level structure left.
    sd = {k: v for k, v in load_checkpoint(str(tiny.files["sr"])).items()
          if not k.startswith("model_last_step.output_blocks.3.")}
    with pytest.raises(CheckpointError, match=r"cannot read a UNet structure from 'model_last_step.': "
                                              r"4 input blocks, 3 output blocks"):
        convert_super_res(sd)
