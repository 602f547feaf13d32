"""Random probe vectors for Lanczos start vectors and stochastic estimators.

Seeds go through a :class:`torch.Generator` on the operator's device, so a seed gives the same
probes on every call (on a given device) without touching the global random state.
"""

from __future__ import annotations

import torch

__all__ = ["make_generator", "rademacher"]


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded with ``seed`` (non-deterministic if None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def rademacher(
    shape: tuple[int, ...], *, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Rademacher samples (±1 with equal probability), so that ``E[z zᵀ] = I``."""
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)
