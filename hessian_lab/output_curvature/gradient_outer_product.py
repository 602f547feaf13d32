"""The GN baseline's output-space matrix: outer products of per-example loss gradients.

The paper's GN (footnote 8) replaces ∇²L by an outer product of loss gradients. Read per
example (the empirical Fisher), a batch's GN is

    GN_b = (1/D_b) Σ_n g_n g_nᵀ = Jᵀ M J,   M = blockdiag_n( s_b γ_n γ_nᵀ ),

with γ_n = ∂L_b/∂z_n, the per-example gradient g_n = Jᵀ ∇ℓ_n, ∇ℓ_n = s_b γ_n and s_b = D_b for
``"mean"`` or 1 for ``"sum"`` (:class:`~hessian_lab.output_curvature.reduction.LossReduction`).
So GN v = Jᵀ (s_b γ_n (γ_n · u_n)) with u = J v, and vᵀ GN v = s_b Σ_n (γ_n · u_n)²:
per-example gradients are never formed.
"""

from __future__ import annotations

import torch

from hessian_lab.output_curvature.base import OutputCurvature, OutputState, sum_per_tangent


class GradientOuterProduct(OutputCurvature):
    """M_n = s_b γ_n γ_nᵀ for every example n of a batch (the empirical Fisher's Λ)."""

    def _factors(self, z: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> dict:
        scale = self.loss.example_scale(targets)
        if isinstance(scale, torch.Tensor):  # summed class weights: keep z's dtype
            scale = scale.to(z.dtype)
        return {"scale": scale}

    def example_dots(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """γ_n · u_n for every example (and every leading tangent)."""
        return sum_per_tangent(state.output_grad * u, state.outputs.dim() - 1)

    def hessian_vector(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """M u = s_b γ_n (γ_n · u_n)."""
        dots = self.example_dots(state, u)
        grad = state.output_grad
        return state.factors["scale"] * dots.reshape(*dots.shape, *([1] * (grad.dim() - 1))) * grad

    def quadratic_form(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """uᵀ M u = s_b Σ_n (γ_n · u_n)²."""
        dots = self.example_dots(state, u)
        return state.factors["scale"] * (dots * dots).sum(dim=-1)
