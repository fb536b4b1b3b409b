"""The sampling loop of the prior, the decoder and the super-resolution networks, and its wrappers.

As in k-diffusion's ``sampling.py``, the loop takes a denoiser ``fn(x, t) -> model output``, the schedule, the
starting noise ``x`` (drawn by the caller, or injected as diffusers' ``prior_latents``/``decoder_latents``/
``super_res_latents``) and the rows' generators for the per-step noise. Classifier-free guidance is a wrapper
that keeps the denoiser's signature. Guidance scales are per row, (B,) tensors, so rows with different settings
share a batch. The chain is that of diffusers' ``UnCLIPPipeline.__call__``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .scheduler import UnCLIPSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_loop(
    fn: Denoiser,
    schedule: UnCLIPSchedule,
    x: torch.Tensor,  # (B, ...) the starting latents: x_T, or each row's x_t at its start (image-to-image)
    generators: Sequence[torch.Generator],  # one per row, for the noise of each step
    steps: int,
    *,
    pick: Callable[[int], Denoiser] | None = None,  # per-step denoiser choice (super-res switches at the end)
    start: Sequence[int] | None = None,  # (B,) the step each row starts at (karlo_model.img2img); None: all 0
) -> torch.Tensor:
    """Ancestral DDPM sampling on the respaced chain of ``steps`` steps, from ``x``. -> x_0, shaped as ``x``.

    With ``start``, row j takes only the steps from ``start[j]`` on: the network runs from the earliest start,
    and a step updates (and draws the noise of) the rows that have begun, so each row's chain and generator
    advance exactly as they would alone."""
    timesteps = schedule.timesteps(steps)
    first = 0 if start is None else min(start)
    # One copy of the whole chain: a scalar tensor made on a GPU every step would wait for the queued work.
    on_device = torch.tensor(timesteps, device=x.device)
    for i in range(first, len(timesteps)):
        t = timesteps[i]
        step_fn = pick(i) if pick is not None else fn
        out = step_fn(x, on_device[i])
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
        if start is None or all(s <= i for s in start):
            x = schedule.step(out, t, prev_t, x, generators)
        else:
            begun = [j for j, s in enumerate(start) if s <= i]
            rows = torch.tensor(begun, device=x.device)
            x = x.index_copy(0, rows, schedule.step(out[rows], t, prev_t, x[rows], [generators[j] for j in begun]))
    return x


def per_row(value: float | Sequence[float], n: int, name: str) -> torch.Tensor:
    """A scalar or one value per row -> (n,) float32."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        return t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"{name}: expected 1 or {n} values, got {t.numel()}")
    return t


@dataclass
class Guidance:
    """Per-row guidance scales. As in diffusers, classifier-free guidance runs for a row when either scale is
    above 1, and then applies to both stages with that row's scales."""

    prior: torch.Tensor  # (B,)
    decoder: torch.Tensor  # (B,)

    @classmethod
    def of(cls, prior: float | Sequence[float], decoder: float | Sequence[float], n: int) -> "Guidance":
        return cls(per_row(prior, n, "prior_guidance_scale"), per_row(decoder, n, "decoder_guidance_scale"))

    @property
    def enabled(self) -> torch.Tensor:  # (B,) bool
        return (self.prior > 1.0) | (self.decoder > 1.0)


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
    """64 px -> size px, bicubic with antialiasing (diffusers ``UnCLIPPipeline``); not clamped
    afterwards."""
    return F.interpolate(image, size=[size, size], mode="bicubic", align_corners=False, antialias=True)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding to nearest."""
    img = (x * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    return (img * 255).round().to(torch.uint8)
