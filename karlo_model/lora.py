"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) merged
into the weights of the prior and the UNets: ``W' = W + scale * (alpha / r) * B A`` for every adapted Linear or
Conv2d, with A the ``down`` factor (r, in[, kh, kw]) and B the ``up`` factor (out, r[, 1, 1]).

Adapters come in three key styles, mapped to our module names here and nowhere else (``network_of``, ``module_name``):

* PEFT: a folder with ``adapter_config.json`` (``r``, ``lora_alpha``, ``alpha_pattern``, ``use_rslora``) and
  ``adapter_model.safetensors``, keys ``[base_model.model.]<network>.<module>.lora_A.weight`` / ``lora_B.weight``;
  a single file in these names (diffusers' current LoRA files) has alpha = r unless it holds ``alpha`` tensors;
* diffusers: ``<network>.<module>.lora.down.weight`` / ``lora.up.weight`` with a ``<network>.<module>.alpha``;
* kohya: ``lora_<network>_<module with "." as "_">.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``.

``<network>`` is ``prior``, ``decoder``, ``super_res_first`` or ``super_res_last``; ``unet`` (what diffusers' and
kohya's trainers call the text-conditioned UNet) is the decoder, or the adapter's ``network`` when it names one, as
are keys without a network prefix. Module names are those of our networks, which are the diffusers checkpoints'.
A missing alpha means alpha = r (scaling 1), as diffusers and kohya read it.

Adapters are merged into the weights once, when a network loads, rather than kept as side branches (peft's
injected layers): sampling runs the network 2 x (steps) times per image with guidance, and a merged network costs
exactly the base network's time and memory, whatever the number of adapters. The merge is peft's own
(``inject_adapter_in_model``, ``set_peft_model_state_dict``, ``merge``), so the arithmetic is that of the library
the PEFT format comes from.

Loading is strict: a key in no known style, a module the network does not have or that is neither a Linear nor a
Conv2d, a factor of the wrong shape or without its partner is refused, naming the keys.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import fsspec
import torch
from safetensors.torch import load_file
from torch import nn

from .config import KarloConfig
from .fetch import is_remote, local_copy, local_file
from .repo import build_module
from .weights import WeightsError, file_digest, load_torch_file

NETWORKS = ("prior", "decoder", "super_res_first", "super_res_last")
UNET = "unet"  # the decoder, or the adapter's own network
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# (module reference, factor): "A"/"down" is the down factor, "B"/"up" the up factor.
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<ref>.+)\.lora_(?P<part>A|B)\.weight$")
_DIFFUSERS_KEY = re.compile(r"^(?P<ref>.+)\.lora[._](?P<part>down|up)\.weight$")
_ALPHA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<ref>.+)\.alpha$")


class AdapterError(WeightsError):
    """An adapter that cannot be applied to the model; the message names the file and the keys."""

    kind = "adapter"


