"""The diffusion prior: a causal transformer that predicts a CLIP image embedding from the text (diffusers'
``PriorTransformer``, ``models/transformers/prior_transformer.py``).

Module names follow diffusers' ``PriorTransformer`` so the hub safetensors load with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PriorConfig
from .layers import TimestepEmbedding, attention, mask_to_bias, merge_heads, split_heads, timestep_embedding


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # index 0 keeps diffusers' key "to_out.0"

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out[0](merge_heads(attention(q, k, v, bias)))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))  # exact (erf) GELU, as the checkpoint was trained


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Slot 1 held dropout in training; keeping it makes the keys "net.0.proj" and "net.2" line up.
        self.net = nn.ModuleList([GELUProjection(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class PriorBlock(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)); x + ff(norm3(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


class PriorTransformer(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        w, d = cfg.inner_dim, cfg.embedding_dim
        seq = cfg.num_embeddings + cfg.additional_embeddings
        self.time_embedding = TimestepEmbedding(w, w)
        self.proj_in = nn.Linear(d, w)
        self.embedding_proj = nn.Linear(d, w)
        self.encoder_hidden_states_proj = nn.Linear(d, w)
        self.positional_embedding = nn.Parameter(torch.zeros(1, seq, w))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, w))
        self.transformer_blocks = nn.ModuleList(
            PriorBlock(w, cfg.num_attention_heads, cfg.attention_head_dim) for _ in range(cfg.num_layers)
        )
        self.norm_out = nn.LayerNorm(w)
        self.proj_to_clip_embeddings = nn.Linear(w, d)
        # CLIP image-embedding statistics: the prior works in normalised space, which
        # ``PriorTransformer.post_process_latents`` in diffusers undoes the same way.
        self.clip_mean = nn.Parameter(torch.zeros(1, d))
        self.clip_std = nn.Parameter(torch.ones(1, d))

    def forward(
        self,
        x: torch.Tensor,  # (B, D) noisy normalised image embedding
        t: torch.Tensor,  # () or (B,) original-scale timestep
        text_embeds: torch.Tensor,  # (B, D) pooled CLIP text embedding
        text_hidden: torch.Tensor,  # (B, 77, D) CLIP last hidden state
        text_mask: torch.Tensor,  # (B, 77) bool, True on real tokens
    ) -> torch.Tensor:  # (B, D) predicted x0
        b, dtype = x.shape[0], x.dtype
        temb = self.time_embedding(timestep_embedding(t.expand(b), self.cfg.inner_dim).to(dtype))
        tokens = torch.cat(
            [
                self.encoder_hidden_states_proj(text_hidden),  # (B, 77, W)
                self.embedding_proj(text_embeds)[:, None],  # (B, 1, W)
                temb[:, None],
                self.proj_in(x)[:, None],
                self.prd_embedding.to(dtype).expand(b, -1, -1),  # the token whose output is read
            ],
            dim=1,
        ) + self.positional_embedding.to(dtype)  # (B, 81, W)
        n = tokens.shape[1]
        # Text padding is masked for every query; the 4 extra tokens are always visible; causal on top.
        keys = F.pad(mask_to_bias(text_mask, dtype), (0, self.cfg.additional_embeddings), value=0.0)  # (B, 81)
        causal = torch.full((n, n), -10000.0, dtype=dtype, device=x.device).triu_(1)  # (81, 81)
        bias = (keys[:, None, :] + causal)[:, None]  # (B, 1, 81, 81)
        for block in self.transformer_blocks:
            tokens = block(tokens, bias)
        return self.proj_to_clip_embeddings(self.norm_out(tokens)[:, -1])

    def unnormalise(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP space -> CLIP image embedding."""
        return z * self.clip_std.to(z.dtype) + self.clip_mean.to(z.dtype)
