"""Training each component of the small Karlo (preset ``small``) on the synthetic world, in plain PyTorch.

The order is Karlo's: CLIP first (contrastive, text and vision towers together), then, with CLIP frozen, the prior
on its image embeddings, the 64 px decoder conditioned on them and on the text as Karlo's is (text_proj's extra
context tokens and time-embedding offset), and the 64 -> 256 px super-resolution networks on random crops
(``super_res_last`` is ``super_res_first`` fine-tuned on the final timesteps, which is all the sampler asks of
it). Every draw comes from generators seeded from one seed; the diffusion networks are kept as an exponential
moving average of their weights, the copy that is saved.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import text as text_lib
from ..clip_vision import build_vision_encoder
from ..config import ImageProcessorConfig, KarloConfig
from ..prior import PriorTransformer
from ..repo import build_module
from ..sampling import upsample
from ..scheduler import UnCLIPSchedule
from ..text_proj import TextProjection
from ..unet import UNet
from . import world
from .diffusion import noised, predicted_x0, sample_timesteps, variational_bound

Log = Callable[[str], None]


@dataclass(frozen=True)
class Budget:
    """How much of everything. The defaults trained in 39 minutes on 2 CPU cores, and come to about 58 at the
    per-step times of a slower 2-core machine at these batch sizes (CLIP 0.31 s, prior 0.34 s, decoder 1.03 s,
    super-res 0.6 s; docs/benchmarks.md)."""

    scenes: int = 20_000  # training scenes rendered once for CLIP, the prior and the decoder
    clip_steps: int = 2_000
    clip_batch: int = 128
    clip_sibling_fraction: float = 0.5  # of each CLIP batch drawn as whole groups of shape siblings (make_corpus)
    prior_steps: int = 1_000
    prior_batch: int = 64
    decoder_steps: int = 1_800
    decoder_batch: int = 32
    super_res_steps: int = 800
    super_res_batch: int = 24
    super_res_crop: int = 64  # the upsamplers see crops of a quarter of the output side, as unCLIP's did
    super_res_sampler_steps: int = 7  # the super-res steps the pipeline samples with (Karlo's fixed 7)
    super_res_visited_fraction: float = 0.75  # of super_res_first's draws at those steps' timesteps, else uniform
    super_res_last_steps: int = 150
    super_res_last_timesteps: int = 100  # super_res_last is tuned on t < this; the sampler's last step is t = 0
    evaluation_scenes: int = 100  # held-out captions the written model is judged on (karlo_model.small.evaluate)
    evaluation_steps: tuple[int, int, int] = (25, 25, 7)  # prior, decoder, super-res: the pipeline's defaults

    @classmethod
    def smoke(cls) -> "Budget":
        """A few steps of everything: proves the recipe end to end in about a minute."""
        return cls(scenes=256, clip_steps=20, clip_batch=32, prior_steps=20, prior_batch=32, decoder_steps=10,
                   decoder_batch=8, super_res_steps=6, super_res_batch=4, super_res_last_steps=3,
                   evaluation_scenes=4, evaluation_steps=(2, 2, 2))


@dataclass
class Corpus:
    """The training scenes and their 64 px renders (the decoder's targets and CLIP's inputs), in groups of shape
    siblings: scenes alike in everything (layout included) but the shape, one per shape whose triple is trained."""

    scenes: list[world.Scene]
    images: torch.Tensor  # (N, 3, 64, 64) uint8
    groups: list[list[int]]  # indices into scenes; every scene is in exactly one group
    attributes: torch.Tensor = field(init=False)  # (N, 5) int64 value indices, in world.ATTRIBUTES order

    def __post_init__(self) -> None:
        self.attributes = torch.tensor([attribute_indices(s) for s in self.scenes])


def attribute_indices(scene: world.Scene) -> tuple[int, ...]:
    return (scene.count, list(world.SIZES).index(scene.size), world.COLOUR_NAMES.index(scene.colour),
            world.SHAPES.index(scene.shape), world.BACKGROUND_NAMES.index(scene.background))


def downscaled(image: np.ndarray, size: int = 64) -> np.ndarray:
    """A 256 px render at the decoder's size: Pillow's bicubic, as the CLIP image processor resizes."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def make_corpus(n: int, rng: np.random.Generator) -> Corpus:
    """``n`` scenes: random training scenes, each with its shape siblings (the last group may be cut short)."""
    scenes: list[world.Scene] = []
    groups: list[list[int]] = []
    while len(scenes) < n:
        base = world.sample_scene(rng)
        siblings = [dataclasses.replace(base, shape=shape) for shape in world.SHAPES
                    if (base.colour, shape, base.background) not in world.HELD_OUT][: n - len(scenes)]
        groups.append(list(range(len(scenes), len(scenes) + len(siblings))))
        scenes += siblings
    images = np.stack([downscaled(world.render(s)) for s in scenes])  # (N, 64, 64, 3)
    return Corpus(scenes, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), groups)


