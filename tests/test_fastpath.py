"""The low-precision policy and the fast path (karlo_model.fastpath) on the tiny random model, on the CPU.

* the float32 CPU default is untouched: no fast path, no wrapper around the networks (parity lives in
  test_parity.py);
* fast path: channels_last UNets give the default path's images (compared in float64, where only the layout
  differs), and ``compile=True`` compiles exactly the four denoising networks;
* low precision: the sampling state stays float32; GroupNorm, LayerNorm and attention accumulate in float32 inside
  PyTorch's bf16/fp16 kernels; and the documented drift bound of bfloat16 against float32 at the default schedule,
  stage by stage (docs/gpu.md);
* noise drawn row by row into one buffer equals each row's own draw; the sampler copies the timesteps once;
* ``Karlo.from_config`` builds a seeded random model in memory;
* on a GPU only: the fast path runs, and noise reaches the GPU from pinned memory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity_utils import single_thread  # noqa: F401 (fixture)

from karlo_model import Karlo, make_tiny_model, preset
from karlo_model.fastpath import DENOISERS, UNETS, fast_by_default, network_call, state_dtype
from karlo_model.noise import draw_noise, generator_states, generators_from_seeds, generators_from_states
from karlo_model.sampling import Guidance, sample_loop, to_uint8
from karlo_model.scheduler import UnCLIPSchedule

PROMPTS = ["a horse in a field", "a red cube on a wooden table", "an astronaut riding a horse", ""]
SEEDS = [101, 7, 4242, 0]
FEW_STEPS = dict(prior_steps=3, decoder_steps=3, super_res_steps=3)
DEFAULT_STEPS = (25, 25, 7)

# bfloat16 (fast path) against float32 at the default schedule and guidance, each stage fed the same float32
# inputs and generator states, on the tiny random model. Measured: prior cosine >= 0.9998, 64 px PSNR >= 27.9 dB,
# 256 px PSNR >= 40.4 dB (docs/gpu.md); the bounds leave a margin for other CPUs' kernels.
MIN_EMBEDDING_COSINE = 0.999
MIN_PSNR_64 = 25.0
MIN_PSNR_256 = 36.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def model(repo) -> Karlo:
    return Karlo.from_pretrained(repo)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


# ---------------------------------------------------------------------------------------------- defaults


def test_float32_cpu_default_has_no_fast_path(model):
    assert not model.fast and model.state_dtype == torch.float32
    for name in UNETS:
        assert model.modules[name].conv_in.weight.is_contiguous()
    # The sampler calls the network itself: the float32 path is the one test_parity.py checks bit for bit.
    net = model.modules["decoder"]
    assert network_call(net, torch.float32, torch.float32, channels_last=False) is net


@pytest.mark.parametrize(
    "device, dtype, expected",
    [("cuda", torch.bfloat16, True), ("cuda", torch.float16, True), ("cuda", torch.float32, False),
     ("cpu", torch.bfloat16, False), ("cpu", torch.float32, False)],
)
def test_fast_path_is_on_by_default_only_for_cuda_low_precision(device, dtype, expected):
    assert fast_by_default(torch.device(device), dtype) is expected


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_state_dtype(dtype, expected):
    assert state_dtype(dtype) == expected


# ---------------------------------------------------------------------------------------------- fast path


def test_fast_path_uses_channels_last_and_gives_the_same_images(tmp_path):
    """In float64 the layout is the only difference, so the images must agree to a level (the other tiny preset:
    64 px output keeps float64 fast)."""
    alt = make_tiny_model(tmp_path / "alt", seed=3, preset_name="tiny-alt")
    plain = Karlo.from_pretrained(alt, dtype=torch.float64)
    fast = Karlo.from_pretrained(alt, dtype=torch.float64, fast=True)
    assert fast.fast and not plain.fast
    for name in UNETS:
        weight = fast.modules[name].conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    a = plain.generate(PROMPTS, SEEDS, **FEW_STEPS)
    b = fast.generate(PROMPTS, SEEDS, **FEW_STEPS)
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1
    np.testing.assert_allclose(a.image_embeds, b.image_embeds, rtol=1e-9, atol=1e-12)


def test_network_call_casts_and_lays_out(model):
    seen = {}

    def net(x, t, **cond):
        seen.update(dtype=x.dtype, channels_last=x.is_contiguous(memory_format=torch.channels_last), cond=cond)
        return x * 2

    call = network_call(net, torch.bfloat16, torch.float32, channels_last=True)
    x = torch.randn(2, 3, 4, 4)
    out = call(x, torch.tensor(5), context=torch.ones(1))
    assert seen["dtype"] == torch.bfloat16 and seen["channels_last"] and set(seen["cond"]) == {"context"}
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (x.bfloat16() * 2).float())


def test_compile_compiles_the_denoising_networks(repo, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((self, kw)))
    m = Karlo.from_pretrained(repo, compile=True)
    compiled = {name for name, module in m.modules.items() for c, _ in calls if c is module}
    assert compiled == set(DENOISERS)
    assert all(kw == {"dynamic": False} for _, kw in calls)
    assert not m.fast  # compiling is independent of the layout change


# ---------------------------------------------------------------------------------------------- low precision


def test_low_precision_keeps_the_sampling_state_float32(repo):
    m = Karlo.from_pretrained(repo, dtype=torch.bfloat16)
    assert m.state_dtype == torch.float32 and m.modules["decoder"].conv_in.weight.dtype == torch.bfloat16
    r = m.prior_stage(PROMPTS[:2], SEEDS[:2], steps=2)
    assert r.image_embeds.dtype == torch.float32
    d = m.decoder_stage(r.image_embeds, r.text, r.negative, r.rng_state, steps=2)
    assert d.image_64.dtype == torch.float32
    images = m.super_res_stage(d.image_64, d.rng_state, steps=2)
    assert images.dtype == np.uint8 and images.shape == (2, 256, 256, 3)


def _low_precision_dtypes() -> list[torch.dtype]:
    """bf16, and fp16 where this build's CPU kernels have it."""
    dtypes = [torch.bfloat16]
    try:
        F.group_norm(torch.ones(1, 2, 2, dtype=torch.float16), 1)
        dtypes.append(torch.float16)
    except RuntimeError:
        pass
    return dtypes


