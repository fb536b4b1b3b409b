"""The on-disk layout of a diffusers-format Karlo repo: which components each stage needs, reading and checking
their configs, building the networks, loading their weights, and seeded random weights.

The layout is that of kakaobrain/karlo-v1-alpha and kakaobrain/karlo-v1-alpha-image-variations on the Hugging
Face hub (``model_index.json`` plus one folder per component, as diffusers' ``UnCLIPPipeline.save_pretrained``
writes it).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from . import clip_vision
from . import text as text_lib
from .config import ImageProcessorConfig, KarloConfig, PriorConfig, SchedulerConfig, TextProjConfig, UNetConfig
from .prior import PriorTransformer
from .text_proj import TextProjection
from .unet import UNet
from .weights import WeightsError, load_into, load_state_dict, local_repo, read_json

STAGES = ("prior", "image_encoder", "decoder", "super_res")
# Repo components each stage needs.
STAGE_COMPONENTS = {
    "prior": ("tokenizer", "text_encoder", "prior", "prior_scheduler"),
    # Image variations: the input image's CLIP embedding replaces the prior's, and "" is the text of both halves
    # of guidance (diffusers' UnCLIPImageVariationPipeline).
    "image_encoder": ("tokenizer", "text_encoder", "image_encoder", "feature_extractor"),
    "decoder": ("text_proj", "decoder", "decoder_scheduler"),
    "super_res": ("super_res_first", "super_res_last", "super_res_scheduler"),
}
# model_index.json entries we accept: library names vary (the hub says "unclip" for text_proj).
EXPECTED_CLASSES = {
    "tokenizer": "CLIPTokenizer",
    "text_encoder": "CLIPTextModelWithProjection",
    "prior": "PriorTransformer",
    "text_proj": "UnCLIPTextProjModel",
    "decoder": "UNet2DConditionModel",
    "super_res_first": "UNet2DModel",
    "super_res_last": "UNet2DModel",
    "prior_scheduler": "UnCLIPScheduler",
    "decoder_scheduler": "UnCLIPScheduler",
    "super_res_scheduler": "UnCLIPScheduler",
}
VARIATIONS_PIPELINE = "UnCLIPImageVariationPipeline"
# kakaobrain/karlo-v1-alpha-image-variations (its model_index.json on the hub): the text-to-image components
# without the prior, plus a CLIP vision tower and its image processor.
VARIATION_CLASSES = {
    **{c: cls for c, cls in EXPECTED_CLASSES.items() if c not in ("prior", "prior_scheduler")},
    "image_encoder": "CLIPVisionModelWithProjection",
    "feature_extractor": "CLIPImageProcessor",
}
# Class names that transformers writes for the same image processor, depending on version and installed backends.
CLASS_ALIASES = {"CLIPImageProcessor": ("CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast",
                                        "CLIPFeatureExtractor")}
MODULE_CONFIGS = {
    "prior": PriorConfig,
    "text_proj": TextProjConfig,
    "decoder": UNetConfig,
    "super_res_first": UNetConfig,
    "super_res_last": UNetConfig,
}
MODULE_CLASSES = {
    PriorConfig: PriorTransformer,
    TextProjConfig: TextProjection,
    UNetConfig: UNet,
}
CONFIG_FILES = {SchedulerConfig: "scheduler_config.json", ImageProcessorConfig: "preprocessor_config.json"}


def repo_classes(index: dict) -> dict[str, str]:
    """The components a repo must have, by the pipeline class its model_index.json names."""
    return VARIATION_CLASSES if index.get("_class_name") == VARIATIONS_PIPELINE else EXPECTED_CLASSES


def fetch_components(
    path_or_url: str | Path, components: Sequence[str], storage_options: dict | None = None
) -> tuple[Path, dict[str, str]]:
    """A local folder with the files of ``components`` and the config files of every other component (the whole
    model is checked whatever is loaded), and the repo's component classes. The image processor has no weights:
    its folder is always fetched whole."""
    classes = repo_classes(read_json(local_repo(path_or_url, [], storage_options) / "model_index.json"))
    wanted = list(components)
    if "feature_extractor" in classes and "feature_extractor" not in wanted:
        wanted.append("feature_extractor")  # its config is not a config.json
    others = [c for c in classes if c not in wanted and c != "tokenizer"]
    return local_repo(path_or_url, wanted, storage_options, config_only=others), classes


def read_configs(path_or_url: str | Path, storage_options: dict | None = None) -> KarloConfig:
    """Every component config of a repo, checked, with no weights fetched."""
    return read_repo_configs(fetch_components(path_or_url, [], storage_options)[0])


def read_repo_configs(root: Path) -> KarloConfig:
    """Every component config of a local diffusers-format repo, checked against model_index.json."""
    index = read_json(root / "model_index.json")
    classes = repo_classes(index)
    for comp, cls_name in classes.items():
        entry = index.get(comp)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in CLASS_ALIASES.get(cls_name, (cls_name,))):
            raise WeightsError(
                f"{root / 'model_index.json'}: expected {comp!r} to be a {cls_name}, found {entry!r} (is this a "
                "Karlo repo such as kakaobrain/karlo-v1-alpha or kakaobrain/karlo-v1-alpha-image-variations?)"
            )
    if classes is VARIATION_CLASSES:
        first = dict(prior=None, image_encoder=read_json(root / "image_encoder" / "config.json"),
                     feature_extractor=_config(root, "feature_extractor", ImageProcessorConfig))
    else:
        first = dict(prior=_config(root, "prior", PriorConfig),
                     prior_scheduler=_config(root, "prior_scheduler", SchedulerConfig))
    try:
        return KarloConfig(
            text_encoder=read_json(root / "text_encoder" / "config.json"),
            text_proj=_config(root, "text_proj", TextProjConfig),
            decoder=_config(root, "decoder", UNetConfig),
            super_res_first=_config(root, "super_res_first", UNetConfig),
            super_res_last=_config(root, "super_res_last", UNetConfig),
            decoder_scheduler=_config(root, "decoder_scheduler", SchedulerConfig),
            super_res_scheduler=_config(root, "super_res_scheduler", SchedulerConfig),
            **first,
        )
    except ValueError as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{root}: {e}") from None  # a mismatch between components


def _config(root: Path, component: str, cls):
    """One component's config; an error names its file (there are two super-res and three scheduler configs)."""
    path = root / component / CONFIG_FILES.get(cls, "config.json")
    data = read_json(path)
    try:
        return cls.from_dict(data)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None


