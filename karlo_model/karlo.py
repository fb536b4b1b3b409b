"""``Karlo``: load a text-to-image Karlo model and run it whole or stage by stage.

Three layers, each built on the one before:

* ``run_prior`` / ``run_decoder`` / ``run_super_res``: tensors in and out, the rows' generators and optional
  starting latents passed in (the reference-sampler tests drive these);
* ``prior_stage`` / ``image_encoder_stage`` / ``decoder_stage`` / ``super_res_stage``: the one surface the pipeline's
  stages call, each in its own process: arrays in and out, handing the next stage every row's generator state
  (pipeline.measurement stands in for exactly these in measurement mode);
* ``generate`` / ``variations``: the whole model from seeds, as diffusers' ``UnCLIPPipeline`` and
  ``UnCLIPImageVariationPipeline`` run it (the parity tests' API), with optional starting latents.

Image-to-image (karlo_model.img2img) is ``init_images`` + ``strength`` on the decoder at every layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np
import torch

from . import clip_vision, img2img
from . import lora as lora_lib
from . import text as text_lib
from .config import KarloConfig
from .fastpath import apply_fast_path, fast_by_default, network_call, state_dtype
from .noise import draw_noise, generator_states, generators_from_seeds, generators_from_states
from .prior import PriorTransformer
from .repo import clip_tokenizer, fetch_stages, load_modules, random_modules, read_repo_configs
from .results import DecoderResult, KarloOutput, PriorResult
from .sampling import Guidance, cfg_denoiser, sample_loop, to_uint8, upsample
from .scheduler import UnCLIPSchedule
from .text import TextEncoding
from .text_proj import TextProjection
from .unet import UNet

# The networks a Karlo may hold, by repo component name; each is an attribute, None when not loaded.
NETWORKS = ("text_encoder", "image_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last")
_Net = TypeVar("_Net")


def _typed(nets: dict[str, torch.nn.Module], name: str, cls: type[_Net]) -> _Net | None:
    """``nets[name]`` checked to be a ``cls``, or None when absent."""
    net = nets.get(name)
    if net is not None and not isinstance(net, cls):
        raise TypeError(f"{name}: expected a {cls.__name__}, got a {type(net).__name__}")
    return net


def _loaded(net: _Net | None, name: str) -> _Net:
    """``net``, which the method at hand needs."""
    if net is None:
        raise RuntimeError(f"this Karlo instance was loaded without {name!r}; load the stage that needs it")
    return net


class Karlo:
    """A Karlo v1 alpha text-to-image model, or the part of it that some stages need.

    ``dtype`` is the networks' dtype; with bfloat16/float16 the sampling state stays float32 (karlo_model.fastpath).
    ``fast`` turns on the fast path (channels_last UNets, cuDNN autotuning), by default only on cuda with
    bf16/fp16: it changes float rounding, so the float32 CPU path that reproduces diffusers bit for bit never
    takes it unasked. ``compile`` also compiles the denoising networks with ``torch.compile``.
    """

    def __init__(
        self,
        config: KarloConfig,
        modules: dict[str, torch.nn.Module],
        tokenizer=None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        fast: bool | None = None,
        compile: bool = False,
    ):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.state_dtype = state_dtype(dtype)
        self.fast = fast_by_default(self.device, dtype) if fast is None else fast
        self.tokenizer = tokenizer
        unknown = set(modules) - set(NETWORKS)
        if unknown:
            raise ValueError(f"unknown networks {sorted(unknown)}; a Karlo holds {NETWORKS}")
        nets = {name: m.to(device=self.device, dtype=dtype).eval().requires_grad_(False) for name, m in modules.items()}
        self.text_encoder = nets.get("text_encoder")  # CLIPTextModelWithProjection
        self.image_encoder = nets.get("image_encoder")  # CLIPVisionModelWithProjection
        self.prior = _typed(nets, "prior", PriorTransformer)
        self.text_proj = _typed(nets, "text_proj", TextProjection)
        self.decoder = _typed(nets, "decoder", UNet)
        self.super_res_first = _typed(nets, "super_res_first", UNet)
        self.super_res_last = _typed(nets, "super_res_last", UNet)
        if self.fast or compile:
            apply_fast_path(self.modules, self.device, channels_last=self.fast, compile=compile)
        self.prior_schedule = UnCLIPSchedule(config.prior_scheduler)
        self.decoder_schedule = UnCLIPSchedule(config.decoder_scheduler)
        self.super_res_schedule = UnCLIPSchedule(config.super_res_scheduler)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path_or_url: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        stages: Sequence[str] | None = None,
        storage_options: dict | None = None,
        fast: bool | None = None,
        compile: bool = False,
        lora: Sequence[lora_lib.Adapter] = (),
    ) -> "Karlo":
        """Load a diffusers-format Karlo repo (kakaobrain/karlo-v1-alpha, or its image-variations sibling) from a
        folder or fsspec URL.

        ``stages`` limits loading to the components those stages need (a decoder actor loads no prior); None
        loads every stage the repo has. ``fast`` and ``compile`` as for ``Karlo``. ``lora`` adapters are merged, in
        order, into the loaded networks they target, in the weights' own dtype before the cast to ``dtype``
        (karlo_model.lora).
        """
        root, components = fetch_stages(path_or_url, stages, storage_options)
        config = read_repo_configs(root)
        modules = load_modules(root, config, components)
        if lora:
            lora_lib.apply(modules, lora, lora_lib.model_networks(config), storage_options)
        tokenizer = text_lib.load_tokenizer(root / "tokenizer") if "text_encoder" in components else None
        return cls(config, modules, tokenizer, device, dtype, fast=fast, compile=compile)

    @classmethod
    def from_config(
        cls,
        config: KarloConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        seed: int = 0,
        fast: bool | None = None,
        compile: bool = False,
    ) -> "Karlo":
        """A random-weight model of any shape (e.g. ``preset("karlo-v1-alpha")``), built on ``device`` in memory
        with nothing written to disk: for benchmarks at full size. Weights are drawn with a generator on
        ``device``, so the same seed gives other weights on another device type."""
        modules = random_modules(config, device, seed)
        return cls(config, modules, clip_tokenizer(), device, dtype, fast=fast, compile=compile)

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """The loaded networks by component name."""
        nets = {name: getattr(self, name) for name in NETWORKS}
        return {name: net for name, net in nets.items() if net is not None}

    # ------------------------------------------------------------------ stages

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        if self.tokenizer is None:
            raise RuntimeError("this Karlo instance was loaded without the text encoder")
        return text_lib.encode(self.tokenizer, _loaded(self.text_encoder, "text_encoder"), list(prompts), self.device)

    @torch.no_grad()
    def run_prior(
        self,
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
        guidance: Guidance,
        *,
        steps: int = 25,
        negative_prompts: Sequence[str] | None = None,
        latents: torch.Tensor | None = None,  # (B, D) starting noise; drawn with the generators if None
    ) -> tuple[TextEncoding, TextEncoding, torch.Tensor]:
        """Text encoding + prior sampling. -> (text, negative text, image embeddings (B, D))."""
        n = len(prompts)
        text = self.encode_text(prompts)
        negative = self._encode_negative(negative_prompts, n)
        prior = _loaded(self.prior, "prior")
        net = self._network(prior)
        cond = dict(text_embeds=text.embeds, text_hidden=text.hidden, text_mask=text.mask)
        if bool(guidance.enabled.any()):
            uncond = dict(text_embeds=negative.embeds, text_hidden=negative.hidden, text_mask=negative.mask)
            fn = cfg_denoiser(net, cond, uncond, guidance.prior.to(self.device), guidance.enabled.to(self.device))
        else:
            fn = lambda x, t: net(x, t, **cond)  # noqa: E731
        x = self._start(latents, generators, (prior.cfg.embedding_dim,))
        return text, negative, prior.unnormalise(sample_loop(fn, self.prior_schedule, x, generators, steps))

    @torch.no_grad()
    def run_decoder(
        self,
        image_embeds: torch.Tensor,  # (B, D)
        text: TextEncoding,
        negative: TextEncoding,
        generators: Sequence[torch.Generator],
        guidance: Guidance,
        *,
        steps: int = 25,
        latents: torch.Tensor | None = None,  # (B, 3, h, w) starting noise; drawn with the generators if None
        init_images: torch.Tensor | None = None,  # (B, 3, h, w) in [-1, 1] (karlo_model.img2img.init_image_tensor)
        strength: Sequence[float] | None = None,  # (B,) in (0, 1]; 1 for rows without an init image
    ) -> torch.Tensor:
        """Text projection + 64 px decoder sampling. -> (B, 3, h, w) in [-1, 1].

        With ``init_images`` and ``strength``, image-to-image: a row of strength s < 1 runs the last
        floor(s * steps) steps, starting from its init image noised to where they begin (karlo_model.img2img)."""
        text_proj = _loaded(self.text_proj, "text_proj")
        decoder = _loaded(self.decoder, "decoder")
        net = self._network(decoder)
        b = image_embeds.shape[0]
        image_embeds = image_embeds.to(self.device, self.dtype)
        channels = decoder.cfg.in_channels
        if bool(guidance.enabled.any()):
            # Unconditional half: learned stand-in for the image embedding + the negative (default "") text.
            # One projection of [uncond; cond], as diffusers batches it: a matmul's rounding depends on its
            # batch size, and early steps amplify any difference, so this keeps sampling bit-identical.
            context, additive = text_proj(
                torch.cat([text_proj.unconditional_image_embeds(b, self.dtype), image_embeds]),
                torch.cat([negative.embeds, text.embeds]),
                torch.cat([negative.hidden, text.hidden]),
            )
            mask = self._decoder_mask(torch.cat([negative.mask, text.mask]))
            uncond, cond = (
                dict(context=c, context_mask=m, class_labels=a)
                for c, m, a in zip(context.chunk(2), mask.chunk(2), additive.chunk(2))
            )
            fn = cfg_denoiser(net, cond, uncond, guidance.decoder.to(self.device),
                              guidance.enabled.to(self.device), guided_channels=channels)
        else:
            context, additive = text_proj(image_embeds, text.embeds, text.hidden)
            cond = dict(context=context, context_mask=self._decoder_mask(text.mask), class_labels=additive)
            fn = lambda x, t: net(x, t, **cond)  # noqa: E731
        size = decoder.cfg.sample_size
        x = self._start(latents, generators, (channels, size, size))
        start = None
        if init_images is not None:
            if strength is None or len(strength) != b or init_images.shape != x.shape:
                raise ValueError(f"image-to-image needs {b} strengths and init images of shape {tuple(x.shape)}")
            start = img2img.start_steps(strength, steps)
            x = img2img.noised_start(self.decoder_schedule, steps, init_images.to(self.device), x, start)
        return sample_loop(fn, self.decoder_schedule, x, generators, steps, start=start).clamp(-1, 1)

    @torch.no_grad()
    def run_super_res(
        self, image_64: torch.Tensor, generators: Sequence[torch.Generator], *, steps: int = 7,
        latents: torch.Tensor | None = None,  # (B, 3, H, W) starting noise; drawn with the generators if None
    ) -> torch.Tensor:
        """64 -> 256 px: ``super_res_first`` for every step but the last, ``super_res_last`` for the last.
        -> (B, 3, H, W) in [-1, 1]."""
        first = _loaded(self.super_res_first, "super_res_first")
        last = _loaded(self.super_res_last, "super_res_last")
        size = self.config.image_size
        low = upsample(image_64.to(self.device, self.state_dtype), size)  # (B, 3, H, W)
        channels = low.shape[1]

        def with_image(unet: UNet):
            net = self._network(unet)
            return lambda x, t: net(torch.cat([x, low], dim=1), t)

        denoisers = (with_image(first), with_image(last))
        x = self._start(latents, generators, (channels, size, size))
        return sample_loop(denoisers[0], self.super_res_schedule, x, generators, steps,
                           pick=lambda i: denoisers[1] if i == steps - 1 else denoisers[0])

    def _start(
        self, latents: torch.Tensor | None, generators: Sequence[torch.Generator], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """x_T of a chain: (B, *shape) N(0, I) drawn with each row's generator (init_noise_sigma is 1), or the
        given latents, which draw nothing (diffusers' ``prepare_latents``)."""
        if latents is None:
            return draw_noise(generators, shape, self.state_dtype, self.device)
        expected = (len(generators), *shape)
        if tuple(latents.shape) != expected:
            raise ValueError(f"latents: expected shape {expected}, got {tuple(latents.shape)}")
        return latents.to(self.device, self.state_dtype)

    def _network(self, net: torch.nn.Module):
        """``net`` called on the sampling state (karlo_model.fastpath.network_call)."""
        return network_call(net, self.dtype, self.state_dtype, channels_last=self.fast)

    def _encode_negative(self, negative_prompts: Sequence[str] | None, n: int) -> TextEncoding:
        """The unconditional text of guidance, one row per prompt ("" unless given), encoded as one batch of n
        rows as diffusers does: rounding depends on the batch size, and sampling amplifies any difference."""
        negs = [""] * n if negative_prompts is None else list(negative_prompts)
        if len(negs) != n:
            raise ValueError(f"negative_prompts: expected {n} values, got {len(negs)}")
        return self.encode_text(negs)

    def _decoder_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 77) -> (B, extra + 77): the image-derived context tokens are always visible."""
        extra = self.config.text_proj.clip_extra_context_tokens
        return torch.nn.functional.pad(mask, (extra, 0), value=True)

    # ------------------------------------------------------------------ array-in, array-out stage API

    def prior_stage(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int = 25,
        prior_guidance_scale: float | Sequence[float] = 4.0,
        decoder_guidance_scale: float | Sequence[float] = 8.0,
        negative_prompts: Sequence[str] | None = None,
    ) -> PriorResult:
        """First stage: fresh generators from the seeds; hands over their state."""
        gens = generators_from_seeds(seeds)
        guidance = Guidance.of(prior_guidance_scale, decoder_guidance_scale, len(prompts))
        text, negative, image_embeds = self.run_prior(
            prompts, gens, guidance, steps=steps, negative_prompts=negative_prompts
        )
        return PriorResult(text, negative, image_embeds, generator_states(gens))

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 RGB images of any sizes -> (B, D) CLIP image embeddings (projected, not normalised),
        preprocessed as the repo's feature extractor does."""
        if self.config.feature_extractor is None:
            raise RuntimeError(
                "this model has no image encoder (image variations need karlo-v1-alpha-image-variations)")
        encoder = _loaded(self.image_encoder, "image_encoder")
        return clip_vision.encode(encoder, self.config.feature_extractor, images, self.device, self.dtype)

    def image_encoder_stage(self, images: Sequence[np.ndarray], seeds: Sequence[int]) -> PriorResult:
        """First stage of image variations, in place of the prior: the images' CLIP embeddings, with "" as the
        text of both halves of guidance (diffusers' UnCLIPImageVariationPipeline). Draws no noise."""
        gens = generators_from_seeds(seeds)
        text = self.encode_text([""] * len(images))
        # diffusers encodes the conditional and the unconditional "" as two batches of the same size: equal values.
        return PriorResult(text, text, self.encode_images(images), generator_states(gens))

    @torch.no_grad()
    def variations(
        self,
        images: Sequence[np.ndarray],
        seeds: Sequence[int],
        *,
        decoder_steps: int = 25,
        super_res_steps: int = 7,
        decoder_guidance_scale: float | Sequence[float] = 8.0,
        decoder_latents: torch.Tensor | None = None,
        super_res_latents: torch.Tensor | None = None,
    ) -> KarloOutput:
        """Images -> 256 px variations. Row i uses only seeds[i]: the same as diffusers'
        UnCLIPImageVariationPipeline(images, generator=[torch.Generator().manual_seed(s) for s in seeds]), with
        its optional starting latents."""
        if len(images) != len(seeds):
            raise ValueError(f"got {len(images)} images but {len(seeds)} seeds")
        gens = generators_from_seeds(seeds)
        # No prior: guidance runs for a row when its decoder scale is above 1, as in diffusers.
        guidance = Guidance.of(1.0, decoder_guidance_scale, len(images))
        text = self.encode_text([""] * len(images))
        image_embeds = self.encode_images(images)
        return self._decode(image_embeds, text, text, gens, guidance, decoder_steps, super_res_steps,
                            decoder_latents, super_res_latents)

    def decoder_stage(
        self,
        image_embeds: np.ndarray | torch.Tensor,
        text: TextEncoding,
        negative: TextEncoding,
        rng_state: np.ndarray,
        *,
        steps: int = 25,
        prior_guidance_scale: float | Sequence[float] = 4.0,
        decoder_guidance_scale: float | Sequence[float] = 8.0,
        init_images: Sequence[np.ndarray | None] | None = None,  # (H, W, 3) uint8 each, None: text-to-image
        strength: Sequence[float] | None = None,  # (B,); ignored (1) for rows without an init image
    ) -> DecoderResult:
        gens = generators_from_states(rng_state)
        guidance = Guidance.of(prior_guidance_scale, decoder_guidance_scale, len(gens))
        init, strength = self._init_images(init_images, strength)
        image_64 = self.run_decoder(
            self._tensor(image_embeds), self._to_device(text), self._to_device(negative), gens, guidance, steps=steps,
            init_images=init, strength=strength,
        )
        return DecoderResult(image_64, generator_states(gens))

    def super_res_stage(
        self, image_64: np.ndarray | torch.Tensor, rng_state: np.ndarray, *, steps: int = 7
    ) -> np.ndarray:
        """Last stage -> (B, H, W, 3) uint8."""
        gens = generators_from_states(rng_state)
        image = self._tensor(image_64, self.state_dtype)  # upsampled before the networks see it: keep its precision
        return to_uint8(self.run_super_res(image, gens, steps=steps)).cpu().numpy()

    def _init_images(
        self, images: Sequence[np.ndarray | None] | None, strength: float | Sequence[float] | None
    ) -> tuple[torch.Tensor | None, list[float] | None]:
        """karlo_model.img2img.init_batch at the decoder's size, in the sampling dtype."""
        size = _loaded(self.decoder, "decoder").cfg.sample_size
        init, strength = img2img.init_batch(images, strength, size)
        return (None if init is None else init.to(self.state_dtype)), strength

    def text_encoding(self, embeds, hidden, mask, truncated=None) -> TextEncoding:
        """Rebuild a TextEncoding from arrays handed over by another process."""
        n = len(embeds)
        return TextEncoding(
            self._tensor(embeds), self._tensor(hidden), torch.as_tensor(np.asarray(mask), device=self.device).bool(),
            np.zeros(n, dtype=bool) if truncated is None else np.asarray(truncated, dtype=bool),
        )

    def _tensor(self, x: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(self.device, dtype or self.dtype)

    def _to_device(self, enc: TextEncoding) -> TextEncoding:
        return TextEncoding(
            enc.embeds.to(self.device, self.dtype), enc.hidden.to(self.device, self.dtype), enc.mask.to(self.device),
            enc.truncated,
        )

    # ------------------------------------------------------------------ whole model

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        prior_steps: int = 25,
        decoder_steps: int = 25,
        super_res_steps: int = 7,
        prior_guidance_scale: float | Sequence[float] = 4.0,
        decoder_guidance_scale: float | Sequence[float] = 8.0,
        negative_prompts: Sequence[str] | None = None,
        prior_latents: torch.Tensor | None = None,  # (B, D)
        decoder_latents: torch.Tensor | None = None,  # (B, 3, 64, 64)
        super_res_latents: torch.Tensor | None = None,  # (B, 3, 256, 256)
        init_images: Sequence[np.ndarray | None] | None = None,  # image-to-image: (H, W, 3) uint8, None per row
        strength: float | Sequence[float] = 1.0,  # of the init images, in (0, 1]
    ) -> KarloOutput:
        """Text -> 256 px images. Row i uses only seeds[i]: the same as
        diffusers' UnCLIPPipeline(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds]). Starting
        latents, when given, replace the draws from the generators, as diffusers' ``*_latents`` arguments do.
        With ``init_images``, a row that has one is image-to-image at its ``strength`` (``run_decoder``)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        gens = generators_from_seeds(seeds)
        guidance = Guidance.of(prior_guidance_scale, decoder_guidance_scale, len(prompts))
        text, negative, image_embeds = self.run_prior(
            prompts, gens, guidance, steps=prior_steps, negative_prompts=negative_prompts, latents=prior_latents
        )
        init, strength = self._init_images(init_images, strength)
        return self._decode(image_embeds, text, negative, gens, guidance, decoder_steps, super_res_steps,
                            decoder_latents, super_res_latents, init, strength)

    def _decode(
        self, image_embeds: torch.Tensor, text: TextEncoding, negative: TextEncoding, gens: list[torch.Generator],
        guidance: Guidance, decoder_steps: int, super_res_steps: int, decoder_latents: torch.Tensor | None,
        super_res_latents: torch.Tensor | None, init_images: torch.Tensor | None = None,
        strength: list[float] | None = None,
    ) -> KarloOutput:
        """Decoder and super-resolution from CLIP image embeddings: the common end of generate and variations."""
        image_64 = self.run_decoder(image_embeds, text, negative, gens, guidance, steps=decoder_steps,
                                    latents=decoder_latents, init_images=init_images, strength=strength)
        images = to_uint8(self.run_super_res(image_64, gens, steps=super_res_steps, latents=super_res_latents))
        return KarloOutput(
            images=images.cpu().numpy(),
            image_embeds=image_embeds.float().cpu().numpy(),
            text_embeds=text.embeds.float().cpu().numpy(),
        )
