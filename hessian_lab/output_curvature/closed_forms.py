"""Closed-form Λ for cross-entropy, mean squared error and binary cross-entropy with logits.

Each matches PyTorch's reduction semantics exactly. With c the reduction constant:

* CrossEntropy: Λ_n = c (diag(p_n) − p_n p_nᵀ), p = softmax(z), c = 1/N_b ("mean") or 1
  (ignored targets get c = 0 and are not counted in N_b).
  uᵀΛu = c Σ_n Σ_j p_nj (u_nj − ū_n)², ū_n = p_nᵀ u_n (no cancellation in low precision).
* MSELoss: Λ = c·2 I, c = 1/numel(z) ("mean" averages over all N_b·C elements) or 1.
* BCEWithLogitsLoss: Λ = c diag(σ(z)(1 − σ(z))), c as for MSE.
"""

from __future__ import annotations

import torch

from hessian_lab.output_curvature.base import OutputCurvature, OutputState, sum_per_tangent


class CrossEntropyCurvature(OutputCurvature):
    """Λ of ``nn.CrossEntropyLoss``: class-index targets, ``[N, C]`` logits, no class weights.

    Targets equal to ``ignore_index`` contribute nothing, and ``"mean"`` divides by the number
    of the others, as PyTorch does; the mask costs no host synchronization.
    """

    def _factors(self, z: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> dict:
        valid = (targets != getattr(self.loss_fn, "ignore_index", -100)).to(z.dtype)
        scale = 1.0 / valid.sum() if self.reduction == "mean" else 1.0
        return {"probs": torch.softmax(z.detach(), dim=-1), "weight": (scale * valid)[:, None]}

    def hessian_vector(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """Λu = c_n (p ⊙ u − p (pᵀu)) per example, c_n = valid_n / N_valid (mean) or valid_n."""
        p, w = state.factors["probs"], state.factors["weight"]
        mean_u = (p * u).sum(dim=-1, keepdim=True)
        return w * p * (u - mean_u)

    def quadratic_form(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """uᵀΛu = Σ_n c_n Σ_j p_nj (u_nj − ū_n)², free of the cancellation in Σpu² − ū²."""
        p, w = state.factors["probs"], state.factors["weight"]
        mean_u = (p * u).sum(dim=-1, keepdim=True)
        return sum_per_tangent(w * p * (u - mean_u) ** 2, state.outputs.dim())


class MSECurvature(OutputCurvature):
    """Λ of ``nn.MSELoss`` (outputs and targets of the same shape)."""

    def _factors(self, z: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> dict:
        return {"scale": 2.0 / z.numel() if self.reduction == "mean" else 2.0}

    def hessian_vector(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """Λu = 2c u."""
        return state.factors["scale"] * u


class BCEWithLogitsCurvature(OutputCurvature):
    """Λ of ``nn.BCEWithLogitsLoss`` without ``weight`` or ``pos_weight``."""

    def _factors(self, z: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> dict:
        scale = 1.0 / z.numel() if self.reduction == "mean" else 1.0
        s = torch.sigmoid(z.detach())
        return {"diag": scale * s * (1 - s)}

    def hessian_vector(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """Λu = c σ(z)(1 − σ(z)) ⊙ u."""
        return state.factors["diag"] * u
