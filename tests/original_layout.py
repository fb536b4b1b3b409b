"""The original kakaobrain Karlo networks, reduced to module names, shapes and a forward.

Written from the karlo sources' structure and yaml hyper-parameters (configs/*.yaml), independently of karlo_model
and of diffusers: the prior's `transformer.resblocks`, the guided-diffusion UNet (`input_blocks` / `middle_block` /
`output_blocks` / `out`) with ResBlock and the 1x1-Conv1d AttentionBlock, the decoder's text conditioning layers
(`text_seq_proj`, `text_feat_proj`, `clip_tok_proj`, `cf_param`, `clip_emb`) and the super-res UNet. Every size is a
parameter, so the full-size networks can be built on the meta device and tiny ones run on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2)): (B,) -> (B, dim).

    In float32 whatever the model dtype, as the original computes it."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Prior: a causal transformer over [text tokens, text embedding, time, noisy image embedding, prediction token]


class PriorAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        # Fused output viewed per head as [q | k | v], each of w / heads channels: (B, N, H, 3, d).
        q, k, v = self.c_qkv(x).view(b, n, self.heads, 3, w // self.heads).unbind(3)
        d = w // self.heads
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + bias[:, None]  # (B, H, N, N)
        out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(b, n, w)
        return self.c_proj(out)


class PriorMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class PriorBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = PriorAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = PriorMLP(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))


class PriorTransformerBlocks(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(PriorBlock(width, heads) for _ in range(layers))


class OriginalPrior(nn.Module):
    """karlo PriorTransformer (prior_1B_vit_l.yaml: text_ctx 77, xf_width 2048, xf_layers 20, xf_heads 32)."""

    extra_tokens = 4

    def __init__(self, text_ctx: int = 77, xf_width: int = 2048, xf_layers: int = 20, xf_heads: int = 32,
                 clip_dim: int = 768):
        super().__init__()
        self.xf_width = xf_width
        self.time_embed = nn.Sequential(nn.Linear(xf_width, xf_width), nn.SiLU(), nn.Linear(xf_width, xf_width))
        self.text_enc_proj = nn.Linear(clip_dim, xf_width)
        self.text_emb_proj = nn.Linear(clip_dim, xf_width)
        self.clip_img_proj = nn.Linear(clip_dim, xf_width)
        self.out_proj = nn.Linear(xf_width, clip_dim)
        self.transformer = PriorTransformerBlocks(xf_width, xf_layers, xf_heads)
        self.final_ln = nn.LayerNorm(xf_width)
        self.positional_embedding = nn.Parameter(torch.empty(1, text_ctx + self.extra_tokens, xf_width))
        self.prd_emb = nn.Parameter(torch.empty(1, 1, xf_width))

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_enc: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """x (B, clip) noisy normalised image embedding, text_emb (B, clip), text_enc (B, ctx, clip), mask (B, ctx)
        bool -> predicted x0 (B, clip)."""
        b = x.shape[0]
        tokens = torch.cat([
            self.text_enc_proj(text_enc),  # (B, ctx, W)
            self.text_emb_proj(text_emb)[:, None],
            self.time_embed(timestep_embedding(t, self.xf_width).to(x.dtype))[:, None],
            self.clip_img_proj(x)[:, None],
            self.prd_emb.expand(b, -1, -1),
        ], dim=1) + self.positional_embedding  # (B, ctx + 4, W)
        n = tokens.shape[1]
        keep = F.pad(mask, (0, self.extra_tokens), value=True)  # the 4 extra tokens are never padding
        pad_bias = torch.zeros(b, n, dtype=x.dtype).masked_fill(~keep, -math.inf)  # (B, N) over keys
        causal = torch.full((n, n), -math.inf, dtype=x.dtype).triu(1)
        bias = pad_bias[:, None, :] + causal  # (B, N queries, N keys)
        for block in self.transformer.resblocks:
            tokens = block(tokens, bias)
        return self.out_proj(self.final_ln(tokens)[:, -1])


# --------------------------------------------------------------------------------------------------------------
# Guided-diffusion UNet


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool,
                 resample: str | None = None):
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = resample  # "down" (avg-pool 2x), "up" (nearest 2x) or None
        self.in_layers = nn.Sequential(
            _group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(
            _group_norm(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(channels, out_channels, 1) if out_channels != channels else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[2](self._resample(self.in_layers[:2](x)))
        x = self._resample(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels with Conv1d(k=1) projections; optional extra keys/values from a text sequence."""

    def __init__(self, channels: int, head_channels: int, encoder_channels: int | None):
        super().__init__()
        self.heads = channels // head_channels
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        if encoder_channels is not None:
            self.encoder_kv = nn.Conv1d(encoder_channels, 2 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, enc: torch.Tensor | None, enc_bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, C, H, W); enc (B, E, S) channel-first; enc_bias (B, S) additive, 0 or -inf."""
        b, c, *spatial = x.shape
        d = c // self.heads
        # Channels of the fused projection are laid out (heads, 3, d): (B, H, 3, d, T).
        q, k, v = self.qkv(self.norm(x).flatten(2)).view(b, self.heads, 3, d, -1).unbind(2)  # (B, H, d, T)
        bias = torch.zeros(b, k.shape[-1], dtype=x.dtype)
        if enc is not None:
            ek, ev = self.encoder_kv(enc).view(b, self.heads, 2, d, -1).unbind(2)  # (B, H, d, S)
            k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)  # text keys first
            bias = torch.cat([enc_bias, bias], dim=-1)
        logits = torch.einsum("bhdq,bhdk->bhqk", q, k) / math.sqrt(d) + bias[:, None, None]
        out = torch.einsum("bhqk,bhdk->bhdq", logits.softmax(-1), v).reshape(b, c, -1)
        return x + self.proj_out(out).view(b, c, *spatial)


class Step(nn.ModuleList):
    """One input/output block: a list of [conv | ResBlock | AttentionBlock] applied in order."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, enc: torch.Tensor | None,
                enc_bias: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, enc, enc_bias)
            else:
                h = layer(h)
        return h