@pytest.mark.parametrize("dtype", _low_precision_dtypes())
def test_norms_and_attention_accumulate_in_float32(dtype):
    """The precision policy relies on PyTorch's low-precision norm and attention kernels computing statistics
    and softmax in float32: their output must equal the float32 computation, rounded once."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 32, 16, 16, generator=g) * 30 + 5).to(dtype)  # large mean: naive low-precision variance fails
    gn = torch.nn.GroupNorm(8, 32)
    expected = gn(x.float()).to(dtype)
    assert torch.equal(gn.to(dtype)(x), expected)

    y = (torch.randn(2, 81, 64, generator=g) * 50).to(dtype)
    ln = torch.nn.LayerNorm(64).to(dtype)
    ref = F.layer_norm(y.float(), (64,), ln.weight.float(), ln.bias.float()).to(dtype)
    torch.testing.assert_close(ln(y), ref, rtol=0, atol=2 * torch.finfo(dtype).eps * ref.abs().max().item())

    q, k, v = (torch.randn(2, 4, 300, 16, generator=g).to(dtype) * 4 for _ in range(3))
    bias = F.pad(torch.full((2, 10), -10000.0), (0, 290))[:, None, None].to(dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float())
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 2 * ulp


@pytest.mark.slow
def test_bfloat16_drift_from_float32_is_bounded(model, repo):
    """The documented bound, stage by stage at the default schedule: each stage gets the same float32 inputs and
    generator states in both precisions, so the figure is that stage's own drift."""
    low = Karlo.from_pretrained(repo, dtype=torch.bfloat16, fast=True)
    prior_steps, decoder_steps, sr_steps = DEFAULT_STEPS
    guidance = Guidance.of(4.0, 8.0, len(PROMPTS))
    gens = generators_from_seeds(SEEDS)
    text, negative, embeds = model.run_prior(PROMPTS, gens, guidance, steps=prior_steps)
    state = generator_states(gens)  # the streams after the prior, for both precisions' later stages
    _, _, low_embeds = low.run_prior(PROMPTS, generators_from_seeds(SEEDS), guidance, steps=prior_steps)
    assert F.cosine_similarity(embeds, low_embeds.float()).min().item() >= MIN_EMBEDDING_COSINE

    image_64 = model.run_decoder(embeds, text, negative, generators_from_states(state), guidance, steps=decoder_steps)
    low_64 = low.run_decoder(embeds, low._to_device(text), low._to_device(negative), generators_from_states(state),
                             guidance, steps=decoder_steps)
    for a, b in zip(to_uint8(image_64).numpy(), to_uint8(low_64).numpy()):
        assert psnr(a, b) >= MIN_PSNR_64

    image = model.run_super_res(image_64, generators_from_states(state), steps=sr_steps)
    low_image = low.run_super_res(image_64, generators_from_states(state), steps=sr_steps)
    for a, b in zip(to_uint8(image).numpy(), to_uint8(low_image).numpy()):
        assert psnr(a, b) >= MIN_PSNR_256


