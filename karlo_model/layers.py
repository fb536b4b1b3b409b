"""Building blocks shared by the prior and the UNets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of original-scale timesteps (DDPM/ADM; diffusers ``Timesteps`` with
    flip_sin_to_cos=True, downscale_freq_shift=0). t: (B,) -> (B, dim) float32."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """linear -> SiLU -> linear on the sinusoidal embedding."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)"""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d)"""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean keep-mask -> additive attention bias, with -10000 as in diffusers (the original uses -inf; both
    give zero weight after softmax in float32)."""
    return (1 - mask.to(dtype)) * -10000.0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention with an additive bias; PyTorch picks the fused kernel for the device.
    q: (B, H, Tq, d), k/v: (B, H, Tk, d), bias broadcastable to (B, H, Tq, Tk)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
