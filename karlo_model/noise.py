"""Per-row randomness.

Every row owns a CPU ``torch.Generator`` seeded with its seed and consumed in diffusers' order (prior
latents, prior steps, decoder latents, decoder steps, super-res latents, super-res steps), so a row's image
depends on its seed only, never on its batch. Noise is drawn on the CPU in float32 so it is the same on any
device; a stage in another process continues a row's stream from the generator state the previous stage
handed over.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def generators_from_seeds(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def generator_states(generators: Sequence[torch.Generator]) -> np.ndarray:
    """(B, S) uint8: each generator's full state, to hand over to the next stage."""
    return np.stack([g.get_state().numpy() for g in generators])


def generators_from_states(states: np.ndarray) -> list[torch.Generator]:
    gens = []
    for row in np.asarray(states, dtype=np.uint8):
        g = torch.Generator("cpu")
        g.set_state(torch.from_numpy(row.copy()))
        gens.append(g)
    return gens


def draw_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """(B, *shape) standard normal noise, row i drawn from generators[i] on the CPU.

    float32 models draw float32 as diffusers does; lower-precision models draw float32 and round, which keeps
    the stream identical across dtypes. For a GPU the rows are drawn straight into pinned (page-locked) memory,
    so the copy is asynchronous: the CPU draws the next step's noise while the GPU is still busy with this one.
    """
    cpu_dtype = dtype if dtype == torch.float64 else torch.float32
    pinned = torch.device(device).type == "cuda"
    noise = torch.empty((len(generators), *shape), dtype=cpu_dtype, pin_memory=pinned)
    for row, g in zip(noise, generators):
        torch.randn(tuple(shape), generator=g, dtype=cpu_dtype, out=row)
    return noise.to(device=device, dtype=dtype, non_blocking=True)
