"""Named configs: ``karlo-v1-alpha`` (the shapes of kakaobrain/karlo-v1-alpha on the hub), ``small`` (the
shapes of the model that karlo_model.small trains on its synthetic world) and two tiny random-weight configs for
tests."""

from __future__ import annotations

import dataclasses
from typing import Any

from .clip_vision import tiny_vision_config
from .config import (
    DOWN_CROSS_ATTN,
    DOWN_RESNET,
    MID_CROSS_ATTN,
    TEXT_ENCODER_L14,
    UP_CROSS_ATTN,
    UP_RESNET,
    ConfigError,
    ImageProcessorConfig,
    KarloConfig,
    PriorConfig,
    TextProjConfig,
    UNetConfig,
)


def _unet(conditional: bool, channels: tuple[int, ...], **kw: Any) -> UNetConfig:
    n = len(channels)
    if conditional:
        return UNetConfig(
            in_channels=3,
            out_channels=6,
            block_out_channels=channels,
            down_block_types=(DOWN_RESNET,) + (DOWN_CROSS_ATTN,) * (n - 1),
            up_block_types=(UP_CROSS_ATTN,) * (n - 1) + (UP_RESNET,),
            mid_block_type=MID_CROSS_ATTN,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
            conditional=True,
            **kw,
        )
    return UNetConfig(
        in_channels=6,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=(DOWN_RESNET,) * n,
        up_block_types=(UP_RESNET,) * n,
        **kw,
    )


def _karlo_v1_alpha() -> KarloConfig:
    sr = dict(layers_per_block=3, attention_head_dim=8)
    return KarloConfig(
        text_encoder=dict(TEXT_ENCODER_L14),
        prior=PriorConfig(),
        text_proj=TextProjConfig(),
        decoder=_unet(
            True, (320, 640, 960, 1280), sample_size=64, layers_per_block=3, attention_head_dim=64,
            cross_attention_dim=1536,
        ),
        super_res_first=_unet(False, (320, 640, 960, 1280), sample_size=256, **sr),
        super_res_last=_unet(False, (320, 640, 960, 1280), sample_size=None, **sr),
    )


def _tiny_text(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    return dict(
        TEXT_ENCODER_L14,
        hidden_size=hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
    )


def _tiny() -> KarloConfig:
    """The embedded default: real vocabulary and image sizes (64 -> 256 px), a few thousand times smaller."""
    return KarloConfig(
        text_encoder=_tiny_text(32, 2, 4, 37),
        prior=PriorConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=32),
        text_proj=TextProjConfig(clip_embeddings_dim=32, cross_attention_dim=48, time_embed_dim=64),
        decoder=_unet(
            True, (16, 32), sample_size=64, layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
            cross_attention_dim=48,
        ),
        super_res_first=_unet(False, (8, 16), sample_size=256, layers_per_block=1, norm_num_groups=4),
        super_res_last=_unet(False, (8, 16), sample_size=None, layers_per_block=1, norm_num_groups=4),
    )


def _tiny_alt() -> KarloConfig:
    """A second tiny config that differs from ``tiny`` in every dimension (widths, heads, levels, layers per
    block, norm groups, resolutions), so tests cannot pass by a shape coincidence."""
    return KarloConfig(
        text_encoder=_tiny_text(24, 3, 2, 40),
        prior=PriorConfig(num_attention_heads=3, attention_head_dim=8, num_layers=3, embedding_dim=24),
        text_proj=TextProjConfig(clip_embeddings_dim=24, cross_attention_dim=40, time_embed_dim=96),
        decoder=_unet(
            True, (24, 36, 48), sample_size=32, layers_per_block=2, attention_head_dim=12, norm_num_groups=6,
            cross_attention_dim=40,
        ),
        super_res_first=_unet(False, (12, 18, 24), sample_size=64, layers_per_block=2, norm_num_groups=3),
        super_res_last=_unet(False, (12, 18, 24), sample_size=None, layers_per_block=2, norm_num_groups=3),
    )


# The small model's CLIP vision tower (transformers' CLIPVisionConfig): 8 px patches of a 64 px input, the
# resolution at which the synthetic world's shapes are still told apart.
SMALL_VISION: dict[str, Any] = {
    **tiny_vision_config(64, image_size=64),
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "patch_size": 8,
}
SMALL_IMAGE_PROCESSOR = ImageProcessorConfig(shortest_edge=64, crop_size=(64, 64))


def _small() -> KarloConfig:
    """The model karlo_model.small trains: 64-wide CLIP on the real vocabulary, 64 -> 256 px, with
    the decoder's cross-attention on its two coarsest levels and in the middle, as the real decoder has it on
    every level but the finest."""
    decoder = dataclasses.replace(
        _unet(True, (16, 32, 64, 128), sample_size=64, layers_per_block=1, attention_head_dim=32,
              norm_num_groups=8, cross_attention_dim=64),
        down_block_types=(DOWN_RESNET,) * 2 + (DOWN_CROSS_ATTN,) * 2,
        up_block_types=(UP_CROSS_ATTN,) * 2 + (UP_RESNET,) * 2,
    )
    sr = dict(layers_per_block=1, norm_num_groups=8)
    return KarloConfig(
        text_encoder=_tiny_text(64, 3, 4, 128),
        prior=PriorConfig(num_attention_heads=4, attention_head_dim=32, num_layers=4, embedding_dim=64),
        text_proj=TextProjConfig(clip_embeddings_dim=64, cross_attention_dim=64, time_embed_dim=64),
        decoder=decoder,
        super_res_first=_unet(False, (16, 32, 64), sample_size=256, **sr),
        super_res_last=_unet(False, (16, 32, 64), sample_size=None, **sr),
    )


PRESETS = {"karlo-v1-alpha": _karlo_v1_alpha, "small": _small, "tiny": _tiny, "tiny-alt": _tiny_alt}


def preset(name: str) -> KarloConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