def clip_batch(corpus: Corpus, size: int, sibling_fraction: float, rng: np.random.Generator) -> torch.Tensor:
    """(size,) scene indices: whole sibling groups for ``sibling_fraction`` of the batch, random scenes for the rest.
    Random batches of 128 hold few pairs that differ in shape alone, so the contrastive loss barely asks the towers
    to tell shapes apart; siblings are exactly those pairs (the caption naming the shape is the only match)."""
    want = round(size * sibling_fraction)
    grouped: list[int] = []
    while len(grouped) < want:
        grouped += corpus.groups[rng.integers(len(corpus.groups))]
    grouped = grouped[:want]
    rest = rng.integers(len(corpus.scenes), size=size - len(grouped)).tolist()
    return torch.tensor(grouped + rest)


def draw_keep(rng: np.random.Generator) -> frozenset[str]:
    """Which attributes a training caption names: all of them half the time, otherwise each with p = 0.6."""
    if rng.random() < 0.5:
        return frozenset(world.ATTRIBUTES)
    return frozenset(a for a in world.ATTRIBUTES if rng.random() < 0.6)


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def clip_pixels(images: torch.Tensor, processor: ImageProcessorConfig) -> torch.Tensor:
    """uint8 (B, 3, 64, 64), already at the crop size -> normalised pixel values (karlo_model.clip_vision)."""
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return ((images.double() * processor.rescale_factor).float() - mean) / std


class Captions:
    """Token ids and frozen-encoder encodings of captions, each computed once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: dict[str, torch.Tensor] = {}
        self._encodings: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def ids(self, captions: list[str]) -> torch.Tensor:  # (B, 77) int64
        missing = sorted(set(captions) - set(self._ids))
        if missing:
            ids, _, _ = text_lib.tokenize(self.tokenizer, missing)
            self._ids.update(zip(missing, ids))
        return torch.stack([self._ids[c] for c in captions])

    def encode(self, encoder, captions: list[str]) -> text_lib.TextEncoding:
        """The frozen text encoder's outputs for ``captions`` ((B, D), (B, 77, D), (B, 77))."""
        missing = sorted(set(captions) - set(self._encodings))
        for i in range(0, len(missing), 256):
            chunk = missing[i : i + 256]
            enc = text_lib.encode(self.tokenizer, encoder, chunk, torch.device("cpu"))
            self._encodings.update(zip(chunk, zip(enc.embeds, enc.hidden, enc.mask)))
        embeds, hidden, mask = (torch.stack(x) for x in zip(*(self._encodings[c] for c in captions)))
        return text_lib.TextEncoding(embeds, hidden, mask, np.zeros(len(captions), dtype=bool))


