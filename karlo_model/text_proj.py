"""Text/image conditioning of the decoder: diffusers' ``UnCLIPTextProjModel``
(``pipelines/deprecated/unclip/text_proj.py``), with its key names."""

from __future__ import annotations

import torch
from torch import nn

from .config import TextProjConfig


class TextProjection(nn.Module):
    def __init__(self, cfg: TextProjConfig):
        super().__init__()
        self.cfg = cfg
        d, c, t = cfg.clip_embeddings_dim, cfg.cross_attention_dim, cfg.time_embed_dim
        # Stands in for the image embedding in the unconditional half of classifier-free guidance.
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(d))
        self.embedding_proj = nn.Linear(d, t)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(d, t)
        self.clip_extra_context_tokens_proj = nn.Linear(d, c * cfg.clip_extra_context_tokens)
        self.encoder_hidden_states_proj = nn.Linear(d, c)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(c)

    def forward(
        self,
        image_embeds: torch.Tensor,  # (N, D): N = B, or 2B with the unconditional half first
        text_embeds: torch.Tensor,  # (N, D)
        text_hidden: torch.Tensor,  # (N, 77, D)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the decoder's cross-attention context (N, extra + 77, C) and its time-embedding offset (N, T)."""
        n = image_embeds.shape[0]
        additive = self.clip_image_embeddings_project_to_time_embeddings(image_embeds) + self.embedding_proj(
            text_embeds
        )
        # Channel-first layout of the extra tokens: token j, channel c = x[c * extra + j], as
        # ``UnCLIPTextProjModel.forward`` reshapes them.
        extra = self.clip_extra_context_tokens_proj(image_embeds)  # (N, C * extra)
        extra = extra.reshape(n, -1, self.cfg.clip_extra_context_tokens).permute(0, 2, 1)  # (N, extra, C)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_hidden))  # (N, 77, C)
        return torch.cat([extra, text], dim=1), additive

    def unconditional_image_embeds(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, D) learned stand-in for the image embedding."""
        return self.learned_classifier_free_guidance_embeddings.to(dtype)[None].expand(batch, -1)
