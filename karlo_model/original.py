"""Load the original kakaobrain Karlo checkpoints and rename their keys to the diffusers layout.

The original files (github.com/kakaobrain/karlo) hold a CLIP-style prior transformer (`transformer.resblocks`) and
guided-diffusion style UNets (`input_blocks` / `middle_block` / `output_blocks`). Each block type has one converter
below. The UNet structure (number of levels, res blocks per level, where attention and the up/down samplers sit) is
read off the keys present, so checkpoints of any size convert. Every original key must be used exactly once; the
leftovers are reported by name.

Files and their key prefixes:
    prior-ckpt-step=01000000-of-01000000.ckpt    ["state_dict"], "model."   -> prior
    decoder-ckpt-step=01000000-of-01000000.ckpt  ["state_dict"], "model."   -> decoder UNet + text_proj
    improved-sr-ckpt-step=1.2M.ckpt              ["state_dict"], "model_first_steps." / "model_last_step."
    ViT-L-14_stats.th                            (clip_mean, clip_std), each (clip_dim,)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .weights import WeightsError, load_torch_file

__all__ = [
    "KARLO_ATTENTION_HEAD_DIM",
    "KARLO_PRIOR_HEADS",
    "CheckpointError",
    "convert_decoder",
    "convert_prior",
    "convert_super_res",
    "load_checkpoint",
    "load_clip_stats",
    "load_original",
]

# Head sizes are not recoverable from the weights (a fused qkv matrix looks the same for any split), so they come
# from the original yaml configs: prior xf_heads = 32; decoder num_head_channels = 64.
KARLO_PRIOR_HEADS = 32
KARLO_ATTENTION_HEAD_DIM = 64

StateDict = dict[str, torch.Tensor]


class CheckpointError(WeightsError):
    """An original checkpoint that cannot be read or does not have the expected layout."""

    kind = "original checkpoint file"

    @classmethod
    def refused(cls, path: str, reason: str) -> "CheckpointError":
        return cls(
            f"refusing to load {path}: it holds more than tensors and plain containers, and arbitrary "
            f"pickled objects are never unpickled (torch.load(weights_only=True) said: {reason})"
        )


def _torch_load(path_or_url: str) -> object:
    """The file's tensors and plain containers. Local files in torch's zip format are memory-mapped: the tensors
    stay file-backed until they are copied into a model, instead of a multi-GB checkpoint being read into RAM."""
    return load_torch_file(path_or_url, error=CheckpointError, mmap=True)


def load_checkpoint(path_or_url: str) -> StateDict:
    """The `state_dict` of an original `.ckpt` file, with its key prefixes kept."""
    ckpt = _torch_load(path_or_url)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        found = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path_or_url} has no 'state_dict' entry (found: {found})")
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path_or_url}: 'state_dict' is a {type(sd).__name__}, not a dict of tensors")
    not_tensors = sorted(str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path_or_url}: 'state_dict' entries that are not tensors: {not_tensors}")
    return sd


def load_clip_stats(path_or_url: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_mean, clip_std) from `ViT-L-14_stats.th`, each of shape (clip_dim,)."""
    stats = _torch_load(path_or_url)
    if (
        not isinstance(stats, (tuple, list))
        or len(stats) != 2
        or not all(isinstance(s, torch.Tensor) and s.ndim == 1 for s in stats)
        or stats[0].shape != stats[1].shape
    ):
        raise CheckpointError(
            f"{path_or_url} should hold (clip_mean, clip_std), two 1-D tensors of the same length; "
            f"got {_describe(stats)}"
        )
    return stats[0], stats[1]


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor{tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}[{', '.join(_describe(o) for o in obj)}]"
    return type(obj).__name__


# --------------------------------------------------------------------------------------------------------------
# Key bookkeeping


