"""Write a diffusers-layout Karlo repo from kakaobrain's original checkpoints, sampling as the original does.

The weights come from karlo_model.original (strict key conversion). What the weights cannot tell comes from the
original yaml configs (github.com/kakaobrain/karlo ``configs/*.yaml``): the prior's 32 heads, the decoder's head
width of 64, the 64 px decoder and the 256 px super-res output. The schedulers are those of the original sampler
(``karlo/sampler/t2i.py`` and ``karlo/models/prior_model.py``): the prior's x0 clamped to [-10, 10], the decoder's
and super-res' to [-1, 1], every coefficient in float64 (``float64_tables``). The CLIP ViT-L/14 text encoder and
tokenizer are copied from a Hugging Face layout folder (``openai/clip-vit-large-patch14``) or from the root of a
diffusers-format Karlo repo.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import fsspec
import torch

from . import text as text_lib
from .config import (
    DOWN_CROSS_ATTN,
    DOWN_RESNET,
    MID_CROSS_ATTN,
    MID_RESNET,
    UP_CROSS_ATTN,
    UP_RESNET,
    ConfigError,
    KarloConfig,
    PriorConfig,
    SchedulerConfig,
    TextProjConfig,
    UNetConfig,
)
from .fetch import is_remote, local_copy
from .original import KARLO_ATTENTION_HEAD_DIM, KARLO_PRIOR_HEADS, CheckpointError, load_original
from .repo import EXPECTED_CLASSES, MODULE_CONFIGS, build_module
from .tiny import LIBRARIES
from .weights import WeightsError, load_into, load_state_dict, read_json, save_component, weight_file

StateDict = dict[str, torch.Tensor]

# The original sampler's semantics (karlo/sampler/t2i.py: the prior's denoised_fn clamps x0 to +-10 with
# clip_denoised=False; the decoder and super-res clip to +-1; guided-diffusion's float64 tables).
ORIGINAL_SCHEDULERS = {
    "prior_scheduler": SchedulerConfig("fixed_small_log", "sample", True, 10.0, float64_tables=True),
    "decoder_scheduler": SchedulerConfig("learned_range", "epsilon", True, 1.0, float64_tables=True),
    "super_res_scheduler": SchedulerConfig("fixed_small_log", "epsilon", True, 1.0, float64_tables=True),
}
DECODER_SAMPLE_SIZE = 64  # decoder_900M_vit_l.yaml image_size
IMAGE_SIZE = 256  # improved_sr_64_256_1.4B.yaml
SUPER_RES_HEAD_DIM = 8  # the hub's super_res config value (the networks have no attention)
# The text half of a whole CLIPModel checkpoint; the rest (vision tower, logit scale) is not copied.
TEXT_PREFIXES = ("text_model.", "text_projection.")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def prior_config(sd: StateDict, num_heads: int) -> PriorConfig:
    """The PriorTransformer config of a converted prior state dict."""
    width, clip_dim = sd["proj_in.weight"].shape
    layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    tokens = sd["positional_embedding"].shape[1]
    return PriorConfig(num_attention_heads=num_heads, attention_head_dim=width // num_heads, num_layers=layers,
                       embedding_dim=clip_dim, num_embeddings=tokens - 4, additional_embeddings=4)


def text_proj_config(sd: StateDict) -> TextProjConfig:
    time_embed_dim, clip_dim = sd["embedding_proj.weight"].shape
    cross = sd["encoder_hidden_states_proj.weight"].shape[0]
    return TextProjConfig(clip_embeddings_dim=clip_dim, cross_attention_dim=cross, time_embed_dim=time_embed_dim,
                          clip_extra_context_tokens=sd["clip_extra_context_tokens_proj.weight"].shape[0] // cross)


def unet_config(sd: StateDict, *, conditional: bool, sample_size: int | None, head_dim: int,
                cross_attention_dim: int | None = None) -> UNetConfig:
    """The UNet config of a converted decoder or super-res state dict: levels, widths and where attention sits."""
    levels = len({k.split(".")[1] for k in sd if k.startswith("down_blocks.")})
    channels = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
    per_level = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.resnets.")})

    def attends(block: str) -> bool:
        return any(k.startswith(f"{block}.attentions.") for k in sd)

    scale_shift = sd["down_blocks.0.resnets.0.time_emb_proj.weight"].shape[0] == 2 * channels[0]
    kwargs: dict[str, Any] = {}
    if conditional:
        kwargs = dict(cross_attention_dim=cross_attention_dim, class_embed_type="identity",
                      mid_block_type=MID_CROSS_ATTN if attends("mid_block") else MID_RESNET)
    return UNetConfig(
        in_channels=sd["conv_in.weight"].shape[1],
        out_channels=sd["conv_out.weight"].shape[0],
        block_out_channels=channels,
        down_block_types=tuple(DOWN_CROSS_ATTN if attends(f"down_blocks.{i}") else DOWN_RESNET for i in range(levels)),
        up_block_types=tuple(UP_CROSS_ATTN if attends(f"up_blocks.{i}") else UP_RESNET for i in range(levels)),
        sample_size=sample_size,
        layers_per_block=per_level,
        attention_head_dim=head_dim,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        conditional=conditional,
        **kwargs,
    )


def _text_encoder_source(path_or_url: str) -> tuple[Path, Path, dict[str, Any]]:
    """(weights folder, tokenizer folder, CLIPTextModelWithProjection config) of a diffusers Karlo repo root or an
    HF-layout CLIP folder (CLIPModel or CLIPTextModelWithProjection), copied locally if remote."""
    fs, root = fsspec.core.url_to_fs(path_or_url)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise WeightsError(f"text encoder {path_or_url} is not a folder")
    repo = fs.isfile(f"{root}/model_index.json")
    weights_dir, tok_dir = ("text_encoder/", "tokenizer/") if repo else ("", "")

    def files(fs, root: str) -> list[str]:
        root = root.rstrip("/")
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{weights_dir}".rstrip("/"), detail=False)}
        weights = weight_file(names, sharded=False)
        if weights is None:
            raise WeightsError(f"text encoder {path_or_url}: no single-file weights in {weights_dir or 'the folder'}")
        tok = [f"{tok_dir}{n}" for n in TOKENIZER_FILES if fs.isfile(f"{root}/{tok_dir}{n}")]
        return [f"{weights_dir}config.json", f"{weights_dir}{weights}", *tok]

    local = local_copy(path_or_url, files, None) if is_remote(path_or_url) else Path(root)
    files(fsspec.filesystem("file"), str(local))  # the same checks on a local folder
    data = read_json(local / weights_dir / "config.json")
    if data.get("model_type") == "clip" and isinstance(data.get("text_config"), dict):
        data = {**data["text_config"], "projection_dim": data.get("projection_dim", 512)}
    elif data.get("model_type") != "clip_text_model":
        raise ConfigError(f"text encoder {path_or_url}: config.json describes a {data.get('model_type')!r} model, "
                          "not a CLIP model or text tower")
    keep = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
    config = {k: v for k, v in data.items() if not k.startswith("_") or k in keep}
    config |= {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model"}
    return local / weights_dir, local / tok_dir, config


def _write_text_encoder(weights_dir: Path, tok_dir: Path, config: dict[str, Any], out: Path) -> None:
    """The text tower's weights (strictly loaded, CLIPModel's vision half left out) and a tokenizer padding with
    "!" (id 0), as diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py sets it."""
    from transformers import CLIPTokenizer

    encoder = text_lib.build_text_encoder(config)
    state, source = load_state_dict(weights_dir)
    load_into(encoder, {k: v for k, v in state.items() if k.startswith(TEXT_PREFIXES)}, source)
    save_component(out / "text_encoder", config, encoder, "model.safetensors")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True, pad_token=text_lib.PAD_TOKEN,
                                                  model_max_length=text_lib.MAX_LENGTH)
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"no CLIP tokenizer (vocab.json, merges.txt) in {tok_dir}: {e}") from None
    tokenizer.save_pretrained(str(out / "tokenizer"))
    text_lib.load_tokenizer(out / "tokenizer")  # checks the pad id


def convert_original(
    prior: str,
    decoder: str,
    super_res: str,
    clip_stats: str,
    text_encoder: str,
    out: str | Path,
    *,
    prior_num_heads: int = KARLO_PRIOR_HEADS,
    attention_head_dim: int = KARLO_ATTENTION_HEAD_DIM,
    decoder_sample_size: int = DECODER_SAMPLE_SIZE,
    image_size: int = IMAGE_SIZE,
) -> Path:
    """The original files (paths or fsspec URLs) + a CLIP text encoder -> a diffusers-layout repo in ``out``
    (a new or empty local folder) that ``Karlo.from_pretrained`` loads. Everything is checked before ``out`` is
    written: the keys of every file, the shapes against the configs, the text encoder against the prior."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise WeightsError(f"output folder {out} is not empty")
    weights_dir, tok_dir, text_config = _text_encoder_source(str(text_encoder))
    state = load_original(prior, decoder, super_res, clip_stats, prior_num_heads=prior_num_heads,
                          attention_head_dim=attention_head_dim)
    text_proj = text_proj_config(state["text_proj"])
    sr = dict(conditional=False, head_dim=SUPER_RES_HEAD_DIM)
    try:
        config = KarloConfig(
            text_encoder=text_config,
            prior=prior_config(state["prior"], prior_num_heads),
            text_proj=text_proj,
            decoder=unet_config(state["decoder"], conditional=True, sample_size=decoder_sample_size,
                                head_dim=attention_head_dim, cross_attention_dim=text_proj.cross_attention_dim),
            super_res_first=unet_config(state["super_res_first"], sample_size=image_size, **sr),
            super_res_last=unet_config(state["super_res_last"], sample_size=None, **sr),  # null, as on the hub
            **ORIGINAL_SCHEDULERS,
        )
    except ConfigError as e:
        raise CheckpointError(f"the checkpoints and the text encoder do not make one model: {e}") from None
    modules = {}
    for comp in MODULE_CONFIGS:
        with torch.device("meta"):
            modules[comp] = build_module(config, comp)
        load_into(modules[comp], state[comp], f"converted {comp}")
    try:
        for comp, module in modules.items():
            save_component(out / comp, getattr(config, comp).to_dict(), module, "diffusion_pytorch_model.safetensors")
        _write_text_encoder(weights_dir, tok_dir, text_config, out)
        for name, sched in ORIGINAL_SCHEDULERS.items():
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "scheduler_config.json").write_text(json.dumps(sched.to_dict(), indent=2) + "\n")
        index = {"_class_name": "UnCLIPPipeline", "_karlo_converted_from": "kakaobrain original checkpoints"}
        index |= {c: [LIBRARIES.get(c, "diffusers"), cls] for c, cls in EXPECTED_CLASSES.items()}
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written repo that looks loadable
        raise
    return out