class OriginalUNet(nn.Module):
    """guided-diffusion UNetModel with resblock_updown: resblocks also do the 2x down/up sampling."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 channel_mult: tuple[int, ...], attention_ds: tuple[int, ...] = (), head_channels: int = 64,
                 scale_shift: bool = False, middle_attention: bool = False, encoder_channels: int | None = None,
                 clip_dim: int | None = None):
        super().__init__()
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if clip_dim is not None:
            self.clip_emb = nn.Linear(clip_dim, emb)

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, emb, cout, scale_shift, resample)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, head_channels, encoder_channels)

        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(Step(layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(Step([res(ch, ch, "down")]))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = Step([res(ch, ch), *([attn(ch)] if middle_attention else []), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * channel_mult[level])]
                ch = model_channels * channel_mult[level]
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(res(ch, ch, "up"))
                    ds //= 2
                self.output_blocks.append(Step(layers))
        self.out = nn.Sequential(_group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def unet(self, x: torch.Tensor, emb: torch.Tensor, enc: torch.Tensor | None = None,
             enc_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet body given the full embedding emb (B, 4 * model_channels)."""
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, enc, enc_bias)
            skips.append(h)
        h = self.middle_block(h, emb, enc, enc_bias)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, enc, enc_bias)
        return self.out(h)

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))


class OriginalSuperRes(OriginalUNet):
    """SuperResUNetModel (improved_sr_64_256_1.4B.yaml): input = cat([noisy x, upsampled low-res]), no attention."""

    def __init__(self, channels: int = 320, depth: int = 3, channels_multiple: tuple[int, ...] = (1, 2, 3, 4)):
        super().__init__(in_channels=6, model_channels=channels, out_channels=3, num_res_blocks=depth,
                         channel_mult=channels_multiple)

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([x, low_res], dim=1), self.time_embedding(t, x.dtype))


