"""Image-to-image: the decoder's chain started from an existing image instead of pure noise.

SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations")
as diffusers' img2img pipelines run it: with ``strength`` s in (0, 1], the last ``floor(s * steps)`` steps (at
least one) of the respaced chain run, from the init image x0 noised in closed form to the timestep t where they
begin, q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I). The noise eps is the row's own draw, the one plain
text-to-image starts from, so strength 1 runs the whole chain from eps itself: exactly text-to-image.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .sampling import per_row
from .scheduler import UnCLIPSchedule


def steps_run(strength: float, steps: int) -> int:
    """How many of the chain's ``steps`` steps a row of ``strength`` runs: diffusers' ``int(steps * strength)``
    (with a tolerance for products such as 0.29 * 100 = 28.999999999999996), at least one."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(1, min(steps, math.floor(steps * strength + 1e-9)))


def start_steps(strength: Sequence[float], steps: int) -> list[int]:
    """(B,) strengths -> the index in the chain of ``steps`` timesteps where each row starts (0 = all steps)."""
    return [steps - steps_run(float(s), steps) for s in strength]


def init_image_tensor(images: Sequence[np.ndarray | None], size: int) -> torch.Tensor:
    """(H, W, 3) uint8 RGB images of any sizes (None for rows without one) -> (B, 3, size, size) float32 in
    [-1, 1]: the shorter side resized to ``size`` (bicubic, antialiased), then the centre cropped, so the
    composition is kept; zeros for None."""
    out = torch.zeros(len(images), 3, size, size)
    for i, image in enumerate(images):
        if image is None:
            continue
        # A copy: images decoded by Pillow are often read-only arrays, which torch warns about sharing.
        x = torch.tensor(image).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W)
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        out[i] = x[0, :, top:top + size, left:left + size].clamp(-1, 1)
    return out


def init_batch(
    images: Sequence[np.ndarray | None] | None, strength: float | Sequence[float] | None, size: int
) -> tuple[torch.Tensor | None, list[float] | None]:
    """A batch's init images (None for a row without one) -> ((B, 3, size, size) in [-1, 1], (B,) strengths with 1
    where there is no image), or (None, None) when no row has an image: plain text-to-image."""
    if images is None or all(image is None for image in images):
        return None, None
    values = per_row(1.0 if strength is None else strength, len(images), "strength").tolist()
    return init_image_tensor(images, size), [s if image is not None else 1.0 for s, image in zip(values, images)]


def noised_start(
    schedule: UnCLIPSchedule,
    steps: int,
    x0: torch.Tensor,  # (B, C, h, w) init images in [-1, 1]
    noise: torch.Tensor,  # (B, C, h, w) each row's draw of the chain's starting noise
    start: Sequence[int],  # (B,) from start_steps
) -> torch.Tensor:
    """The chain's starting latents: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at each row's first timestep t, and
    eps unchanged (bit for bit) for rows that run the whole chain."""
    timesteps = schedule.timesteps(steps)
    x = noise.clone()
    for i, s in enumerate(start):
        if s == 0:
            continue
        abar = schedule.alphas_cumprod[timesteps[s]]
        x[i] = abar.sqrt().to(noise.dtype) * x0[i].to(noise) + (1 - abar).sqrt().to(noise.dtype) * noise[i]
    return x
