"""diffusers' UnCLIPPipeline on tiny random weights, as the reference for parity tests (and the thread fixture).

The components are built with diffusers' and transformers' own classes and their own (seeded) initialisation, in
the shapes of one of our tiny presets, and written with ``save_pretrained``. The configs, model_index.json and
weight files are therefore exactly what diffusers writes; our loader has to read them as they are.

diffusers initialises some parameters to constants (``clip_std`` and ``clip_mean`` to zeros, which makes every
image embedding zero; positional and prd embeddings; norm biases; the guidance stand-in embedding). Those are
re-drawn at random before saving so that a mistake in the parts they feed cannot hide behind a zero.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from karlo_model.config import KarloConfig, UNetConfig
from karlo_model.presets import preset
from karlo_model.text import write_clip_vocabulary


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread while a module runs: tiny networks gain nothing from more, and on a busy 2-core
    machine OpenMP's spinning threads make them tens of times slower. Import it into a test module to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Karlo's three scheduler configs, as in the hub repo's prior_scheduler, decoder_scheduler and super_res_scheduler.
KARLO_SCHEDULERS = {
    "prior_scheduler": dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                            clip_sample_range=5.0, num_train_timesteps=1000),
    "decoder_scheduler": dict(variance_type="learned_range", prediction_type="epsilon", clip_sample=True,
                              clip_sample_range=1.0, num_train_timesteps=1000),
    "super_res_scheduler": dict(variance_type="fixed_small_log", prediction_type="epsilon", clip_sample=True,
                                clip_sample_range=1.0, num_train_timesteps=1000),
}

# Karlo's block layout (the hub's decoder and super_res configs); only the sizes come from our presets.
_DECODER_DOWN = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
_DECODER_UP = ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")


def _decoder(cfg: UNetConfig) -> UNet2DConditionModel:
    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=3,
        out_channels=6,
        down_block_types=(_DECODER_DOWN[0],) + (_DECODER_DOWN[1],) * (n - 1),
        up_block_types=(_DECODER_UP[0],) * (n - 1) + (_DECODER_UP[1],),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.cross_attention_dim,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )


def _super_res(cfg: UNetConfig) -> UNet2DModel:
    n = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=cfg.sample_size,
        in_channels=6,
        out_channels=3,
        down_block_types=("ResnetDownsampleBlock2D",) * n,
        up_block_types=("ResnetUpsampleBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        add_attention=False,
        resnet_time_scale_shift="default",
    )


def _text_encoder(config: dict) -> CLIPTextModelWithProjection:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "hidden_size", "projection_dim", "intermediate_size",
            "num_attention_heads", "num_hidden_layers", "vocab_size", "max_position_embeddings", "hidden_act",
            "layer_norm_eps")
    return CLIPTextModelWithProjection(CLIPTextConfig(**{k: config[k] for k in keys}))


@torch.no_grad()
def _redraw_constants(modules: list[torch.nn.Module], generator: torch.Generator) -> None:
    """Parameters that the library initialised to one constant get constant + N(0, 0.1²); clip_std gets [1, 1.5)."""
    for module in modules:
        for name, p in module.named_parameters():
            if p.numel() and bool(p.min() == p.max()):
                if name.endswith("clip_std"):
                    p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=generator))
                else:
                    p.add_(0.1 * torch.randn(p.shape, generator=generator))


def build_pipeline(preset_name: str, seed: int, work_dir: Path) -> UnCLIPPipeline:
    """A diffusers UnCLIPPipeline in the shapes of ``preset(preset_name)``, with diffusers' own seeded init."""
    cfg: KarloConfig = preset(preset_name)
    write_clip_vocabulary(work_dir / "vocabulary")
    tokenizer = CLIPTokenizer.from_pretrained(str(work_dir / "vocabulary"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = _text_encoder(cfg.text_encoder)
        prior = PriorTransformer(
            num_attention_heads=cfg.prior.num_attention_heads,
            attention_head_dim=cfg.prior.attention_head_dim,
            num_layers=cfg.prior.num_layers,
            embedding_dim=cfg.prior.embedding_dim,
        )
        text_proj = UnCLIPTextProjModel(
            clip_extra_context_tokens=cfg.text_proj.clip_extra_context_tokens,
            clip_embeddings_dim=cfg.text_proj.clip_embeddings_dim,
            time_embed_dim=cfg.text_proj.time_embed_dim,
            cross_attention_dim=cfg.text_proj.cross_attention_dim,
        )
        decoder = _decoder(cfg.decoder)
        super_res_first = _super_res(cfg.super_res_first)
        super_res_last = _super_res(cfg.super_res_last)
    modules = [text_encoder, prior, text_proj, decoder, super_res_first, super_res_last]
    _redraw_constants(modules, torch.Generator().manual_seed(seed + 1))
    schedulers = {name: UnCLIPScheduler(**kw) for name, kw in KARLO_SCHEDULERS.items()}
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer, text_proj=text_proj,
        super_res_first=super_res_first, super_res_last=super_res_last, **schedulers,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(preset_name: str, seed: int, work_dir: Path) -> Path:
    """Build and ``save_pretrained`` a pipeline; returns the repo folder."""
    repo = work_dir / "repo"
    build_pipeline(preset_name, seed, work_dir).save_pretrained(str(repo))
    return repo


def load_pipeline(repo: Path) -> UnCLIPPipeline:
    """Load a saved UnCLIPPipeline component by component (diffusers 0.42's ``from_pretrained`` cannot resolve
    the text_proj entry of model_index.json)."""
    r = str(repo)
    pipe = UnCLIPPipeline(
        prior=PriorTransformer.from_pretrained(r, subfolder="prior"),
        decoder=UNet2DConditionModel.from_pretrained(r, subfolder="decoder"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(r, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(r, subfolder="tokenizer"),
        text_proj=UnCLIPTextProjModel.from_pretrained(r, subfolder="text_proj"),
        super_res_first=UNet2DModel.from_pretrained(r, subfolder="super_res_first"),
        super_res_last=UNet2DModel.from_pretrained(r, subfolder="super_res_last"),
        **{name: UnCLIPScheduler.from_pretrained(r, subfolder=name) for name in KARLO_SCHEDULERS},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