class Ema:
    """Exponential moving average of a network's weights, with the usual warm-up of the decay."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.average = copy.deepcopy(net).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.average.parameters(), net.parameters()):
            avg.lerp_(p, 1 - d)


def optimiser(params, lr: float, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up over 5% of the steps and a cosine decay to a tenth."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Progress:
    """Losses averaged over the last ``every`` steps, logged with the elapsed time."""

    def __init__(self, name: str, steps: int, log: Log, every: int = 100):
        self.name, self.steps, self.log, self.every = name, steps, log, every
        self.start = time.monotonic()
        self.window: list[float] = []
        self.last = float("nan")

    def step(self, i: int, loss: float) -> None:
        self.window.append(loss)
        if (i + 1) % self.every == 0 or i + 1 == self.steps:
            self.last = sum(self.window) / len(self.window)
            self.window.clear()
            self.log(f"{self.name} {i + 1}/{self.steps} loss {self.last:.4f} ({time.monotonic() - self.start:.0f} s)")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates it."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def mixed_precision() -> contextlib.AbstractContextManager:
    """bfloat16 autocast for the UNets' forward passes (weights, optimiser and losses stay float32) where the CPU
    computes bfloat16 natively; float32 elsewhere. The decoder step at batch 32 on 2 cores: 1.46 s in float32 and
    1.03 s in bfloat16 on the machine of the small-shapes-v1 run; 1.09 s in float32 and 2.75 s in bfloat16 on an
    AVX-512 CPU without BF16 instructions (docs/benchmarks.md)."""
    if native_bfloat16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_loop(name: str, steps: int, params, lr: float, loss_fn: Callable[[int], torch.Tensor], log: Log,
                ema: Ema | None = None, net: torch.nn.Module | None = None) -> dict[str, float]:
    opt, schedule = optimiser(params, lr, steps)
    progress = Progress(name, steps, log)
    for i in range(steps):
        loss = loss_fn(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        if ema is not None:
            ema.update(net)
        progress.step(i, loss.item())
    return {"steps": steps, "seconds": round(progress.seconds, 1), "final_loss": round(progress.last, 5)}


def train_clip(config: KarloConfig, vision_config: dict, processor: ImageProcessorConfig, corpus: Corpus,
               captions: Captions, budget: Budget, seed: int, log: Log):
    """Contrastive text and vision towers. A caption naming only some attributes matches every image in the
    batch that has them, so the targets are the batch's match matrix, normalised (no false negatives)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    text = text_lib.build_text_encoder(config.text_encoder).train()
    vision = build_vision_encoder(vision_config).train()
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*text.parameters(), *vision.parameters(), log_scale]

    def loss_fn(_: int) -> torch.Tensor:
        idx = clip_batch(corpus, budget.clip_batch, budget.clip_sibling_fraction, rng)
        keeps = [draw_keep(rng) for _ in range(len(idx))]
        words = [corpus.scenes[i].caption(k) for i, k in zip(idx.tolist(), keeps)]
        kept = torch.tensor([[a in k for a in world.ATTRIBUTES] for k in keeps])  # (B, 5)
        attrs = corpus.attributes[idx]  # (B, 5)
        # match[i, j]: image i has every attribute that caption j names.
        same = attrs[:, None, :] == attrs[None, :, :]  # (B, B, 5)
        match = (same | ~kept[None, :, :]).all(-1).float()
        img = F.normalize(vision(pixel_values=clip_pixels(corpus.images[idx], processor)).image_embeds, dim=-1)
        txt = F.normalize(text(input_ids=captions.ids(words)).text_embeds, dim=-1)
        logits = log_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # (B images, B captions)
        image_to_text = F.cross_entropy(logits, match / match.sum(1, keepdim=True))
        text_to_image = F.cross_entropy(logits.T, (match / match.sum(0, keepdim=True)).T)
        return (image_to_text + text_to_image) / 2

    record = _train_loop("clip", budget.clip_steps, params, 2e-3, loss_fn, log)
    record["logit_scale"] = round(float(log_scale.detach().exp()), 2)
    return text.eval().requires_grad_(False), vision.eval().requires_grad_(False), record


