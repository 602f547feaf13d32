"""Loss and accuracy of a model on a whole data split."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Risk ``h(θ) = (1/N) Σ_n ℓ(f(x_n; θ), y_n)`` and accuracy over all N examples.

    Evaluated in chunks of ``batch_size`` (the chunking does not change the result beyond
    floating-point summation order). ``loss_fn`` must use ``reduction="mean"``; each chunk is
    weighted by its size ``N_b / N``.

    Returns:
        ``(loss, accuracy)`` as Python floats.
    """
    n = len(targets)
    total_loss = torch.zeros((), dtype=torch.float64, device=inputs.device)
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    for start in range(0, n, batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        out = model(x)
        total_loss += loss_fn(out, y).double() * len(y)
        correct += (out.argmax(dim=1) == y).sum()
    return (total_loss / n).item(), correct.item() / n