@dataclass(frozen=True)
class Adapter:
    """One adapter to merge: where it is, how strongly, and the network of keys that name none."""

    source: str  # a .safetensors (or weights-only .bin/.pt) file or a PEFT folder; local path or fsspec URL
    scale: float = 1.0
    network: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise AdapterError("an adapter needs a path or URL")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise AdapterError(f"adapter {self.source}: scale must be a finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.network is not None and self.network not in NETWORKS:
            raise AdapterError(f"adapter {self.source}: network must be one of {list(NETWORKS)}, got {self.network!r}")


_TRAILING_SCALE = re.compile(r"^(?P<source>.+):(?P<scale>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


def parse_adapter(text: str) -> Adapter:
    """``PATH|URL[:SCALE]``: the scale only from a trailing ``:<number>``, since URLs hold ':' themselves."""
    match = _TRAILING_SCALE.match(text)
    if match is None:
        return Adapter(text)
    return Adapter(match["source"], float(match["scale"]))


@dataclass(frozen=True)
class Factors:
    """One adapted module: ``W += scaling * up @ down`` (over the flattened input dimensions of a Conv2d)."""

    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    alpha: float  # scaling = alpha / r before the adapter's scale

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter's local files (remote ones copied into the per-machine cache)."""

    weights: Path
    config: Path | None  # adapter_config.json of a PEFT folder


def fetch(adapter: Adapter, storage_options: dict | None = None) -> AdapterFiles:
    """The adapter's files on this machine: a remote adapter is copied once per machine, as models are."""
    fs, path = fsspec.core.url_to_fs(adapter.source.removeprefix("file://"), **(storage_options or {}))
    path = path.rstrip("/")
    if not fs.exists(path):
        raise AdapterError(f"adapter not found: {adapter.source}")
    if fs.isdir(path):
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        weights = next((w for w in PEFT_WEIGHTS if w in names), None)
        if PEFT_CONFIG not in names or weights is None:
            raise AdapterError(f"adapter folder {adapter.source}: expected a PEFT adapter ({PEFT_CONFIG} and "
                               f"{' or '.join(PEFT_WEIGHTS)})")
        root = (local_copy(adapter.source, lambda fs, root: [PEFT_CONFIG, weights], storage_options)
                if is_remote(adapter.source) else Path(path))
        return AdapterFiles(root / weights, root / PEFT_CONFIG)
    if not path.endswith(WEIGHT_SUFFIXES):
        raise AdapterError(f"adapter {adapter.source}: expected a PEFT folder or a file ending in "
                           f"{', '.join(WEIGHT_SUFFIXES)}")
    return AdapterFiles(local_file(adapter.source, storage_options), None)


def digest(adapter: Adapter, storage_options: dict | None = None) -> dict[str, str]:
    """sha256 of the adapter's weights (and of a PEFT adapter's config, which sets its alpha), for manifests."""
    files = fetch(adapter, storage_options)
    out = {"sha256": file_digest(files.weights)}
    if files.config is not None:
        out["config_sha256"] = file_digest(files.config)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
            raise AdapterError(f"{path}: not a valid safetensors file ({e})") from None
    state = load_torch_file(path, error=AdapterError)  # tensors only: nothing else is unpickled
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path}: expected a flat mapping of names to tensors")
    return state


def _peft_alphas(config_path: Path) -> tuple[float, dict[str, float], bool]:
    """(lora_alpha, alpha_pattern, use_rslora) of a PEFT LoraConfig; features that change the merge's algebra are
    refused rather than ignored."""
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_path} is not valid JSON: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: a {config['peft_type']} adapter; only LoRA adapters are supported")
    unsupported = [k for k, off in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False),
                                    ("lora_bias", False)) if config.get(k, off) != off]
    if unsupported:
        raise AdapterError(f"{config_path}: unsupported LoRA options {unsupported} (plain LoRA only)")
    return float(config.get("lora_alpha", config.get("r", 8))), dict(config.get("alpha_pattern") or {}), bool(
        config.get("use_rslora", False))


def network_of(ref: str, adapter: Adapter) -> tuple[str, str, bool]:
    """(network, the rest of the reference, whether the rest is kohya's flattened name) of a key's module
    reference, in any of the three styles. Raises KeyError(ref) when it names no network."""
    own = adapter.network or "decoder"
    if ref.startswith("lora_") and "." not in ref:  # kohya: lora_<network>_<module with "_" for ".">
        flat = ref[len("lora_"):]
        prefix = next((n for n in sorted((*NETWORKS, UNET), key=len, reverse=True) if flat.startswith(n + "_")), None)
        if prefix is None:
            raise KeyError(ref)
        return (own if prefix == UNET else prefix), flat[len(prefix) + 1:], True
    first, _, rest = ref.partition(".")
    if first in (*NETWORKS, UNET) and rest:
        return (own if first == UNET else first), rest, False
    if adapter.network is not None:
        return adapter.network, ref, False
    raise KeyError(ref)


def flat_names(network: nn.Module) -> dict[str, str]:
    """kohya's name of each module of ``network`` ("." -> "_"), to ours."""
    return {name.replace(".", "_"): name for name, _ in network.named_modules() if name}


