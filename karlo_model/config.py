"""Typed configs for each Karlo component, read from and written to diffusers-format ``config.json`` files.

Each dataclass holds only what changes the network; diffusers keys that our networks implement at one fixed
value are checked (a checkpoint asking for something else is refused), and keys without effect at inference
(dropout) are ignored. The image processor's settings (``preprocessor_config.json``) are read here too, so that
every config of a repo has one home; the named presets are in karlo_model.presets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

DOWN_RESNET = "ResnetDownsampleBlock2D"
DOWN_CROSS_ATTN = "SimpleCrossAttnDownBlock2D"
UP_RESNET = "ResnetUpsampleBlock2D"
UP_CROSS_ATTN = "SimpleCrossAttnUpBlock2D"
MID_CROSS_ATTN = "UNetMidBlock2DSimpleCrossAttn"
MID_RESNET = "UNetMidBlock2D"


class ConfigError(ValueError):
    """A component config that our networks cannot represent."""


def _read(cls, data: Mapping[str, Any], *, name: str, fixed: Mapping[str, Any], ignored: set[str]) -> Any:
    """Build dataclass ``cls`` from a diffusers config dict, refusing values we do not implement."""
    own = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in own:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in fixed:
            allowed = fixed[key]
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if value not in allowed:
                raise ConfigError(f"{name}: {key}={value!r} is not supported (supported: {list(allowed)})")
        else:
            raise ConfigError(f"{name}: unknown config key {key!r}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{name}: {e}") from None


def _write(obj: Any, class_name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"_class_name": class_name}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class PriorConfig:
    """diffusers ``PriorTransformer`` as used by Karlo (diffusers ``models/transformers/prior_transformer.py``)."""

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4

    CLASS = "PriorTransformer"

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PriorConfig":
        cfg = _read(
            cls,
            data,
            name="prior",
            fixed={
                "time_embed_act_fn": "silu",
                "norm_in_type": (None,),
                "embedding_proj_norm_type": (None,),
                "encoder_hid_proj_type": "linear",
                "added_emb_type": "prd",
            },
            ignored={"dropout", "time_embed_dim", "embedding_proj_dim", "clip_embed_dim"},
        )
        # These three default to derived sizes; any other value would change the network.
        for key, expected in (
            ("time_embed_dim", cfg.inner_dim),
            ("embedding_proj_dim", cfg.embedding_dim),
            ("clip_embed_dim", cfg.embedding_dim),
        ):
            if data.get(key) not in (None, expected):
                raise ConfigError(f"prior: {key}={data[key]!r} is not supported (only {expected})")
        if cfg.additional_embeddings != 4:
            raise ConfigError("prior: additional_embeddings must be 4 (text embedding, time, latent, prd token)")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _write(self, self.CLASS)


@dataclass(frozen=True)
class TextProjConfig:
    """``UnCLIPTextProjModel`` (diffusers ``pipelines/unclip/text_proj.py``)."""

    clip_embeddings_dim: int = 768
    clip_extra_context_tokens: int = 4
    cross_attention_dim: int = 1536
    time_embed_dim: int = 1280

    CLASS = "UnCLIPTextProjModel"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TextProjConfig":
        return _read(cls, data, name="text_proj", fixed={}, ignored=set())

    def to_dict(self) -> dict[str, Any]:
        return _write(self, self.CLASS)


@dataclass(frozen=True)
class UNetConfig:
    """The decoder (``UNet2DConditionModel``) and super-res (``UNet2DModel``) UNets, as configured in
    kakaobrain/karlo-v1-alpha's ``decoder`` and ``super_res_*`` folders.

    Both share one skeleton: resnet blocks with optional added-KV cross attention per level.
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    sample_size: int | None = None
    layers_per_block: int = 3
    attention_head_dim: int | tuple[int, ...] = 64
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    cross_attention_dim: int | None = None
    class_embed_type: str | None = None
    mid_block_type: str = MID_RESNET
    add_attention: bool = False
    conditional: bool = False  # UNet2DConditionModel (decoder) vs UNet2DModel (super-res)

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ConfigError("unet: block_out_channels, down_block_types and up_block_types differ in length")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ConfigError(f"unet: resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not supported")
        for t in self.down_block_types:
            if t not in (DOWN_RESNET, DOWN_CROSS_ATTN):
                raise ConfigError(f"unet: down block type {t!r} is not supported")
        for t in self.up_block_types:
            if t not in (UP_RESNET, UP_CROSS_ATTN):
                raise ConfigError(f"unet: up block type {t!r} is not supported")
        if self.mid_block_type not in (MID_RESNET, MID_CROSS_ATTN):
            raise ConfigError(f"unet: mid block type {self.mid_block_type!r} is not supported")
        if self.add_attention and self.mid_block_type == MID_RESNET:
            raise ConfigError("unet: self-attention in the mid block is not supported")
        if self.uses_cross_attention and self.cross_attention_dim is None:
            raise ConfigError("unet: cross-attention blocks need cross_attention_dim")
        if self.class_embed_type not in (None, "identity"):
            raise ConfigError(f"unet: class_embed_type={self.class_embed_type!r} is not supported")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"unet: {c} channels are not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def uses_cross_attention(self) -> bool:
        return (
            DOWN_CROSS_ATTN in self.down_block_types
            or UP_CROSS_ATTN in self.up_block_types
            or self.mid_block_type == MID_CROSS_ATTN
        )

    def head_dim(self, level: int) -> int:
        """Per-head width at a level (diffusers names it attention_head_dim; an int or one per level)."""
        h = self.attention_head_dim
        return h if isinstance(h, int) else h[level]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        class_name = data.get("_class_name")
        if class_name not in ("UNet2DConditionModel", "UNet2DModel"):
            raise ConfigError(f"unet: _class_name {class_name!r} is not UNet2DConditionModel or UNet2DModel")
        conditional = class_name == "UNet2DConditionModel"
        fixed: dict[str, Any] = {
            "act_fn": "silu",
            "center_input_sample": False,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "mid_block_scale_factor": (1, 1.0),
            "downsample_padding": 1,  # unused: every down/up sampling is a resnet block here
            "time_embedding_type": "positional",
            "num_class_embeds": (None,),
            "upcast_attention": False,
            "use_linear_projection": False,
            "dual_cross_attention": False,
            "only_cross_attention": False,
            "encoder_hid_dim": (None,),
            "encoder_hid_dim_type": (None,),
            "addition_embed_type": (None,),
            "addition_time_embed_dim": (None,),
            "time_embedding_dim": (None,),
            "time_embedding_act_fn": (None,),
            "timestep_post_act": (None,),
            "time_cond_proj_dim": (None,),
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "projection_class_embeddings_input_dim": (None,),
            "class_embeddings_concat": False,
            "mid_block_only_cross_attention": (None, False),
            "cross_attention_norm": (None,),
            "resnet_skip_time_act": False,
            "resnet_out_scale_factor": (1, 1.0),
            "num_attention_heads": (None,),
            "transformer_layers_per_block": (1,),
            "reverse_transformer_layers_per_block": (None,),
            "attention_type": "default",
            "addition_embed_type_num_heads": (64,),
            "attn_norm_num_groups": (None,),
            "num_train_timesteps": (None,),
            # UNet2DModel: read only by AttnDown/UpBlock2D (not supported); our resnet blocks resample inside
            # themselves whatever the value, and diffusers writes its default "conv".
            "downsample_type": ("conv", "resnet"),
            "upsample_type": ("conv", "resnet"),
        }
        data = dict(data)
        if not conditional:
            data.setdefault("add_attention", True)
            if data.get("mid_block_type", MID_RESNET) != MID_RESNET:
                raise ConfigError("super-res: only UNetMidBlock2D is supported")
        cfg = _read(cls, data, name=class_name, fixed=fixed, ignored={"dropout"})
        return dataclasses.replace(cfg, conditional=conditional)

    def to_dict(self) -> dict[str, Any]:
        out = _write(self, "UNet2DConditionModel" if self.conditional else "UNet2DModel")
        del out["conditional"]
        if self.conditional:
            del out["add_attention"]
        else:
            for key in ("cross_attention_dim", "class_embed_type", "mid_block_type"):
                del out[key]
        return out