class _Keys:
    """Hands out each original tensor once, under a key prefix, and remembers what was left over."""

    def __init__(self, sd: StateDict, prefix: str = "", left: set[str] | None = None):
        self._sd = sd
        self._prefix = prefix
        self._left = set(sd) if left is None else left

    def sub(self, prefix: str) -> _Keys:
        """A view on the keys under `prefix`, sharing the record of what is used."""
        return _Keys(self._sd, self._prefix + prefix, self._left)

    def name(self, key: str) -> str:
        return self._prefix + key

    def has(self, key: str) -> bool:
        return self._prefix + key in self._sd

    def take(self, key: str) -> torch.Tensor:
        full = self._prefix + key
        if full not in self._sd:
            raise CheckpointError(f"missing key {full!r}")
        if full not in self._left:
            raise CheckpointError(f"key {full!r} would be used twice")
        self._left.remove(full)
        return self._sd[full]

    def count(self, module: str) -> int:
        """Number of children `module.0`, `module.1`, ...; they must be numbered without gaps."""
        start = self._prefix + module + "."
        found = {int(k[len(start) :].split(".", 1)[0]) for k in self._sd if k.startswith(start)}
        if found != set(range(len(found))):
            raise CheckpointError(f"children of {start[:-1]!r} are not numbered 0..n-1: {sorted(found)}")
        return len(found)

    def check_all_used(self) -> None:
        if self._left:
            left = sorted(self._left)
            raise CheckpointError(f"{len(left)} unexpected keys, not part of the known layout: {left}")


