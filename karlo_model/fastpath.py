"""Precision policy and the GPU fast path: how a Karlo model runs when throughput matters more than bit-parity.

Low precision (bfloat16 / float16 networks) always follows one policy: the networks compute in that dtype, while
the sampling state, the scheduler step, classifier-free guidance, the 64 -> 256 px upsampling and the noise stay
float32. Early steps divide by sqrt(alpha_bar) ~ 1e-2 and guidance multiplies by up to 8, so rounding the state
to 8 mantissa bits would compound over the chain; the networks only see it once per step. Inside the networks,
PyTorch's GroupNorm / LayerNorm kernels accumulate their statistics in float32 and its fused attention kernels
compute the softmax in float32 for bf16/fp16 inputs (checked in tests/test_fastpath.py), so no explicit casts
are needed there.

The fast path (``Karlo(..., fast=True)``, on by default for cuda with bf16/fp16) adds what changes float
rounding and therefore cannot be part of the bit-exact float32 path:

* channels_last convolutions in the three UNets (NHWC is the layout cuDNN's tensor-core kernels use);
* cuDNN autotuning of the convolution algorithms for the shapes in use;
* optionally ``torch.compile`` of the four denoising networks (``compile=True``): it fuses the norm, SiLU and
  residual element-wise work around the convolutions. Shapes are specialised (``dynamic=False``): a pool sees
  one batch size, plus a smaller last batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# dtypes by the names that configs and the command line use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOW_PRECISION = (torch.bfloat16, torch.float16)
UNETS = ("decoder", "super_res_first", "super_res_last")
DENOISERS = ("prior",) + UNETS  # the networks called once (or twice, with guidance) per sampling step


def fast_by_default(device: torch.device, dtype: torch.dtype) -> bool:
    """The fast path is on by default only where it pays and parity is not expected: cuda with bf16/fp16."""
    return device.type == "cuda" and dtype in LOW_PRECISION


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the sampling state for networks of ``dtype``: float32 for bf16/fp16, else the same."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def apply_fast_path(
    modules: dict[str, nn.Module], device: torch.device, *, channels_last: bool, compile: bool
) -> None:
    """channels_last UNets with cuDNN autotuning on cuda, and/or compiled denoisers, in place."""
    if channels_last:
        for name in UNETS:
            if name in modules:
                modules[name].to(memory_format=torch.channels_last)
        if device.type == "cuda":
            # The convolution shapes repeat every step, so timing the algorithms once pays off at once.
            torch.backends.cudnn.benchmark = True
    if compile:
        for name in DENOISERS:
            if name in modules:
                modules[name].compile(dynamic=False)


def network_call(
    net: Callable[..., torch.Tensor], dtype: torch.dtype, state: torch.dtype, channels_last: bool
) -> Callable[..., torch.Tensor]:
    """``net`` as the sampler calls it: the state dtype in and out, the network's dtype and layout inside.

    Without a change of dtype or layout this is ``net`` itself, so the float32 path runs exactly as before.
    """
    if dtype == state and not channels_last:
        return net

    def call(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        if channels_last and x.dim() == 4:  # (B, C, H, W) images; the prior's (B, D) state has no layout
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x, t, **cond).to(state)

    return call
