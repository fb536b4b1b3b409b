"""CLIP vision side: the reference image processor in torch, and transformers' vision tower with projection.

The image processor reproduces transformers' ``CLIPImageProcessor`` as configured for Karlo's image-variations repo
(kakaobrain/karlo-v1-alpha-image-variations: shortest side to 224 with bicubic resampling, center crop 224, rescale
by 1/255, normalise with OpenAI CLIP's mean and std) on uint8 arrays, batched and on any device. Its resize is Pillow's
antialiased bicubic resampling to the bit, not torch's ``interpolate``: the two use different cubic kernels
(a = -0.5 vs -0.75) and Pillow rounds to uint8 after each pass, which on noisy images moves pixels by up to 20
levels. Pillow is what the reference processor uses (the torchvision backend of recent transformers is an
optional install), so the embeddings here are the reference's whatever is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # imported where used, as in karlo_model.text
    from transformers import CLIPVisionModelWithProjection

from .config import ImageProcessorConfig
from .weights import load_into, load_state_dict

# Published checkpoints carry this buffer, which transformers no longer keeps in the state dict.
_NON_WEIGHT_KEYS = ("vision_model.embeddings.position_ids",)
# The text half of a whole CLIPModel checkpoint.
_CLIP_TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale")
# Pillow's fixed-point resampling (libImaging/Resample.c): coefficients scaled by 2^22, uint8 after each pass.
_PRECISION_BITS = 32 - 8 - 2


def resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side at ``shortest_edge``, the longer one scaled and truncated
    (transformers' ``get_resize_output_image_size`` with ``default_to_square=False``)."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _pil_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) integer resampling weights of one axis, Pillow's ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc``: the kernel stretched by the downscale factor, each row normalised, then
    rounded half away from zero to 22 fractional bits."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = _bicubic((np.arange(lo, hi) - center + 0.5) / filter_scale)
        total = w.sum()
        weights[i, lo:hi] = w / total if total != 0.0 else w
    return np.trunc(weights * (1 << _PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))


def _resample(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One Pillow pass along the last axis of x (..., in) with integer weights (out, in) -> (..., out) uint8
    values. float64 holds every sum exactly (|sum| < 255 * 2^22 * taps < 2^53), so floor and clamp give
    Pillow's arithmetic shift and clip to the bit."""
    acc = x @ weights.T + (1 << (_PRECISION_BITS - 1))
    return torch.floor(acc / (1 << _PRECISION_BITS)).clamp_(0, 255)


def resize_like_pil(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, H, W) uint8 -> (B, C, height, width) uint8 values as float64, equal to ``PIL.Image.resize(
    (width, height), BICUBIC)`` of each image: horizontal pass first, rounded to uint8, then vertical."""
    x = images.to(torch.float64)
    in_h, in_w = x.shape[-2:]
    opts = dict(dtype=torch.float64, device=x.device)
    if width != in_w:
        x = _resample(x, torch.as_tensor(_pil_weights(in_w, width), **opts))
    if height != in_h:
        x = _resample(x.transpose(-1, -2), torch.as_tensor(_pil_weights(in_h, height), **opts)).transpose(-1, -2)
    return x


def preprocess(images: Sequence[np.ndarray], cfg: ImageProcessorConfig, device: torch.device | str) -> torch.Tensor:
    """(H, W, 3) uint8 RGB images (any sizes) -> (B, 3, crop_h, crop_w) float32 pixel values, the output of
    ``CLIPImageProcessor(images)``. Images of one size are processed as one batch."""
    crop_h, crop_w = cfg.crop_size
    out = torch.empty((len(images), 3, crop_h, crop_w), dtype=torch.float32, device=device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected (H, W, 3) uint8 RGB images, got {image.shape} {image.dtype}")
        by_shape.setdefault(image.shape, []).append(i)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    for (h, w, _), rows in by_shape.items():
        batch = torch.from_numpy(np.stack([images[i] for i in rows])).to(device).permute(0, 3, 1, 2)  # (b, 3, h, w)
        new_h, new_w = resized_shape(h, w, cfg.shortest_edge)
        x = resize_like_pil(batch, new_h, new_w)
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2  # transformers' center_crop: floor
        if top < 0 or left < 0:
            raise ValueError(f"an image resized to {new_h}x{new_w} is smaller than the {crop_h}x{crop_w} crop")
        x = x[..., top : top + crop_h, left : left + crop_w]
        # transformers' arithmetic to the bit: rescale in float64, cast, normalise in float32. Guidance amplifies
        # a last-bit difference in the embedding into visible pixel differences.
        out[rows] = ((x * cfg.rescale_factor).to(torch.float32) - mean) / std
    return out


def build_vision_encoder(config: Mapping[str, Any]) -> CLIPVisionModelWithProjection:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    return CLIPVisionModelWithProjection(cfg).eval()


def load_vision_encoder(config: Mapping[str, Any], folder: Path) -> CLIPVisionModelWithProjection:
    """A vision tower with the weights in ``folder``: a CLIPVisionModelWithProjection checkpoint, or a whole
    CLIPModel's (openai/clip-vit-large-patch14), whose text tower is left out."""
    encoder = build_vision_encoder(config)
    state, source = load_state_dict(folder)
    if any(k.startswith(_CLIP_TEXT_PREFIXES) for k in state):
        state = {k: v for k, v in state.items() if not k.startswith(_CLIP_TEXT_PREFIXES)}
    load_into(encoder, {k: v for k, v in state.items() if k not in _NON_WEIGHT_KEYS}, source)
    return encoder


def projection_dim(config: Mapping[str, Any]) -> int:
    """Width of the projected image embedding of a vision tower config (transformers' default: 512)."""
    from transformers import CLIPVisionConfig

    return int(config.get("projection_dim", CLIPVisionConfig().projection_dim))


@torch.no_grad()
def encode(
    encoder: CLIPVisionModelWithProjection, cfg: ImageProcessorConfig, images: Sequence[np.ndarray],
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """(H, W, 3) uint8 images -> (B, P) projected image embeddings, not normalised (``image_embeds``)."""
    pixels = preprocess(images, cfg, device).to(dtype)  # (B, 3, 224, 224)
    return encoder(pixel_values=pixels).image_embeds


def tiny_vision_config(projection: int, *, image_size: int = 224) -> dict[str, Any]:
    """A tiny CLIPVisionModelWithProjection in a given embedding width: 32 px patches of the real 224 px input."""
    return {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_act": "quick_gelu",
        "hidden_size": 32,
        "image_size": image_size,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-5,
        "num_attention_heads": 4,
        "num_channels": 3,
        "num_hidden_layers": 2,
        "patch_size": 32,
        "projection_dim": projection,
    }