# ---------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("shape", [(5,), (32,), (3, 8, 8)])
def test_noise_drawn_into_one_buffer_equals_each_rows_own_draw(shape):
    gens = generators_from_seeds([1, 2, 3])
    noise = draw_noise(gens, shape, torch.float32, "cpu")
    for row, seed in zip(noise, [1, 2, 3]):
        assert torch.equal(row[None], torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)))
    # The streams continue exactly as after a per-row draw.
    again = draw_noise(gens, shape, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    torch.randn((1, *shape), generator=g)
    assert torch.equal(again[0][None], torch.randn((1, *shape), generator=g))


def test_sampler_gets_the_respaced_timesteps(model):
    schedule = UnCLIPSchedule(model.config.super_res_scheduler)
    seen = []

    def denoiser(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    gens = generators_from_seeds([0])
    sample_loop(denoiser, schedule, draw_noise(gens, (3, 2, 2), torch.float32, "cpu"), gens, 4)
    assert [int(t) for t in seen] == schedule.timesteps(4)
    assert all(t.dim() == 0 and t.dtype == torch.int64 for t in seen)


# ---------------------------------------------------------------------------------------------- random models


def test_from_config_builds_a_seeded_random_model_in_memory():
    config = preset("tiny")
    a = Karlo.from_config(config, seed=1)
    b = Karlo.from_config(config, seed=1)
    c = Karlo.from_config(config, seed=2)
    assert set(a.modules) == {"text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last"}
    for name, module in a.modules.items():
        for (key, p), q in zip(module.state_dict().items(), b.modules[name].state_dict().values()):
            assert torch.equal(p, q), key
    assert not torch.equal(a.modules["decoder"].conv_in.weight, c.modules["decoder"].conv_in.weight)
    out = a.generate(PROMPTS[:1], SEEDS[:1], **FEW_STEPS)
    assert out.images.shape == (1, 256, 256, 3) and np.isfinite(out.image_embeds).all()


# ---------------------------------------------------------------------------------------------- GPU only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_noise_reaches_the_gpu_from_pinned_memory(monkeypatch):
    pinned = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        pinned.append(self.is_pinned())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    noise = draw_noise(generators_from_seeds([1, 2]), (3, 8, 8), torch.float32, "cuda")
    monkeypatch.undo()
    assert noise.device.type == "cuda" and pinned == [True]
    expected = torch.cat([torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    assert torch.equal(noise.cpu(), expected)


@cuda
def test_fast_path_on_gpu_stays_within_the_bound(model, repo):
    gpu = Karlo.from_pretrained(repo, device="cuda", dtype=torch.bfloat16)
    assert gpu.fast
    a = model.generate(PROMPTS, SEEDS, **FEW_STEPS)
    b = gpu.generate(PROMPTS, SEEDS, **FEW_STEPS)
    cos = (a.image_embeds * b.image_embeds).sum(1) / np.linalg.norm(a.image_embeds, axis=1)
    cos /= np.linalg.norm(b.image_embeds, axis=1)
    assert cos.min() >= MIN_EMBEDDING_COSINE and b.images.dtype == np.uint8
