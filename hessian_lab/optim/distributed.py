"""Combining per-rank batch quantities as one process on the concatenated batch would see them.

Under data parallelism each rank r holds a batch of N_r examples. For ``reduction="mean"`` the
concatenated batch's risk is h = Σ_r D_r h_r / Σ_r D_r (D_r = N_r, or the summed class weights
of a weighted cross-entropy: ``LossReduction.denominator``), so its gradient and every curvature
quadratic form (dᵀQd, dᵀGNd, dᵀHd, taken along the same global d) are the N_r-weighted means of
the per-rank values; for ``"sum"`` they are plain sums. GᵀG is a function of the global G and
needs no reduction of its own; dᵀCd does (DESIGN.md §6).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def weighted_all_reduce(
    values: torch.Tensor,
    weight: float | torch.Tensor,
    reduction: str,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Σ_r w_r v_r / Σ_r w_r over ranks (``"mean"``) or Σ_r v_r (``"sum"``), in one all-reduce.

    Args:
        values: A flat tensor, the same shape on every rank.
        weight: w_r, this rank's denominator D_r of a "mean" (its example count, or summed
            class weights; a float or a 0-dim tensor), ignored for ``"sum"``.
        reduction: The loss's reduction.
        group: The process group (default: the world).

    Returns:
        The combined values, identical on every rank.
    """
    if reduction == "sum":
        out = values.clone()
        dist.all_reduce(out, group=group)
        return out
    # Pack the weight with the values so that one collective carries both.
    w = torch.as_tensor(weight, dtype=values.dtype, device=values.device).reshape(1)
    buf = torch.cat([values * w, w])
    dist.all_reduce(buf, group=group)
    return buf[:-1] / buf[-1]
