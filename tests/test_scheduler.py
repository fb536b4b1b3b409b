"""The UnCLIP schedule (karlo_model.scheduler): golden values, closed-form dummy models, and diffusers.

* betas, cumulative alphas and respaced timesteps against golden values (diffusers' ``UnCLIPScheduler`` tables), and the cumulative
  alphas against the telescoped closed form of the cosine schedule;
* ``step`` against the DDPM posterior (Ho et al. 2020, eq. 6-7; learned-range variance of Nichol & Dhariwal 2021) written out here in float64, with dummy models whose answer is known:
  one that returns the true x0, one that predicts zero noise, learned-range variance at its ends, the last step
  (clamped x0, no noise drawn) and the clamp ranges of the three Karlo configs;
* whole chains against diffusers' ``UnCLIPScheduler.step`` for the three Karlo configs with one generator per row.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UnCLIPScheduler
from parity_utils import KARLO_SCHEDULERS

from karlo_model.config import SchedulerConfig
from karlo_model.scheduler import UnCLIPSchedule

CONFIGS = sorted(KARLO_SCHEDULERS)  # prior_scheduler, decoder_scheduler, super_res_scheduler


def schedule(name: str) -> UnCLIPSchedule:
    return UnCLIPSchedule(SchedulerConfig(**KARLO_SCHEDULERS[name]))


def gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def clone(generators: list[torch.Generator]) -> list[torch.Generator]:
    out = []
    for g in generators:
        c = torch.Generator()
        c.set_state(g.get_state())
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tables and timesteps


def test_betas_golden():
    s = schedule("prior_scheduler")
    assert s.betas.dtype == torch.float32 and s.betas.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(4.1284e-05, rel=1e-4)
    assert s.betas[999].item() == pytest.approx(0.999, rel=1e-6)  # capped
    assert bool((s.betas[:999] < 0.999).all()) and bool((s.betas[1:] >= s.betas[:-1]).all())


@pytest.mark.parametrize(
    "t, expected",
    [(0, 0.99996), (500, 0.49229), (832, 0.066221), (957, 4.2782e-3), (999, 2.4288e-09)],
)
def test_alphas_cumprod_golden(t, expected):
    s = schedule("decoder_scheduler")
    assert s.alphas_cumprod.dtype == torch.float32
    assert s.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-4)


def test_alphas_cumprod_closed_form():
    """Without the cap the product telescopes: prod_{i<=t} f((i+1)/T) / f(i/T) = f((t+1)/T) / f(0)."""

    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    s = schedule("super_res_scheduler")
    closed = torch.tensor([f((t + 1) / 1000) / f(0) for t in range(999)], dtype=torch.float64)
    rel = ((s.alphas_cumprod[:999].double() - closed).abs() / closed).max().item()
    assert rel < 2e-6  # float32 cumulative product


def test_timesteps_golden():
    s = schedule("prior_scheduler")
    assert s.timesteps(25) == [999, 957, 916, 874, 832, 791, 749, 708, 666, 624, 583, 541, 500, 458, 416, 375, 333,
                               291, 250, 208, 166, 125, 83, 42, 0]
    assert s.timesteps(7) == [999, 832, 666, 500, 333, 166, 0]
    t50 = s.timesteps(50)
    assert len(t50) == 50 and t50[:3] == [999, 979, 958] and t50[-3:] == [41, 20, 0]
    assert all(a > b for a, b in zip(t50, t50[1:]))
    assert s.timesteps(2) == [999, 0]
    assert all(isinstance(t, int) for t in t50)


@pytest.mark.parametrize("steps", [2, 3, 4, 5, 6, 7, 10, 15, 20, 25, 27, 30, 40, 50, 64, 100, 250, 1000])
def test_timesteps_match_diffusers(steps):
    ref = UnCLIPScheduler(**KARLO_SCHEDULERS["decoder_scheduler"])
    ref.set_timesteps(steps)
    assert schedule("decoder_scheduler").timesteps(steps) == ref.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 0, -3])
def test_fewer_than_two_steps_rejected(steps):
    with pytest.raises(ValueError, match="at least 2 steps"):
        schedule("prior_scheduler").timesteps(steps)


# ---------------------------------------------------------------------------------------------------------------
# step() against the posterior written out in float64


def posterior(t: int, s: int) -> tuple[float, float, float, float]:
    """(x0 coefficient, x_t coefficient, posterior variance, beta') of q(x_s | x_t, x0), from the float32 tables."""
    table = schedule("prior_scheduler")
    a_t = table.alphas_cumprod[t].double().item()
    a_s = table.alphas_cumprod[s].double().item() if s >= 0 else 1.0
    beta = table.betas[t].double().item() if s == t - 1 else 1 - a_t / a_s
    x0_coeff = math.sqrt(a_s) * beta / (1 - a_t)
    xt_coeff = math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)
    return x0_coeff, xt_coeff, (1 - a_s) / (1 - a_t) * beta, beta


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


