"""``karlo bench model``: ``Karlo.generate`` against diffusers' ``UnCLIPPipeline`` on the same weights and device,
per batch size."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from karlo_model import Karlo, preset
from pipeline.config import DEFAULT_STEPS

from .common import ReportRow, Result, dtype_name, prompts, rate, sync


@dataclass(frozen=True)
class ModelSource:
    """A diffusers-format repo on disk, or a preset's shapes with random weights built on the device."""

    model_dir: str | None = None
    preset: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.model_dir is None) == (self.preset is None):
            raise ValueError("give either a model folder or a preset with random weights")

    def load(self, device: str, dtype: torch.dtype, *, fast: bool | None, compile: bool) -> Karlo:
        if self.model_dir is not None:
            return Karlo.from_pretrained(self.model_dir, device=device, dtype=dtype, fast=fast, compile=compile)
        return Karlo.from_config(preset(self.preset), device, dtype, seed=self.seed, fast=fast, compile=compile)

    def describe(self) -> str:
        return self.model_dir if self.model_dir is not None else f"{self.preset} (random weights)"


def diffusers_pipeline(model: Karlo, dtype: torch.dtype):
    """diffusers' UnCLIPPipeline holding copies of ``model``'s weights, on its device in ``dtype``. Built from the
    in-memory model, so a full-size random model needs no checkpoint on disk."""
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    classes = {"prior": PriorTransformer, "decoder": UNet2DConditionModel, "text_proj": UnCLIPTextProjModel,
               "super_res_first": UNet2DModel, "super_res_last": UNet2DModel}
    parts: dict[str, Any] = {}
    for name, cls in classes.items():
        with torch.device(model.device):
            net = cls.from_config(getattr(model.config, name).to_dict())
        net.load_state_dict(model.modules[name].state_dict())  # strict: the key layouts are the same
        parts[name] = net
    schedulers = {name: UnCLIPScheduler.from_config(getattr(model.config, name).to_dict())
                  for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")}
    pipe = UnCLIPPipeline(text_encoder=copy.deepcopy(model.modules["text_encoder"]), tokenizer=model.tokenizer,
                          **parts, **schedulers)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=model.device, dtype=dtype)


@dataclass(frozen=True)
class BatchRates:
    batch: int
    karlo_images_per_s: float
    diffusers_images_per_s: float

    @property
    def ratio(self) -> float:
        return self.karlo_images_per_s / self.diffusers_images_per_s

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "karlo_images_per_s": self.karlo_images_per_s,
                "diffusers_images_per_s": self.diffusers_images_per_s, "ratio": self.ratio}


@dataclass(frozen=True)
class ModelResult(Result):
    """images/s of both per batch size; the ratios at batch 1 and at each one's best batch size."""

    model: str
    device: str
    karlo: dict[str, Any]  # dtype, fast, compile
    diffusers_dtype: str
    batches: list[BatchRates]

    @property
    def best_karlo(self) -> BatchRates:
        return max(self.batches, key=lambda r: r.karlo_images_per_s)

    @property
    def best_diffusers(self) -> BatchRates:
        return max(self.batches, key=lambda r: r.diffusers_images_per_s)

    @property
    def best_ratio(self) -> float:
        return self.best_karlo.karlo_images_per_s / self.best_diffusers.diffusers_images_per_s

    @property
    def batch_1_ratio(self) -> float | None:
        return self.batches[0].ratio if self.batches[0].batch == 1 else None

    def as_dict(self) -> dict[str, Any]:
        out = {"batches": [row.as_dict() for row in self.batches], "model": self.model, "device": self.device,
               "karlo": dict(self.karlo), "diffusers_dtype": self.diffusers_dtype,
               "best_karlo_batch": self.best_karlo.batch, "best_diffusers_batch": self.best_diffusers.batch,
               "best_ratio": self.best_ratio}
        if self.batch_1_ratio is not None:
            out["batch_1_ratio"] = self.batch_1_ratio
        return out

    def report_rows(self) -> Iterable[ReportRow]:
        k = self.karlo
        yield "model", "model", self.model
        yield ("model", "karlo / diffusers dtype",
               f"{k['dtype']} (fast={k['fast']}, compile={k['compile']}) / {self.diffusers_dtype}")
        for row in self.batches:
            yield ("model", f"batch {row.batch}: karlo / diffusers images/s",
                   f"{row.karlo_images_per_s:.4g} / {row.diffusers_images_per_s:.4g}  ratio {row.ratio:.3f}")
        if self.batch_1_ratio is not None:
            yield "model", "ratio at batch 1", self.batch_1_ratio
        yield ("model", f"ratio best/best (batch {self.best_karlo.batch} / {self.best_diffusers.batch})",
               self.best_ratio)


def bench_model(
    source: ModelSource,
    *,
    batch_sizes: tuple[int, ...] = (1, 4, 8),
    steps: tuple[int, int, int] = DEFAULT_STEPS,
    repeats: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    reference_dtype: torch.dtype | None = None,
    fast: bool | None = None,
    compile: bool = False,
) -> ModelResult:
    """images/s of Karlo.generate and of diffusers' UnCLIPPipeline (in ``reference_dtype``, default ``dtype``) on
    the same weights, per batch size."""
    ours = source.load(device, dtype, fast=fast, compile=compile)
    theirs = diffusers_pipeline(ours, reference_dtype or dtype)
    prior_steps, decoder_steps, sr_steps = steps
    rows = []
    for b in batch_sizes:
        texts, seeds = prompts(b), list(range(b))

        def run_ours(texts=texts, seeds=seeds, b=b) -> int:
            ours.generate(texts, seeds, prior_steps=prior_steps, decoder_steps=decoder_steps,
                          super_res_steps=sr_steps)
            sync(ours.device)
            return b

        def run_theirs(texts=texts, seeds=seeds, b=b) -> int:
            with torch.no_grad():
                theirs(texts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                       prior_num_inference_steps=prior_steps, decoder_num_inference_steps=decoder_steps,
                       super_res_num_inference_steps=sr_steps, output_type="np")
            sync(ours.device)
            return b

        rows.append(BatchRates(b, rate(run_ours, repeats), rate(run_theirs, repeats)))
    return ModelResult(model=source.describe(), device=str(ours.device),
                       karlo={"dtype": dtype_name(dtype), "fast": ours.fast, "compile": compile},
                       diffusers_dtype=dtype_name(reference_dtype or dtype), batches=rows)