class OriginalDecoder(OriginalUNet):
    """PLMImUNet (decoder_900M_vit_l.yaml): a 64x64 UNet conditioned on a CLIP image embedding and CLIP text."""

    def __init__(self, image_size: int = 64, num_channels: int = 320, num_res_blocks: int = 3,
                 channel_mult: tuple[int, ...] = (1, 2, 3, 4), attention_resolutions: tuple[int, ...] = (32, 16, 8),
                 num_head_channels: int = 64, clip_dim: int = 768, clip_emb_mult: int = 4, xf_width: int = 1536,
                 learn_sigma: bool = True):
        super().__init__(in_channels=3, model_channels=num_channels, out_channels=6 if learn_sigma else 3,
                         num_res_blocks=num_res_blocks, channel_mult=channel_mult,
                         attention_ds=tuple(image_size // r for r in attention_resolutions),
                         head_channels=num_head_channels, scale_shift=True, middle_attention=True,
                         encoder_channels=xf_width, clip_dim=clip_dim)
        self.clip_emb_mult = clip_emb_mult
        self.text_seq_proj = nn.Sequential(nn.Linear(clip_dim, xf_width), nn.LayerNorm(xf_width))
        self.text_feat_proj = nn.Linear(clip_dim, 4 * num_channels)
        self.clip_tok_proj = nn.Linear(clip_dim, xf_width * clip_emb_mult)
        self.cf_param = nn.Parameter(torch.empty(clip_dim))  # present because clip_emb_drop = 0.1 > 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, txt_feat: torch.Tensor, txt_feat_seq: torch.Tensor,
                mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, 3, S, S), txt_feat (B, clip), txt_feat_seq (B, ctx, clip), mask (B, ctx) bool, y (B, clip) image
        embedding (or cf_param for the unconditional rows) -> (B, 6, S, S)."""
        b = x.shape[0]
        emb = self.time_embedding(t, x.dtype) + self.clip_emb(y) + self.text_feat_proj(txt_feat)
        # Text sequence in channel-first (B, xf, ctx); the image embedding adds clip_emb_mult tokens, reshaped
        # channel-first too: token j, channel c = clip_tok_proj(y)[c * clip_emb_mult + j].
        seq = self.text_seq_proj(txt_feat_seq).permute(0, 2, 1)
        extra = self.clip_tok_proj(y).reshape(b, -1, self.clip_emb_mult)  # (B, xf, clip_emb_mult)
        enc = torch.cat([extra, seq], dim=2)  # (B, xf, clip_emb_mult + ctx)
        keep = F.pad(mask, (self.clip_emb_mult, 0), value=True)
        enc_bias = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, -math.inf)
        return self.unet(x, emb, enc, enc_bias)


# --------------------------------------------------------------------------------------------------------------
# Checkpoint state dicts, as the original training wrappers save them


def prior_checkpoint_state(prior: OriginalPrior) -> dict[str, torch.Tensor]:
    """PriorDiffusionModel keeps the network under `model`; its other state is non-persistent."""
    return {f"model.{k}": v for k, v in prior.state_dict().items()}


def decoder_checkpoint_state(decoder: OriginalDecoder) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in decoder.state_dict().items()}


def super_res_checkpoint_state(first: OriginalSuperRes, last: OriginalSuperRes) -> dict[str, torch.Tensor]:
    """ImprovedSupRes64to256ProgressiveModel: one network for all steps but the last, one for the last."""
    return {f"model_first_steps.{k}": v for k, v in first.state_dict().items()} | {
        f"model_last_step.{k}": v for k, v in last.state_dict().items()
    }


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights at scales that keep activations O(1); norms get weights near 1, not exactly 1, so a
    swapped norm would show."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        fan_in = p[0].numel() if p.ndim >= 2 else 1
        std = fan_in ** -0.5 if p.ndim >= 2 else 0.1
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    for m in module.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            m.weight.add_(1.0)
    return module


# --------------------------------------------------------------------------------------------------------------
# Tiny checkpoint files


@dataclass(repr=False)
class TinyOriginal:
    """Seeded tiny original networks and the files they were saved to, as the original loads them."""

    prior: OriginalPrior
    decoder: OriginalDecoder
    sr_first: OriginalSuperRes
    sr_last: OriginalSuperRes
    clip_mean: torch.Tensor
    clip_std: torch.Tensor
    files: dict[str, Path]  # "prior", "decoder", "sr", "stats"


def save_checkpoint(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """Lightning-style: the weights under "state_dict" beside plain bookkeeping entries, which are ignored."""
    torch.save({"state_dict": sd, "global_step": 1_000_000, "epoch": 3}, path)
    return path


def write_tiny_original(folder: Path, *, text_ctx: int, clip_dim: int, prior_width: int, prior_heads: int,
                        xf_width: int, head_dim: int, extra_tokens: int, decoder_size: int,
                        dtype: torch.dtype) -> TinyOriginal:
    """Decoder: 3 levels x 2 res blocks, attention on levels 1-2 and the middle; super-res: 2 levels x 1 block."""
    prior = randomize_(OriginalPrior(text_ctx, prior_width, 2, prior_heads, clip_dim).to(dtype), seed=0)
    decoder = randomize_(
        OriginalDecoder(image_size=decoder_size, num_channels=32, num_res_blocks=2, channel_mult=(1, 1, 2),
                        attention_resolutions=(decoder_size // 2, decoder_size // 4), num_head_channels=head_dim,
                        clip_dim=clip_dim, clip_emb_mult=extra_tokens, xf_width=xf_width).to(dtype),
        seed=1,
    )
    sr_first = randomize_(OriginalSuperRes(32, 1, (1, 2)).to(dtype), seed=2)
    sr_last = randomize_(OriginalSuperRes(32, 1, (1, 2)).to(dtype), seed=3)
    g = torch.Generator().manual_seed(4)
    clip_mean = torch.randn(clip_dim, generator=g, dtype=dtype)
    clip_std = torch.rand(clip_dim, generator=g, dtype=dtype) + 0.5
    files = {
        "prior": save_checkpoint(folder / "prior-ckpt-step=01000000-of-01000000.ckpt", prior_checkpoint_state(prior)),
        "decoder": save_checkpoint(folder / "decoder-ckpt-step=01000000-of-01000000.ckpt",
                                   decoder_checkpoint_state(decoder)),
        "sr": save_checkpoint(folder / "improved-sr-ckpt-step=1.2M.ckpt",
                              super_res_checkpoint_state(sr_first, sr_last)),
        "stats": folder / "ViT-L-14_stats.th",
    }
    torch.save((clip_mean, clip_std), files["stats"])
    return TinyOriginal(prior, decoder, sr_first, sr_last, clip_mean, clip_std, files)