# At t = 999, beta' = 1 - abar_t / abar_s rounds to 1 in float32, so the x_t coefficient sqrt(1 - beta') ~ 2e-4 is
# lost (diffusers computes the same); elsewhere the float32 step is exact to 1e-5.
FIRST_STEP_TOL = 5e-4


@pytest.mark.parametrize("t, prev", [(999, 832), (666, 500), (166, 0), (42, None), (1, None)])
def test_true_x0_model(t, prev):
    """A prior ('sample' prediction) that returns the true x0: x_s = posterior mean + posterior std * z."""
    s = schedule("prior_scheduler")
    g = torch.Generator().manual_seed(3)
    x0 = 4.0 * torch.rand(3, 16, generator=g) - 2.0  # inside the ±5 clamp
    x_t = torch.randn(3, 16, generator=g)
    generators = gens([7, 8, 9])
    z = torch.cat([torch.randn(1, 16, generator=c) for c in clone(generators)])
    out = s.step(x0.clone(), t, prev, x_t, generators)
    c0, ct, var, _ = posterior(t, t - 1 if prev is None else prev)
    expected = c0 * x0.double() + ct * x_t.double() + math.sqrt(var) * z.double()
    assert_close(out, expected, tol=FIRST_STEP_TOL if t == 999 else 1e-5)


@pytest.mark.parametrize("t, prev", [(999, 832), (500, 333), (333, 166), (1, None)])
def test_zero_noise_model(t, prev):
    """An epsilon model that predicts no noise: x0 = x_t / sqrt(abar_t), clamped to ±1 (super-res config)."""
    s = schedule("super_res_scheduler")
    x_t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    generators = gens([1, 2])
    z = torch.cat([torch.randn(1, 3, 4, 4, generator=c) for c in clone(generators)])
    out = s.step(torch.zeros_like(x_t), t, prev, x_t, generators)
    a_t = s.alphas_cumprod[t].double().item()
    x0 = (x_t.double() / math.sqrt(a_t)).clamp(-1, 1)
    c0, ct, var, _ = posterior(t, t - 1 if prev is None else prev)
    expected = c0 * x0 + ct * x_t.double() + math.sqrt(var) * z.double()
    assert_close(out, expected, tol=FIRST_STEP_TOL if t == 999 else 1e-5)


@pytest.mark.parametrize("v, which", [(-1.0, "posterior"), (1.0, "beta"), (0.0, "geometric mean")])
def test_learned_range_variance(v, which):
    """The decoder's variance channel v interpolates the log-variance: -1 -> posterior, +1 -> beta'."""
    s = schedule("decoder_scheduler")
    t, prev = 666, 500
    g = torch.Generator().manual_seed(11)
    x_t, eps = torch.randn(2, 3, 4, 4, generator=g), 0.3 * torch.randn(2, 3, 4, 4, generator=g)
    generators = gens([4, 5])
    z = torch.cat([torch.randn(1, 3, 4, 4, generator=c) for c in clone(generators)])
    out = s.step(torch.cat([eps, torch.full_like(eps, v)], dim=1), t, prev, x_t, generators)
    a_t = s.alphas_cumprod[t].double().item()
    x0 = ((x_t.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)).clamp(-1, 1)
    c0, ct, var, beta = posterior(t, prev)
    std = {"posterior": math.sqrt(var), "beta": math.sqrt(beta), "geometric mean": (var * beta) ** 0.25}[which]
    assert_close(out, c0 * x0 + ct * x_t.double() + std * z.double())


@pytest.mark.parametrize("name", CONFIGS)
def test_last_step_is_clamped_x0_without_noise(name):
    """t = 0 with no next timestep: the coefficients become 1 and 0, so the output is clamp(x0); nothing is drawn.

    In float32, 1 - abar_0 is not exactly beta_0, so the x0 coefficient is 1 only to ~5e-4 (as in diffusers), and
    x0 from an epsilon prediction loses ~1e-4 to the same cancellation.
    """
    s = schedule(name)
    cfg = KARLO_SCHEDULERS[name]
    r = cfg["clip_sample_range"]
    g = torch.Generator().manual_seed(2)
    x_t = 3 * torch.randn(2, 3, 8, 8, generator=g)
    model = 8 * torch.randn(2, 3, 8, 8, generator=g)  # well beyond both clamp ranges in places
    if cfg["variance_type"] == "learned_range":
        model = torch.cat([model, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1], dim=1)
    generators = gens([0, 1])
    before = [gen.get_state() for gen in generators]
    out = s.step(model, 0, None, x_t, generators)
    pred = model[:, :3].double()
    a0 = s.alphas_cumprod[0].double().item()
    x0 = pred if cfg["prediction_type"] == "sample" else (x_t.double() - math.sqrt(1 - a0) * pred) / math.sqrt(a0)
    assert_close(out, x0.clamp(-r, r), tol=1e-3)
    assert out.abs().max().item() == pytest.approx(r, rel=1e-3)  # the clamp was reached
    assert all(torch.equal(b, gen.get_state()) for b, gen in zip(before, generators))


