"""UNet of the 64 px decoder and of the two 64->256 super-resolution networks: diffusers' ``UNet2DConditionModel``
and ``UNet2DModel`` as the hub's ``decoder``, ``super_res_first`` and ``super_res_last`` configs build them.

One skeleton serves both: resnet blocks (optionally scale-shift conditioned, optionally up/down sampling
inside the block) and added-KV cross-attention on the levels that have it. Module names follow diffusers'
UNet2DConditionModel / UNet2DModel so the hub checkpoints load with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DOWN_CROSS_ATTN, MID_CROSS_ATTN, UP_CROSS_ATTN, UNetConfig
from .layers import TimestepEmbedding, attention, mask_to_bias, merge_heads, split_heads, timestep_embedding


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a time-embedding injection; ``sample`` resamples inside the block."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, temb: int, sample: str | None = None):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
        self.sample = sample  # None, "up" or "down"
        self.norm1 = nn.GroupNorm(g, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, 2 * cout if self.scale_shift else cout)
        self.norm2 = nn.GroupNorm(g, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.sample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.norm1(x)))
        x = self._resample(x)
        h = self.conv1(h)
        t = self.time_emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(F.silu(h))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class CrossAttention(nn.Module):
    """Self-attention over pixels whose keys/values are prefixed with projected text tokens ("added KV")."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, groups: int):
        super().__init__()
        self.heads = channels // head_dim
        inner = self.heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.add_k_proj = nn.Linear(context_dim, inner)
        self.add_v_proj = nn.Linear(context_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])  # diffusers key "to_out.0"

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape  # context: (B, T, Cc); bias: (B, T)
        hn = self.group_norm(x.reshape(b, c, hgt * wid)).transpose(1, 2)  # (B, HW, C); reshape: x may be NHWC
        q = split_heads(self.to_q(hn), self.heads)
        # Text keys first, then pixel keys; pixels are never masked.
        k = split_heads(torch.cat([self.add_k_proj(context), self.to_k(hn)], dim=1), self.heads)
        v = split_heads(torch.cat([self.add_v_proj(context), self.to_v(hn)], dim=1), self.heads)
        full_bias = F.pad(bias, (0, hgt * wid), value=0.0)[:, None, None, :]  # (B, 1, 1, T + HW)
        out = self.to_out[0](merge_heads(attention(q, k, v, full_bias)))  # (B, HW, C)
        return out.transpose(1, 2).reshape(b, c, hgt, wid) + x


class DownBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, level: int, cin: int, cout: int, temb: int, last: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(ResnetBlock(cfg, cin if i == 0 else cout, cout, temb) for i in range(n))
        if cfg.down_block_types[level] == DOWN_CROSS_ATTN:
            self.attentions = nn.ModuleList(
                CrossAttention(cout, cfg.head_dim(level), cfg.cross_attention_dim, cfg.norm_num_groups)
                for _ in range(n)
            )
        else:
            self.attentions = None
        self.downsamplers = None if last else nn.ModuleList([ResnetBlock(cfg, cout, cout, temb, sample="down")])

    def forward(self, h, emb, context, bias) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[i](h, context, bias)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h, emb)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, level: int, cprev: int, cout: int, cskip_last: int, temb: int, last: bool):
        super().__init__()
        n = cfg.layers_per_block + 1
        # Input of resnet i = previous output ++ the skip popped for it; the last skip comes from one level up.
        self.resnets = nn.ModuleList(
            ResnetBlock(cfg, (cprev if i == 0 else cout) + (cskip_last if i == n - 1 else cout), cout, temb)
            for i in range(n)
        )
        if cfg.up_block_types[level] == UP_CROSS_ATTN:
            depth = len(cfg.block_out_channels) - 1 - level
            self.attentions = nn.ModuleList(
                CrossAttention(cout, cfg.head_dim(depth), cfg.cross_attention_dim, cfg.norm_num_groups)
                for _ in range(n)
            )
        else:
            self.attentions = None
        self.upsamplers = None if last else nn.ModuleList([ResnetBlock(cfg, cout, cout, temb, sample="up")])

    def forward(self, h, skips: list[torch.Tensor], emb, context, bias) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if self.attentions is not None:
                h = self.attentions[i](h, context, bias)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, emb)
        return h


class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, channels: int, temb: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cfg, channels, channels, temb) for _ in range(2))
        if cfg.mid_block_type == MID_CROSS_ATTN:
            last = len(cfg.block_out_channels) - 1
            self.attentions = nn.ModuleList(
                [CrossAttention(channels, cfg.head_dim(last), cfg.cross_attention_dim, cfg.norm_num_groups)]
            )
        else:
            self.attentions = None

    def forward(self, h, emb, context, bias) -> torch.Tensor:
        h = self.resnets[0](h, emb)
        if self.attentions is not None:
            h = self.attentions[0](h, context, bias)
        return self.resnets[1](h, emb)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        temb = 4 * ch[0]
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, i, ch[max(i - 1, 0)], ch[i], temb, last=i == n - 1) for i in range(n)
        )
        self.mid_block = MidBlock(cfg, ch[-1], temb)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg, i, rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)], temb, last=i == n - 1)
            for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,  # (B, Cin, H, W)
        t: torch.Tensor,  # () or (B,) original-scale timestep
        context: torch.Tensor | None = None,  # (B, T, Cc) decoder only
        context_mask: torch.Tensor | None = None,  # (B, T) bool
        class_labels: torch.Tensor | None = None,  # (B, 4*C0) added to the time embedding (identity class emb)
    ) -> torch.Tensor:  # (B, Cout, H, W)
        emb = self.time_embedding(timestep_embedding(t.expand(x.shape[0]), self.cfg.block_out_channels[0]).to(x.dtype))
        if class_labels is not None:
            emb = emb + class_labels.to(emb.dtype)
        bias = None if context_mask is None else mask_to_bias(context_mask, x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, states = block(h, emb, context, bias)
            skips.extend(states)
        h = self.mid_block(h, emb, context, bias)
        for block in self.up_blocks:
            h = block(h, skips, emb, context, bias)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