def build_module(config: KarloConfig, component: str) -> torch.nn.Module:
    """An uninitialised network for ``component`` (on whatever default device is active)."""
    cfg = getattr(config, component)
    return MODULE_CLASSES[type(cfg)](cfg)


def fetch_stages(
    path_or_url: str | Path, stages: Sequence[str] | None, storage_options: dict | None = None
) -> tuple[Path, list[str]]:
    """A local folder with what ``stages`` need (None: every stage the repo has), and those components."""
    unknown = set(stages or ()) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    classes = repo_classes(read_json(local_repo(path_or_url, [], storage_options) / "model_index.json"))
    available = [s for s in STAGES if set(STAGE_COMPONENTS[s]) <= set(classes)]
    stages = available if stages is None else stages
    if set(stages) - set(available):
        raise ValueError(f"stages {sorted(set(stages) - set(available))} are not in this model; it has {available}")
    wanted = [c for s in STAGES if s in stages for c in STAGE_COMPONENTS[s]]
    wanted = list(dict.fromkeys(wanted))  # the variations stage and the prior share the text encoder
    return fetch_components(path_or_url, wanted, storage_options)[0], wanted


def load_modules(root: Path, config: KarloConfig, components: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The networks among ``components`` with their weights from the local repo ``root``, loaded strictly."""
    modules: dict[str, torch.nn.Module] = {}
    for comp in components:
        folder = root / comp
        if comp == "image_encoder":  # drops the text half of a whole CLIPModel checkpoint
            modules[comp] = clip_vision.load_vision_encoder(config.image_encoder, folder)
            continue
        if comp in MODULE_CONFIGS:
            with torch.device("meta"):  # no time or memory spent on an init that the checkpoint overwrites
                module = build_module(config, comp)
        elif comp == "text_encoder":
            module = text_lib.build_text_encoder(config.text_encoder)
        else:
            continue  # the tokenizer, schedulers and image processor have no weights
        state, source = load_state_dict(folder)
        load_into(module, state, source)
        modules[comp] = module
    return modules


@torch.no_grad()
def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded init of every parameter: N(0, 0.25/fan_in) weights, small biases, norms near identity.

    Done by hand rather than by torch's default init so the same seed gives the same model everywhere. The
    gain is below 1 so that the random networks are not chaotic: with unit gain, guidance at scale 8 and the
    1/sqrt(alpha_bar) of early steps amplify float rounding differences (batch size, BLAS kernels) into
    several uint8 levels, which would hide real determinism bugs in tests.
    """
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(p.shape, generator=generator, device=generator.device)
        if "norm" in name or "layer_norm" in name or name.endswith("clip_std"):
            p.copy_(1.0 + 0.1 * noise if leaf != "bias" else 0.02 * noise)
            if name.endswith("clip_std"):
                p.abs_()
        elif leaf == "bias" or p.dim() < 2:
            p.copy_(0.02 * noise)
        else:
            fan_in = p[0].numel()
            p.copy_(0.5 * noise / math.sqrt(fan_in))


def random_modules(config: KarloConfig, device: torch.device | str, seed: int) -> dict[str, torch.nn.Module]:
    """Every text-to-image network of ``config`` with seeded random weights, built on ``device``. Weights are drawn
    with a generator on ``device``, so the same seed gives other weights on another device type."""
    generator = torch.Generator(device).manual_seed(seed)
    modules: dict[str, torch.nn.Module] = {}
    with torch.device(device):
        for comp in MODULE_CONFIGS:
            modules[comp] = build_module(config, comp)
        modules["text_encoder"] = text_lib.build_text_encoder(config.text_encoder)
    for module in modules.values():
        randomize_(module, generator)
    return modules


def clip_tokenizer():
    """The CLIP tokenizer with the real vocabulary, for models built in memory (a few MB of vocabulary files)."""
    with tempfile.TemporaryDirectory(prefix="karlo-tokenizer-") as tmp:
        text_lib.write_clip_vocabulary(Path(tmp))
        return text_lib.load_tokenizer(tmp)