@dataclass(frozen=True)
class SchedulerConfig:
    """``UnCLIPScheduler`` (diffusers ``schedulers/scheduling_unclip.py``)."""

    variance_type: str = "fixed_small_log"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    num_train_timesteps: int = 1000
    # Not a diffusers key (diffusers ignores it): schedule coefficients in float64, cast to float32 where used, as
    # the original Karlo sampler (guided-diffusion's numpy tables) computes them. False: float32, as diffusers.
    float64_tables: bool = False

    CLASS = "UnCLIPScheduler"

    def __post_init__(self) -> None:
        if self.variance_type not in ("fixed_small_log", "learned_range"):
            raise ConfigError(f"scheduler: variance_type={self.variance_type!r} is not supported")
        if self.prediction_type not in ("epsilon", "sample"):
            raise ConfigError(f"scheduler: prediction_type={self.prediction_type!r} is not supported")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SchedulerConfig":
        cfg = _read(cls, data, name="scheduler", fixed={"beta_schedule": "squaredcos_cap_v2"}, ignored=set())
        if not isinstance(cfg.float64_tables, bool):
            raise ConfigError(f"scheduler: float64_tables must be true or false, got {cfg.float64_tables!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = _write(self, self.CLASS)
        if not self.float64_tables:
            del out["float64_tables"]  # diffusers-format files stay as diffusers writes them
        return out


# The real CLIP ViT-L/14 text tower (kakaobrain/karlo-v1-alpha's text_encoder/config.json). Kept as a plain dict:
# transformers' CLIPTextConfig owns it.
TEXT_ENCODER_L14: dict[str, Any] = {
    "architectures": ["CLIPTextModelWithProjection"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,  # selects transformers' legacy argmax(input_ids) pooling, i.e. the EOT token
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value preprocessor configs store

# Keys of a preprocessor_config.json that only name the class or carry our fixed behaviour.
_PROCESSOR_NAME_KEYS = ("image_processor_type", "feature_extractor_type", "processor_class", "_processor_class")
_PROCESSOR_FIXED = {"do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
          "do_convert_rgb": (True, None), "resample": BICUBIC}


@dataclass(frozen=True)
class ImageProcessorConfig:
    """``CLIPImageProcessor`` settings (``feature_extractor/preprocessor_config.json``)."""

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    CLASS = "CLIPImageProcessor"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageProcessorConfig":
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in _PROCESSOR_NAME_KEYS:
                continue
            if key in _PROCESSOR_FIXED:
                fixed = _PROCESSOR_FIXED[key]
                allowed = fixed if isinstance(fixed, tuple) else (fixed,)
                if value not in allowed:
                    raise ConfigError(
                        f"feature_extractor: {key}={value!r} is not supported (supported: {list(allowed)})"
                    )
            elif key == "size":
                # Older configs store an int, which CLIPImageProcessor reads as the shortest edge.
                edge = value if isinstance(value, int) else dict(value).get("shortest_edge")
                if not isinstance(edge, int) or (isinstance(value, dict) and set(value) != {"shortest_edge"}):
                    raise ConfigError(f"feature_extractor: size={value!r} is not supported (only shortest_edge)")
                kwargs["shortest_edge"] = edge
            elif key == "crop_size":
                crop = (value, value) if isinstance(value, int) else (value.get("height"), value.get("width"))
                if not all(isinstance(c, int) for c in crop):
                    raise ConfigError(f"feature_extractor: crop_size={value!r} needs an int height and width")
                kwargs["crop_size"] = crop
            elif key in ("rescale_factor", "image_mean", "image_std"):
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise ConfigError(f"feature_extractor: unknown config key {key!r}")
        cfg = cls(**kwargs)
        if len(cfg.image_mean) != 3 or len(cfg.image_std) != 3:
            raise ConfigError("feature_extractor: image_mean and image_std need one value per RGB channel")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The file as transformers' ``CLIPImageProcessor.save_pretrained`` writes it."""
        height, width = self.crop_size
        return {
            "image_processor_type": self.CLASS,
            "crop_size": {"height": height, "width": width},
            "size": {"shortest_edge": self.shortest_edge},
            "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
            "do_resize": True, "resample": BICUBIC,
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


@dataclass(frozen=True)
class KarloConfig:
    """Every component of a Karlo model: text-to-image (with a prior), or image variations (kakaobrain's
    karlo-v1-alpha-image-variations: no prior, a CLIP image encoder and its image processor instead)."""

    text_encoder: dict[str, Any]
    prior: PriorConfig | None
    text_proj: TextProjConfig
    decoder: UNetConfig
    super_res_first: UNetConfig
    super_res_last: UNetConfig
    prior_scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig("fixed_small_log", "sample", True, 5.0)
    )
    decoder_scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig("learned_range", "epsilon", True, 1.0)
    )
    super_res_scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig("fixed_small_log", "epsilon", True, 1.0)
    )
    image_encoder: dict[str, Any] | None = None  # transformers' CLIPVisionConfig, as a dict like text_encoder
    feature_extractor: ImageProcessorConfig | None = None

    def __post_init__(self) -> None:
        d = self.text_encoder["projection_dim"]
        hidden = self.text_encoder["hidden_size"]
        checks = [
            (self.prior is None or self.prior.embedding_dim == d,
             "text_encoder.projection_dim must equal prior.embedding_dim"),
            (hidden == d, "text_encoder.hidden_size must equal its projection_dim (the prior and text_proj project "
                          "both)"),
            (self.text_proj.clip_embeddings_dim == d,
             "text_proj.clip_embeddings_dim must equal text_encoder.projection_dim"),
            ((self.image_encoder is None) == (self.feature_extractor is None),
             "image_encoder and feature_extractor come together"),
            (self.image_encoder is None or self.image_encoder.get("projection_dim") == d,
             "image_encoder.projection_dim must equal text_encoder.projection_dim (one CLIP embedding space)"),
            (self.prior is not None or self.image_encoder is not None,
             "a model needs a prior (text-to-image) or an image encoder (image variations)"),
            (
                self.text_proj.cross_attention_dim == self.decoder.cross_attention_dim,
                "text_proj.cross_attention_dim must equal decoder.cross_attention_dim",
            ),
            (
                self.text_proj.time_embed_dim == 4 * self.decoder.block_out_channels[0],
                "text_proj.time_embed_dim must equal 4 x decoder.block_out_channels[0]",
            ),
            (self.decoder.conditional and self.decoder.class_embed_type == "identity", "decoder must be a "
             "UNet2DConditionModel with class_embed_type 'identity'"),
            (self.decoder.out_channels == 2 * self.decoder.in_channels, "decoder must predict noise and variance"),
            (
                self.super_res_first.in_channels == 2 * self.decoder.in_channels,
                "super_res in_channels must be twice the image channels (noisy image + upsampled image)",
            ),
            (self.super_res_first.sample_size is not None, "super_res_first.sample_size gives the output size"),
            (self.decoder.sample_size is not None, "decoder.sample_size gives the 64px image size"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def image_size(self) -> int:
        return int(self.super_res_first.sample_size)  # super_res_last.sample_size is null on the hub