def _expect_shape(keys: _Keys, key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{keys.name(key)!r} has shape {tuple(tensor.shape)}, expected {shape}")


def _rename(keys: _Keys, src: str, dst: str) -> StateDict:
    """A module whose weight and bias only change name (Linear, Conv, GroupNorm, LayerNorm)."""
    return {f"{dst}.{p}": keys.take(f"{src}.{p}") for p in ("weight", "bias")}


def _split_fused(weight: torch.Tensor, bias: torch.Tensor, names: tuple[str, ...], head_dim: int) -> StateDict:
    """Undo the per-head interleave of a fused projection: weight (parts * C, in), bias (parts * C,).

    The original attention views the fused output per head as (heads, parts * head_dim) and splits each head's slice
    into q, k, v (or k, v), so the rows are laid out (heads, parts, head_dim). Returns, for each name in order,
    `name.weight` (C, in) and `name.bias` (C,).
    """
    parts = len(names)
    heads = weight.shape[0] // (parts * head_dim)
    w = weight.reshape(heads, parts, head_dim, -1)
    b = bias.reshape(heads, parts, head_dim)
    out = {}
    for i, name in enumerate(names):
        out[f"{name}.weight"] = w[:, i].reshape(heads * head_dim, -1)
        out[f"{name}.bias"] = b[:, i].reshape(heads * head_dim)
    return out


# --------------------------------------------------------------------------------------------------------------
# One converter per block type


def _convert_time_embedding(keys: _Keys) -> StateDict:
    """time_embed = Sequential(Linear, SiLU, Linear) -> TimestepEmbedding(linear_1, linear_2)."""
    return _rename(keys, "time_embed.0", "time_embedding.linear_1") | _rename(
        keys, "time_embed.2", "time_embedding.linear_2"
    )


def _convert_resblock(keys: _Keys, src: str, dst: str) -> StateDict:
    """ResBlock (in_layers = [GN, SiLU, conv], emb_layers = [SiLU, Linear], out_layers = [GN, SiLU, Dropout, conv])."""
    out = (
        _rename(keys, f"{src}.in_layers.0", f"{dst}.norm1")
        | _rename(keys, f"{src}.in_layers.2", f"{dst}.conv1")
        | _rename(keys, f"{src}.emb_layers.1", f"{dst}.time_emb_proj")
        | _rename(keys, f"{src}.out_layers.0", f"{dst}.norm2")
        | _rename(keys, f"{src}.out_layers.3", f"{dst}.conv2")
    )
    # The 1x1 skip conv exists only where the block changes the channel count.
    if keys.has(f"{src}.skip_connection.weight"):
        out |= _rename(keys, f"{src}.skip_connection", f"{dst}.conv_shortcut")
    return out


def _convert_attention_block(keys: _Keys, src: str, dst: str, head_dim: int) -> StateDict:
    """AttentionBlock with 1x1 Conv1d projections -> Attention with Linear to_q/to_k/to_v(/add_k_proj/add_v_proj)."""
    qkv_w = keys.take(f"{src}.qkv.weight")  # (3C, C, 1)
    qkv_b = keys.take(f"{src}.qkv.bias")  # (3C,)
    channels = qkv_w.shape[1]
    _expect_shape(keys, f"{src}.qkv.weight", qkv_w, (3 * channels, channels, 1))
    _expect_shape(keys, f"{src}.qkv.bias", qkv_b, (3 * channels,))
    if channels % head_dim:
        raise CheckpointError(f"{keys.name(src)!r}: {channels} channels do not split into heads of {head_dim}")
    out = _rename(keys, f"{src}.norm", f"{dst}.group_norm")
    # A 1x1 Conv1d weight (out, in, 1) is a Linear weight (out, in) with a trailing unit dim.
    out |= _split_fused(qkv_w.squeeze(-1), qkv_b, (f"{dst}.to_q", f"{dst}.to_k", f"{dst}.to_v"), head_dim)
    # Cross-attention keys/values from the text sequence; present in the decoder, absent in a self-attention block.
    if keys.has(f"{src}.encoder_kv.weight"):
        kv_w = keys.take(f"{src}.encoder_kv.weight")  # (2C, E, 1)
        kv_b = keys.take(f"{src}.encoder_kv.bias")  # (2C,)
        _expect_shape(keys, f"{src}.encoder_kv.weight", kv_w, (2 * channels, kv_w.shape[1], 1))
        _expect_shape(keys, f"{src}.encoder_kv.bias", kv_b, (2 * channels,))
        out |= _split_fused(kv_w.squeeze(-1), kv_b, (f"{dst}.add_k_proj", f"{dst}.add_v_proj"), head_dim)
    proj_w = keys.take(f"{src}.proj_out.weight")
    _expect_shape(keys, f"{src}.proj_out.weight", proj_w, (channels, channels, 1))
    out[f"{dst}.to_out.0.weight"] = proj_w.squeeze(-1)
    out[f"{dst}.to_out.0.bias"] = keys.take(f"{src}.proj_out.bias")
    return out


def _convert_prior_block(keys: _Keys, src: str, dst: str, num_heads: int) -> StateDict:
    """ResidualAttentionBlock (ln_1, attn.c_qkv/c_proj, ln_2, mlp.c_fc/c_proj) -> BasicTransformerBlock."""
    qkv_w = keys.take(f"{src}.attn.c_qkv.weight")  # (3W, W)
    qkv_b = keys.take(f"{src}.attn.c_qkv.bias")  # (3W,)
    width = qkv_w.shape[1]
    _expect_shape(keys, f"{src}.attn.c_qkv.weight", qkv_w, (3 * width, width))
    _expect_shape(keys, f"{src}.attn.c_qkv.bias", qkv_b, (3 * width,))
    if width % num_heads:
        raise CheckpointError(f"{keys.name(src)!r}: width {width} does not split into {num_heads} heads")
    attn = f"{dst}.attn1"
    return (
        _rename(keys, f"{src}.ln_1", f"{dst}.norm1")
        | _split_fused(qkv_w, qkv_b, (f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v"), width // num_heads)
        | _rename(keys, f"{src}.attn.c_proj", f"{dst}.attn1.to_out.0")
        | _rename(keys, f"{src}.ln_2", f"{dst}.norm3")
        | _rename(keys, f"{src}.mlp.c_fc", f"{dst}.ff.net.0.proj")
        | _rename(keys, f"{src}.mlp.c_proj", f"{dst}.ff.net.2")
    )


def _convert_text_proj(keys: _Keys) -> StateDict:
    """The decoder's conditioning layers -> UnCLIPTextProjModel.

    `clip_tok_proj` is copied as is: the original reshapes its (B, W * n) output to (B, W, n) channel-first, the same
    token layout the text_proj reshape-and-permute produces, so no row reordering is needed.
    """
    return (
        _rename(keys, "text_seq_proj.0", "encoder_hidden_states_proj")
        | _rename(keys, "text_seq_proj.1", "text_encoder_hidden_states_norm")
        | _rename(keys, "clip_tok_proj", "clip_extra_context_tokens_proj")
        | _rename(keys, "text_feat_proj", "embedding_proj")
        | _rename(keys, "clip_emb", "clip_image_embeddings_project_to_time_embeddings")
        | {"learned_classifier_free_guidance_embeddings": keys.take("cf_param")}
    )


# --------------------------------------------------------------------------------------------------------------
# UNet structure


@dataclass(frozen=True)
class _UNetLayout:
    """The structure of a guided-diffusion UNet, as read off its keys."""

    levels: int  # resolutions; a downsampler after every level but the last
    res_blocks: int  # res blocks per down level; up levels have one more
    middle_attention: bool


def _is_resblock(keys: _Keys, module: str) -> bool:
    return keys.has(f"{module}.in_layers.0.weight")


def _infer_unet_layout(keys: _Keys) -> _UNetLayout:
    """Levels and blocks per level from `input_blocks` / `output_blocks` / `middle_block`.

    input_blocks  = [conv_in] + per level: res_blocks x [res, (attn)] + [downsample res] (not after the last level)
    output_blocks = per level, deepest first: (res_blocks + 1) x [res, (attn)], the last one + [upsample res]
                    (not on the shallowest level)
    An upsampler is the only resblock that follows another module in an output block, so counting them gives the
    number of levels; the rest follows from the block counts.
    """
    n_in, n_out = keys.count("input_blocks"), keys.count("output_blocks")
    upsample_at = []
    for k in range(n_out):
        last = keys.count(f"output_blocks.{k}") - 1
        if last > 0 and _is_resblock(keys, f"output_blocks.{k}.{last}"):
            upsample_at.append(k)
    levels = len(upsample_at) + 1
    per_level = n_out // levels
    layout = _UNetLayout(
        levels=levels, res_blocks=per_level - 1, middle_attention=keys.has("middle_block.1.qkv.weight")
    )
    expected_up = [per_level * u + per_level - 1 for u in range(levels - 1)]
    expected_in = 1 + levels * layout.res_blocks + levels - 1
    if n_out % levels or layout.res_blocks < 1 or upsample_at != expected_up or n_in != expected_in:
        raise CheckpointError(
            f"cannot read a UNet structure from {keys.name('')!r}: {n_in} input blocks, {n_out} output blocks, "
            f"upsamplers in output blocks {upsample_at}"
        )
    return layout


def _convert_unet(keys: _Keys, head_dim: int) -> StateDict:
    """A guided-diffusion UNet -> diffusers UNet2DConditionModel / UNet2DModel keys (the time embedding included)."""
    layout = _infer_unet_layout(keys)
    nres = layout.res_blocks
    out = _convert_time_embedding(keys) | _rename(keys, "input_blocks.0.0", "conv_in")

    def res_and_attention(src: str, dst_block: str, j: int) -> StateDict:
        # [res, (attn)] -> resnets.j (+ attentions.j)
        sd = _convert_resblock(keys, f"{src}.0", f"{dst_block}.resnets.{j}")
        if keys.has(f"{src}.1.qkv.weight"):
            sd |= _convert_attention_block(keys, f"{src}.1", f"{dst_block}.attentions.{j}", head_dim)
        return sd

    for level in range(layout.levels):
        first = 1 + level * (nres + 1)  # input_blocks index of the level's first res block
        for j in range(nres):
            out |= res_and_attention(f"input_blocks.{first + j}", f"down_blocks.{level}", j)
        if level < layout.levels - 1:
            out |= _convert_resblock(keys, f"input_blocks.{first + nres}.0", f"down_blocks.{level}.downsamplers.0")

    out |= _convert_resblock(keys, "middle_block.0", "mid_block.resnets.0")
    if layout.middle_attention:
        out |= _convert_attention_block(keys, "middle_block.1", "mid_block.attentions.0", head_dim)
    out |= _convert_resblock(keys, f"middle_block.{2 if layout.middle_attention else 1}", "mid_block.resnets.1")

    # output_blocks run deepest level first, like up_blocks; each pops one skip tensor, so up level u holds
    # output_blocks[u * (nres + 1) : (u + 1) * (nres + 1)] in order.
    for level in range(layout.levels):
        for j in range(nres + 1):
            src = f"output_blocks.{level * (nres + 1) + j}"
            out |= res_and_attention(src, f"up_blocks.{level}", j)
            if level < layout.levels - 1 and j == nres:
                last = keys.count(src) - 1
                out |= _convert_resblock(keys, f"{src}.{last}", f"up_blocks.{level}.upsamplers.0")

    return out | _rename(keys, "out.0", "conv_norm_out") | _rename(keys, "out.2", "conv_out")


# --------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def convert_prior(
    sd: StateDict, clip_mean: torch.Tensor, clip_std: torch.Tensor, *, num_heads: int = KARLO_PRIOR_HEADS
) -> StateDict:
    """Prior checkpoint (`model.` prefix) + CLIP stats -> PriorTransformer state dict."""
    keys = _Keys(sd).sub("model.")
    out = (
        _convert_time_embedding(keys)
        | _rename(keys, "clip_img_proj", "proj_in")
        | _rename(keys, "text_emb_proj", "embedding_proj")
        | _rename(keys, "text_enc_proj", "encoder_hidden_states_proj")
        | {"positional_embedding": keys.take("positional_embedding"), "prd_embedding": keys.take("prd_emb")}
        | _rename(keys, "final_ln", "norm_out")
        | _rename(keys, "out_proj", "proj_to_clip_embeddings")
    )
    for i in range(keys.count("transformer.resblocks")):
        out |= _convert_prior_block(keys, f"transformer.resblocks.{i}", f"transformer_blocks.{i}", num_heads)
    keys.check_all_used()

    clip_dim = out["proj_to_clip_embeddings.weight"].shape[0]
    for name, stat in (("clip_mean", clip_mean), ("clip_std", clip_std)):
        if tuple(stat.shape) != (clip_dim,):
            raise CheckpointError(f"{name} has shape {tuple(stat.shape)}, the prior predicts {clip_dim}-d embeddings")
        out[name] = stat[None, :]  # (1, clip_dim): the prior un-normalises with z * clip_std + clip_mean
    return out


def convert_decoder(
    sd: StateDict, *, attention_head_dim: int = KARLO_ATTENTION_HEAD_DIM
) -> tuple[StateDict, StateDict]:
    """Decoder checkpoint (`model.` prefix) -> (UNet2DConditionModel, UnCLIPTextProjModel) state dicts."""
    keys = _Keys(sd).sub("model.")
    text_proj = _convert_text_proj(keys)
    decoder = _convert_unet(keys, attention_head_dim)
    keys.check_all_used()
    return decoder, text_proj


def convert_super_res(sd: StateDict) -> tuple[StateDict, StateDict]:
    """Super-res checkpoint -> (super_res_first, super_res_last) UNet2DModel state dicts.

    `model_first_steps` runs every step but the last; `model_last_step` runs the final (t = 0) step.
    """
    root = _Keys(sd)
    first = _convert_unet(root.sub("model_first_steps."), KARLO_ATTENTION_HEAD_DIM)
    last = _convert_unet(root.sub("model_last_step."), KARLO_ATTENTION_HEAD_DIM)
    root.check_all_used()
    return first, last


_T = TypeVar("_T")


def _convert_file(path_or_url: str, convert: Callable[[StateDict], _T]) -> _T:
    """Load one checkpoint and convert it; conversion errors name the file."""
    sd = load_checkpoint(path_or_url)
    try:
        return convert(sd)
    except CheckpointError as err:
        raise CheckpointError(f"{path_or_url}: {err}") from err


def load_original(
    prior_ckpt: str,
    decoder_ckpt: str,
    sr_ckpt: str,
    clip_stats: str,
    *,
    prior_num_heads: int = KARLO_PRIOR_HEADS,
    attention_head_dim: int = KARLO_ATTENTION_HEAD_DIM,
) -> dict[str, StateDict]:
    """The four original files (paths or fsspec URLs) -> state dicts in the diffusers layout.

    Returns {"prior", "decoder", "text_proj", "super_res_first", "super_res_last"}. Files are read one at a time.
    """
    clip_mean, clip_std = load_clip_stats(clip_stats)
    prior = _convert_file(prior_ckpt, lambda sd: convert_prior(sd, clip_mean, clip_std, num_heads=prior_num_heads))
    decoder, text_proj = _convert_file(
        decoder_ckpt, lambda sd: convert_decoder(sd, attention_head_dim=attention_head_dim)
    )
    first, last = _convert_file(sr_ckpt, convert_super_res)
    return {
        "prior": prior,
        "decoder": decoder,
        "text_proj": text_proj,
        "super_res_first": first,
        "super_res_last": last,
    }