def test_rows_use_only_their_own_generator():
    s = schedule("decoder_scheduler")
    g = torch.Generator().manual_seed(9)
    x_t, model = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 6, 4, 4, generator=g).tanh()
    batch = s.step(model, 957, 916, x_t, gens([10, 20, 30]))
    for i, seed in enumerate([10, 20, 30]):
        alone = s.step(model[i : i + 1], 957, 916, x_t[i : i + 1], gens([seed]))
        assert torch.equal(alone[0], batch[i])
    assert not torch.equal(batch, s.step(model, 957, 916, x_t, gens([10, 20, 31])))


# ---------------------------------------------------------------------------------------------------------------
# Whole chains against diffusers' UnCLIPScheduler


def dummy_model(name: str, x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in network with the output layout of each Karlo stage."""
    u = torch.sin(1.7 * x + t / 300.0)
    if name == "prior_scheduler":
        return 6.0 * u  # x0 prediction, partly outside the ±5 clamp
    if name == "decoder_scheduler":
        return torch.cat([u, torch.cos(x - t / 700.0)], dim=1)  # eps + variance value in [-1, 1]
    return u


@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize("name", CONFIGS)
def test_chain_matches_diffusers(name, steps):
    ours, ref = schedule(name), UnCLIPScheduler(**KARLO_SCHEDULERS[name])
    ref.set_timesteps(steps)
    seeds = [3, 1, 4]
    shape = (3, 24) if name == "prior_scheduler" else (3, 3, 6, 6)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    g_ours, g_ref = gens(seeds), gens(seeds)
    timesteps = ours.timesteps(steps)
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < steps else None
        x = ours.step(dummy_model(name, x, t), t, prev, x, g_ours)
        ref_t = ref.timesteps[i]
        ref_prev = ref.timesteps[i + 1] if i + 1 < steps else None
        y = ref.step(dummy_model(name, y, t), ref_t, y, prev_timestep=ref_prev, generator=g_ref).prev_sample
        assert (x - y).abs().max().item() <= 1e-6, f"step {i} (t={t})"
    r = KARLO_SCHEDULERS[name]["clip_sample_range"]
    assert x.abs().max().item() <= r * (1 + 1e-3)  # the chain ends on a clamped x0


# ---------------------------------------------------------------------------------------------------------------
# float64_tables: the original Karlo sampler's arithmetic (guided-diffusion's float64 numpy tables)


def test_float64_tables_key_round_trips_and_diffusers_files_stay_unchanged():
    plain = SchedulerConfig(**KARLO_SCHEDULERS["prior_scheduler"])
    assert "float64_tables" not in plain.to_dict()
    original = SchedulerConfig.from_dict(plain.to_dict() | {"clip_sample_range": 10.0, "float64_tables": True})
    assert original.to_dict()["float64_tables"] is True and SchedulerConfig.from_dict(original.to_dict()) == original
    with pytest.raises(ValueError, match="float64_tables must be true or false"):
        SchedulerConfig.from_dict({"float64_tables": "yes"})


@pytest.mark.parametrize("name", CONFIGS)
def test_float64_tables_match_the_float64_posterior_cast_to_float32(name):
    """One respaced step (t=957 -> 916) against guided-diffusion's formulas in float64, each coefficient cast to
    float32 before it meets a tensor."""
    cfg = SchedulerConfig(**KARLO_SCHEDULERS[name])
    s64 = UnCLIPSchedule(SchedulerConfig(**{**KARLO_SCHEDULERS[name], "float64_tables": True}))
    assert s64.alphas_cumprod.dtype == torch.float64
    t, prev = 957, 916
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    out = torch.randn(2, 6 if cfg.variance_type == "learned_range" else 3, 4, 4, generator=g) * 0.5
    got = s64.step(out, t, prev, x, gens([1, 2]))
    noise = torch.stack([torch.randn(x.shape[1:], generator=gg) for gg in gens([1, 2])])
    a = s64.alphas_cumprod.double()
    a_t, a_prev = a[t].item(), a[prev].item()
    beta = 1 - a_t / a_prev
    eps, v = out[:, :3], out[:, 3:]
    if cfg.prediction_type == "epsilon":
        x0 = math.sqrt(1 / a_t) * x - math.sqrt(1 / a_t - 1) * eps
    else:
        x0 = eps
    x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    mean = (beta * math.sqrt(a_prev) / (1 - a_t)) * x0 + ((1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t)) * x
    log_var = math.log(beta * (1 - a_prev) / (1 - a_t))
    if cfg.variance_type == "learned_range":
        frac = (v + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * log_var
    expected = mean + torch.exp(0.5 * torch.as_tensor(log_var, dtype=torch.float32)) * noise
    assert (got - expected).abs().max().item() < 2e-6
