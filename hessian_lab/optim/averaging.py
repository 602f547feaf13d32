"""Exponentially weighted averages of the per-batch step sizes η_k (ADLER, Algorithm 1).

With discount β (β_k under a schedule) and s_0 = c_0 = 0:

* ``"log"`` (ADLER with Q, Algorithm 1 and footnote 10):
  s_{k+1} = β s_k + log η_k,  c_{k+1} = β c_k + 1,  η̂_k = exp(s_{k+1} / c_{k+1}),
  the weighted geometric mean exp(Σ_i β^{k−i} log η_i / Σ_i β^{k−i}). Averaging logarithms is
  robust to the occasional huge η_k that a near-zero GᵀQG produces.
* ``"arithmetic"`` (the paper's GN variant, footnote 10):
  s_{k+1} = β s_k + η_k,  c_{k+1} = β c_k + 1,  η̂_k = s_{k+1} / c_{k+1}.

Everything stays a tensor, so no host synchronization happens (DESIGN.md §5).
"""

from __future__ import annotations

import torch

AVERAGINGS = ("log", "arithmetic")


def check_averaging(averaging: str) -> str:
    """Return ``averaging`` if it names a rule, else raise ``ValueError``."""
    if averaging not in AVERAGINGS:
        raise ValueError(f"averaging={averaging!r} is not one of {AVERAGINGS}.")
    return averaging


def update_average(
    s: torch.Tensor, c: torch.Tensor, eta: torch.Tensor, beta: float, averaging: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recursion: (s_k, c_k, η_k) -> (s_{k+1}, c_{k+1}).

    Args:
        s: s_k, the discounted sum of log η_i (``"log"``) or of η_i (``"arithmetic"``).
        c: c_k, the discounted count Σ_i β^{k−1−i}.
        eta: η_k > 0.
        beta: β ∈ [0, 1].
        averaging: ``"log"`` or ``"arithmetic"``.

    Returns:
        (s_{k+1}, c_{k+1}).
    """
    term = torch.log(eta) if averaging == "log" else eta
    return beta * s + term, beta * c + 1.0


def average_value(s: torch.Tensor, c: torch.Tensor, averaging: str) -> torch.Tensor:
    """η̂ = exp(s / c) (``"log"``) or s / c (``"arithmetic"``); NaN while c = 0 (no estimate yet)."""
    ratio = s / c
    return torch.exp(ratio) if averaging == "log" else ratio