@torch.no_grad()
def image_embeddings(vision, processor: ImageProcessorConfig, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, 64, 64) uint8 -> (N, D) projected CLIP image embeddings, as the image encoder stage computes them."""
    return torch.cat([vision(pixel_values=clip_pixels(images[i : i + 512], processor)).image_embeds
                      for i in range(0, len(images), 512)])


def _caption_batch(corpus: Corpus, idx: torch.Tensor, rng: np.random.Generator, drop: float) -> list[str]:
    """Training captions of the scenes ``idx``; each dropped to "" (guidance's unconditional text) with p = drop."""
    return ["" if rng.random() < drop else corpus.scenes[i].caption(draw_keep(rng)) for i in idx.tolist()]


def train_prior(config: KarloConfig, corpus: Corpus, embeds: torch.Tensor, text, captions: Captions,
                budget: Budget, seed: int, log: Log) -> tuple[PriorTransformer, dict[str, float]]:
    """x0-prediction of the normalised image embedding from the text; 10% of captions dropped for guidance."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    prior = build_module(config, "prior").train()
    assert isinstance(prior, PriorTransformer)
    with torch.no_grad():
        prior.clip_mean.copy_(embeds.mean(0, keepdim=True))
        prior.clip_std.copy_(embeds.std(0, keepdim=True))
    prior.clip_mean.requires_grad_(False)
    prior.clip_std.requires_grad_(False)
    target = (embeds - prior.clip_mean) / prior.clip_std  # (N, D)
    schedule = UnCLIPSchedule(config.prior_scheduler)
    ema = Ema(prior, 0.999)
    n = len(corpus.scenes)

    def loss_fn(_: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(n, size=budget.prior_batch))
        enc = captions.encode(text, _caption_batch(corpus, idx, rng, drop=0.1))
        z = target[idx]
        t = sample_timesteps(len(idx), gen)
        x_t = noised(schedule, z, t, torch.randn(z.shape, generator=gen))
        return F.mse_loss(prior(x_t, t, enc.embeds, enc.hidden, enc.mask), z)

    params = [p for p in prior.parameters() if p.requires_grad]
    record = _train_loop("prior", budget.prior_steps, params, 1e-3, loss_fn, log, ema, prior)
    return ema.average, record


def train_decoder(config: KarloConfig, corpus: Corpus, embeds: torch.Tensor, text, captions: Captions,
                  budget: Budget, seed: int, log: Log) -> tuple[TextProjection, UNet, dict[str, float]]:
    """text_proj + decoder on noise MSE plus the variational bound plus the MSE of the implied x0 (as the
    super-res networks are trained, and for the same reason: see train_super_res). As in unCLIP, the image
    embedding is replaced by the learned unconditional one 10% of the time; the caption is dropped to "" 30% of the
    time (unCLIP drops it 50%), so that more of this short training sees the shape named."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    text_proj, decoder = build_module(config, "text_proj").train(), build_module(config, "decoder").train()
    assert isinstance(text_proj, TextProjection) and isinstance(decoder, UNet)
    both = torch.nn.ModuleDict({"text_proj": text_proj, "decoder": decoder})
    schedule = UnCLIPSchedule(config.decoder_scheduler)
    extra = config.text_proj.clip_extra_context_tokens
    ema = Ema(both, 0.998)
    n = len(corpus.scenes)

    def loss_fn(_: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(n, size=budget.decoder_batch))
        b = len(idx)
        enc = captions.encode(text, _caption_batch(corpus, idx, rng, drop=0.3))
        dropped = torch.from_numpy(rng.random(b) < 0.1)[:, None]
        image_embeds = torch.where(dropped, text_proj.unconditional_image_embeds(b, torch.float32), embeds[idx])
        context, additive = text_proj(image_embeds, enc.embeds, enc.hidden)
        mask = F.pad(enc.mask, (extra, 0), value=True)
        x0 = to_signed(corpus.images[idx])
        t = sample_timesteps(b, gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = noised(schedule, x0, t, noise)
        with mixed_precision():
            out = decoder(x_t, t, context=context, context_mask=mask, class_labels=additive)
        eps, variance = out.float().chunk(2, dim=1)
        implied = predicted_x0(schedule, x_t, eps, t).clamp(-1, 1)
        return (F.mse_loss(eps, noise) + variational_bound(schedule, eps.detach(), variance, x_t, x0, t)
                + F.mse_loss(implied, x0))

    record = _train_loop("decoder", budget.decoder_steps, list(both.parameters()), 1e-3, loss_fn, log, ema, both)
    return ema.average["text_proj"], ema.average["decoder"], record


def super_res_batch(rng: np.random.Generator, gen: torch.Generator, batch: int, crop: int,
                    size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh scenes as (target crops, low-resolution crops), both (B, 3, crop, crop) in [-1, 1]: the 256 px render
    and its 64 px version upsampled as the sampler does, with a little noise so that the upsampler forgives the
    decoder's imperfections."""
    scenes = [world.sample_scene(rng) for _ in range(batch)]
    full = np.stack([world.render(s, size) for s in scenes])  # (B, 256, 256, 3)
    small = np.stack([downscaled(im) for im in full])  # (B, 64, 64, 3)
    target = to_signed(torch.from_numpy(full).permute(0, 3, 1, 2))
    low = to_signed(torch.from_numpy(small).permute(0, 3, 1, 2))
    low = low + torch.rand(batch, 1, 1, 1, generator=gen) * 0.06 * torch.randn(low.shape, generator=gen)
    low = upsample(low, size)
    top, left = (int(v) for v in rng.integers(size - crop + 1, size=2))
    window = (slice(None), slice(None), slice(top, top + crop), slice(left, left + crop))
    return target[window], low[window]


def train_super_res(config: KarloConfig, budget: Budget, seed: int, log: Log) -> tuple[UNet, UNet, dict]:
    """super_res_first mostly on the timesteps the sampler visits, then a copy of it tuned on the last ones as
    super_res_last."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    schedule = UnCLIPSchedule(config.super_res_scheduler)
    size = config.image_size

    # The sampler runs super_res_first only at the respaced timesteps of its few steps (Karlo asserts 7), where a
    # small network's noise error is multiplied into x0 by sqrt(1 - a) / sqrt(a): most of its training goes there.
    visited = torch.tensor(schedule.timesteps(budget.super_res_sampler_steps)[:-1])

    def draw_first(n: int) -> torch.Tensor:
        uniform = sample_timesteps(n, gen)
        on_sampler = visited[torch.randint(len(visited), (n,), generator=gen)]
        return torch.where(torch.rand(n, generator=gen) < budget.super_res_visited_fraction, on_sampler, uniform)

    def draw_last(n: int) -> torch.Tensor:
        return sample_timesteps(n, gen, high=budget.super_res_last_timesteps)

    def make_loss(net: UNet, draw: Callable[[int], torch.Tensor]) -> Callable[[int], torch.Tensor]:
        def loss_fn(_: int) -> torch.Tensor:
            target, low = super_res_batch(rng, gen, budget.super_res_batch, budget.super_res_crop, size)
            t = draw(len(target))
            noise = torch.randn(target.shape, generator=gen)
            x_t = noised(schedule, target, t, noise)
            with mixed_precision():
                eps = net(torch.cat([x_t, low], dim=1), t).float()
            # The x0 term, clipped as the sampler clips it: at the first steps the sampler multiplies any error in
            # the noise's mean into the image's colour, which noise MSE alone leaves to drift to gray.
            x0 = predicted_x0(schedule, x_t, eps, t).clamp(-1, 1)
            return F.mse_loss(eps, noise) + F.mse_loss(x0, target)
        return loss_fn

    first = build_module(config, "super_res_first").train()
    ema = Ema(first, 0.998)
    record = {"first": _train_loop("super_res_first", budget.super_res_steps, list(first.parameters()), 1e-3,
                                   make_loss(first, draw_first), log, ema, first)}
    last = copy.deepcopy(ema.average).train().requires_grad_(True)
    ema_last = Ema(last, 0.99)
    record["last"] = _train_loop("super_res_last", budget.super_res_last_steps, list(last.parameters()), 2e-4,
                                 make_loss(last, draw_last), log, ema_last, last)
    return ema.average, ema_last.average, record
