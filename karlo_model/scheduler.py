"""UnCLIP's DDPM schedule: squaredcos_cap_v2 betas, Karlo's respacing and the posterior step
(diffusers' ``schedulers/scheduling_unclip.py``; kakaobrain karlo's ``SpacedDiffusion``, after guided-diffusion).

By default the arithmetic follows diffusers' ``UnCLIPScheduler`` operation for operation (float32 tables and
scalars) so that sampling reproduces it to the last bits, not just to a tolerance. With ``float64_tables`` in the
scheduler config it follows the original Karlo sampler instead: guided-diffusion's ``GaussianDiffusion`` /
``SpacedDiffusion`` (openai/guided-diffusion ``gaussian_diffusion.py``, ``respace.py``) compute every coefficient
in float64 numpy tables and cast it to float32 where it meets a tensor (``_extract_into_tensor``), and predict x0
from noise as ``sqrt(1/a) x_t - sqrt(1/a - 1) eps``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .config import SchedulerConfig
from .noise import draw_noise


def squaredcos_cap_v2_betas(
    num_train_timesteps: int, max_beta: float = 0.999, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999. (T,) ``dtype``."""

    def alpha_bar(tau: float) -> float:
        return math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2

    t = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta) for i in range(t)]
    return torch.tensor(betas, dtype=dtype)


class UnCLIPSchedule:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        # Coefficients are computed in this dtype and cast to the sample's dtype where they are used.
        self.table_dtype = torch.float64 if cfg.float64_tables else torch.float32
        self.betas = squaredcos_cap_v2_betas(cfg.num_train_timesteps, dtype=self.table_dtype)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.one = torch.tensor(1.0, dtype=self.table_dtype)

    def timesteps(self, steps: int) -> list[int]:
        """Respaced timesteps, high to low: round(i * (T-1)/(n-1)) reversed, as Karlo's space_timesteps."""
        if steps < 2:
            raise ValueError(f"UnCLIP sampling needs at least 2 steps, got {steps}")
        ratio = (self.cfg.num_train_timesteps - 1) / (steps - 1)
        return [int(t) for t in (np.arange(0, steps) * ratio).round()[::-1]]

    def step(
        self,
        model_output: torch.Tensor,  # (B, C or 2C, ...) x0 or eps, plus variance channels for learned_range
        t: int,
        prev_t: int | None,  # next timestep of the chain, None at the last step
        sample: torch.Tensor,  # (B, C, ...) x_t
        generators: Sequence[torch.Generator],  # one per row
    ) -> torch.Tensor:  # x_{prev_t}
        cfg = self.cfg
        channels = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * channels and cfg.variance_type == "learned_range":
            model_output, predicted_variance = torch.split(model_output, channels, dim=1)
        if prev_t is None:
            prev_t = t - 1

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if prev_t == t - 1:
            beta, alpha = self.betas[t], self.alphas[t]
        else:
            beta = 1 - alpha_prod_t / alpha_prod_t_prev
            alpha = 1 - beta

        dtype = sample.dtype  # table values are cast where they meet a tensor (a no-op on the diffusers path)
        if cfg.prediction_type == "epsilon" and cfg.float64_tables:
            # guided-diffusion's _predict_xstart_from_eps, with its sqrt_recip(m1)_alphas_cumprod tables.
            recip, recipm1 = (1 / alpha_prod_t) ** 0.5, (1 / alpha_prod_t - 1) ** 0.5
            x0 = recip.to(dtype) * sample - recipm1.to(dtype) * model_output
        elif cfg.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        else:
            x0 = model_output
        if cfg.clip_sample:
            x0 = torch.clamp(x0, -cfg.clip_sample_range, cfg.clip_sample_range)

        # Posterior mean of q(x_prev | x_t, x0).
        x0_coeff = (alpha_prod_t_prev ** (0.5) * beta) / beta_prod_t
        sample_coeff = alpha ** (0.5) * beta_prod_t_prev / beta_prod_t
        prev = x0_coeff.to(dtype) * x0 + sample_coeff.to(dtype) * sample
        if t == 0:
            return prev  # the last step draws no noise

        noise = draw_noise(generators, model_output.shape[1:], model_output.dtype, model_output.device)
        variance = beta_prod_t_prev / beta_prod_t * beta  # posterior variance
        if cfg.variance_type == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20)).to(dtype))
        else:
            # learned_range: the model interpolates log-variance between the posterior's and beta's.
            frac = (predicted_variance + 1) / 2
            std = (0.5 * (frac * beta.log().to(dtype) + (1 - frac) * variance.log().to(dtype))).exp()
        return prev + std * noise
