"""Training objectives of the three diffusion networks, on the same squaredcos_cap_v2 schedule they sample with
(karlo_model.scheduler):

* the prior predicts x0, the normalised image embedding (Karlo's prior scheduler: ``prediction_type="sample"``);
* the decoder predicts the noise and a learned variance, trained with Improved DDPM's hybrid objective
  (Nichol & Dhariwal 2021, sec. 3.1: the noise MSE plus the variational bound, whose gradient reaches only the
  variance channels), which is what the ``learned_range`` step of the decoder scheduler expects;
* the super-resolution networks predict the noise (``fixed_small_log``).
"""

from __future__ import annotations

import math

import torch

from ..scheduler import UnCLIPSchedule


def _per_row(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped (B, 1, ...) to broadcast against ``like``."""
    return table[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noised(schedule: UnCLIPSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, with t (B,) int64."""
    a = _per_row(schedule.alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predicted_x0(schedule: UnCLIPSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 implied by a noise prediction, sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps, as the sampler computes it (from
    float64 tables); unclipped."""
    ac = schedule.alphas_cumprod.to(torch.float64)
    return _per_row((1 / ac).sqrt(), t, x_t) * x_t - _per_row((1 / ac - 1).sqrt(), t, x_t) * eps


def variational_bound(
    schedule: UnCLIPSchedule,
    eps: torch.Tensor,  # (B, C, H, W) predicted noise, detached: the bound trains only the variance
    variance: torch.Tensor,  # (B, C, H, W) the learned_range output v in [-1, 1]
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,  # (B,)
) -> torch.Tensor:
    """Mean over the batch of KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits per dimension.

    p's log-variance interpolates between the clipped posterior's and beta_t's as the sampler's ``learned_range``
    step does. At t = 0 the bound is the same KL rather than the discretised likelihood: the sampler's last step
    adds no noise, so the variance learned there is never used."""
    ac = schedule.alphas_cumprod.to(torch.float64)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1 - ac / ac_prev
    posterior_var = betas * (1 - ac_prev) / (1 - ac)
    log_var_clipped = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
    coef_x0 = betas * ac_prev.sqrt() / (1 - ac)
    coef_xt = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)

    def at(table: torch.Tensor) -> torch.Tensor:
        return _per_row(table, t, x_t)

    model_mean = at(coef_x0) * predicted_x0(schedule, x_t, eps, t) + at(coef_xt) * x_t
    true_mean = at(coef_x0) * x0 + at(coef_xt) * x_t
    frac = (variance + 1) / 2
    model_log_var = frac * at(torch.log(betas)) + (1 - frac) * at(log_var_clipped)
    true_log_var = at(log_var_clipped)
    kl = 0.5 * (-1 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
    return kl.mean() / math.log(2.0)


def sample_timesteps(n: int, generator: torch.Generator, low: int = 0, high: int = 1000) -> torch.Tensor:
    """(n,) int64 timesteps uniform in [low, high)."""
    return torch.randint(low, high, (n,), generator=generator)
