"""Sampling loops for the prior, the decoder and the super-resolution networks (reference §4).

A loop takes a denoiser ``fn(x, t) -> model output``, a schedule and the rows' generators; classifier-free
guidance is a wrapper that keeps that signature. Guidance scales are per row, (B,) tensors, so rows with
different settings share a batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .noise import draw_noise
from .scheduler import UnCLIPSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_loop(
    fn: Denoiser,
    schedule: UnCLIPSchedule,
    steps: int,
    shape: Sequence[int],  # per-row shape of x
    generators: Sequence[torch.Generator],
    dtype: torch.dtype,
    device: torch.device,
    *,
    pick: Callable[[int], Denoiser] | None = None,  # per-step denoiser choice (super-res switches at the end)
) -> torch.Tensor:
    """Ancestral DDPM sampling on the respaced chain, starting from N(0, I) drawn per row."""
    x = draw_noise(generators, shape, dtype, device)  # init_noise_sigma is 1
    timesteps = schedule.timesteps(steps)
    # One copy of the whole chain: a scalar tensor made on a GPU every step would wait for the queued work.
    on_device = torch.tensor(timesteps, device=device)
    for i, t in enumerate(timesteps):
        step_fn = pick(i) if pick is not None else fn
        out = step_fn(x, on_device[i])
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
        x = schedule.step(out, t, prev_t, x, generators)
    return x


def guided(
    uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor, enabled: torch.Tensor
) -> torch.Tensor:
    """u + s (c - u) on rows with guidance enabled, c elsewhere. scale/enabled: (B,)."""
    view = (-1,) + (1,) * (cond.dim() - 1)
    return torch.where(enabled.view(view), uncond + scale.view(view).to(cond.dtype) * (cond - uncond), cond)


def cfg_denoiser(
    model: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    scale: torch.Tensor,
    enabled: torch.Tensor,
    guided_channels: int | None = None,
) -> Denoiser:
    """Classifier-free guidance around ``model(x, t, **conditioning)``: one batched call on [uncond; cond].

    With ``guided_channels`` only the first channels (the noise) are guided; the rest (the learned variance)
    come from the conditional half.
    """
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u, c = model(torch.cat([x, x]), t, **both).chunk(2)
        if guided_channels is None:
            return guided(u, c, scale, enabled)
        n = guided_channels
        return torch.cat([guided(u[:, :n], c[:, :n], scale, enabled), c[:, n:]], dim=1)

    return fn


def upsample(image: torch.Tensor, size: int) -> torch.Tensor:
    """64 px -> size px, bicubic with antialiasing (reference §4 step 6); not clamped afterwards."""
    return F.interpolate(image, size=[size, size], mode="bicubic", align_corners=False, antialias=True)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding to nearest."""
    img = (x * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    return (img * 255).round().to(torch.uint8)