def module_name(network: nn.Module, rest: str, flat: Mapping[str, str] | None) -> str:
    """Our name of the module a key names (a kohya name looked up in ``flat``, from ``flat_names``); KeyError
    for no module of ``network``."""
    if flat is not None:
        rest = flat[rest]
    try:
        network.get_submodule(rest)
    except AttributeError:
        raise KeyError(rest) from None
    return rest


def read(
    adapter: Adapter, networks: Mapping[str, nn.Module], model_networks: Sequence[str],
    storage_options: dict | None = None,
) -> dict[str, dict[str, Factors]]:
    """The adapter's factors by network and module name, checked against ``networks`` (meta-device modules will
    do). Keys for a network of the model (``model_networks``) that is not among ``networks`` are skipped (another
    stage loads it); any other mismatch raises AdapterError naming the keys."""
    files = fetch(adapter, storage_options)
    state = _tensors(files.weights)
    alpha, alpha_pattern, rslora = _peft_alphas(files.config) if files.config else (None, {}, False)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    keys_of: dict[tuple[str, str], list[str]] = {}
    unknown_style, unknown_module, unknown_network = [], [], []
    kohya_names: dict[str, dict[str, str]] = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.match(key) or _DIFFUSERS_KEY.match(key) or _ALPHA_KEY.match(key)
        if match is None:
            unknown_style.append(key)
            continue
        found = match.groupdict().get("part")  # None for an alpha
        part = {"A": "down", "B": "up", None: "alpha"}.get(found, found)
        try:
            network, rest, kohya = network_of(match["ref"], adapter)
        except KeyError:
            unknown_network.append(key)
            continue
        if network not in model_networks:
            unknown_network.append(key)
            continue
        if network not in networks:
            continue  # another stage's network, checked where it loads (and on the driver)
        if kohya and network not in kohya_names:
            kohya_names[network] = flat_names(networks[network])
        try:
            where = network, module_name(networks[network], rest, kohya_names[network] if kohya else None)
        except KeyError:
            unknown_module.append(key)
            continue
        parts.setdefault(where, {})[part] = tensor
        keys_of.setdefault(where, []).append(key)
    out: dict[str, dict[str, Factors]] = {}
    shapes, incomplete, modules = [], [], []
    for (network, name), factor in parts.items():
        keys = ", ".join(sorted(keys_of[(network, name)]))
        module = networks[network].get_submodule(name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            modules.append(f"{keys} ({network}.{name} is a {type(module).__name__})")
            continue
        if "down" not in factor or "up" not in factor:
            incomplete.append(keys)
            continue
        down, up = factor["down"], factor["up"]
        expected = _factor_shapes(module, down.shape[0])
        if (tuple(down.shape), tuple(up.shape)) != expected:
            shapes.append(f"{keys}: file {tuple(down.shape)}, {tuple(up.shape)} vs model {expected[0]}, {expected[1]}")
            continue
        r = down.shape[0]
        if "alpha" in factor:
            if factor["alpha"].numel() != 1:
                shapes.append(f"{keys}: alpha of shape {tuple(factor['alpha'].shape)}, expected one number")
                continue
            a = float(factor["alpha"].double().item())
        elif alpha is not None:
            a = float(_pattern_value(alpha_pattern, f"{network}.{name}", name, alpha))
        else:
            a = float(r)
        if rslora:
            a *= math.sqrt(r)  # rank-stabilised scaling alpha / sqrt(r), written as alpha' / r
        out.setdefault(network, {})[name] = Factors(down, up, a)
    problems = {
        "keys in no LoRA style": unknown_style,
        f"keys for no network of the model (which has {', '.join(model_networks)})": unknown_network,
        "keys for no module of the network": unknown_module,
        "keys of modules that are neither Linear nor Conv2d": modules,
        "mis-shaped keys": shapes,
        "keys without their down/up partner": incomplete,
    }
    found = [f"{label}: {_shown(keys)}" for label, keys in problems.items() if keys]
    if found:
        raise AdapterError(f"adapter {adapter.source} does not match the model: " + "; ".join(found))
    return out


def _factor_shapes(module: nn.Linear | nn.Conv2d, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes of a rank-r adapter of ``module``: a Conv2d's down factor is a conv of its kernel size,
    the up factor a 1x1 conv (LoCon, and peft's LoRA Conv2d)."""
    if isinstance(module, nn.Linear):
        return (r, module.in_features), (module.out_features, r)
    return (r, module.in_channels, *module.kernel_size), (module.out_channels, r, 1, 1)


def _pattern_value(pattern: Mapping[str, float], full: str, name: str, default: float) -> float:
    """A PEFT ``alpha_pattern`` entry for a module (a key is a regex matching the end of its name), else the
    default. peft matches against the name within the model it adapted, which is ours with or without the network."""
    for key, value in pattern.items():
        if any(re.match(rf"(.*\.)?({key})$", n) for n in (full, name)):
            return value
    return default


def _shown(keys: list[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")


def merge(network: nn.Module, factors: Mapping[str, Factors], scale: float, name: str = "lora") -> None:
    """Merge one adapter's ``factors`` into ``network`` in place, with peft: inject its layers, load the factors,
    fold them in (W += scale * alpha / r * B A) and put the base layers back, leaving a plain network."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    ranks = Counter(f.rank for f in factors.values())
    alphas = Counter(f.alpha for f in factors.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    # Modules whose rank or alpha is not the most common one's are named in full (a regex matching the name only).
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(factors),
        rank_pattern={f"^{re.escape(n)}": f.rank for n, f in factors.items() if f.rank != r},
        alpha_pattern={f"^{re.escape(n)}": f.alpha for n, f in factors.items() if f.alpha != alpha},
    )
    inject_adapter_in_model(config, network, adapter_name=name)
    state = {f"{n}.lora_{p}.weight": t for n, f in factors.items() for p, t in (("A", f.down), ("B", f.up))}
    result = set_peft_model_state_dict(network, state, adapter_name=name)
    if result.unexpected_keys:
        raise AdapterError(f"peft did not place the keys {_shown(result.unexpected_keys)}")
    for path, layer in list(network.named_modules()):
        if not isinstance(layer, LoraLayer):
            continue
        layer.set_scale(name, scale)  # scaling = scale * alpha / r
        layer.merge(adapter_names=[name])
        parent, _, child = path.rpartition(".")
        setattr(network.get_submodule(parent), child, layer.get_base_layer())
    del network.peft_config  # set by inject_adapter_in_model; the network is plain again


def apply(
    modules: dict[str, nn.Module], adapters: Sequence[Adapter], model_networks: Sequence[str],
    storage_options: dict | None = None,
) -> None:
    """Merge ``adapters``, in order, into the loaded networks among ``modules``; ``model_networks`` are the
    networks the model has (an adapter's keys for one that is not loaded here are another stage's)."""
    networks = {n: modules[n] for n in NETWORKS if n in modules}
    for i, adapter in enumerate(adapters):
        for network, factors in read(adapter, networks, model_networks, storage_options).items():
            with torch.no_grad():
                merge(networks[network], factors, adapter.scale, name=f"lora{i}")


def model_networks(config: KarloConfig) -> tuple[str, ...]:
    """The networks of ``config`` that adapters may target (an image-variations model has no prior)."""
    return tuple(n for n in NETWORKS if getattr(config, n) is not None)


def check(config: KarloConfig, adapters: Sequence[Adapter], storage_options: dict | None = None) -> None:
    """Refuse adapters that do not match ``config``'s networks, built on the meta device: no weights are loaded,
    so a bad adapter fails in seconds, before any stage loads the model."""
    names = model_networks(config)
    with torch.device("meta"):
        networks = {n: build_module(config, n) for n in names}
    for adapter in adapters:
        read(adapter, networks, names, storage_options)
