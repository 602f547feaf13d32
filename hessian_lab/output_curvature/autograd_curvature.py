"""Λ by automatic differentiation in output space, for any loss.

Λu = ∂/∂z (∂L_b/∂z · u) by double backward. Double backward is used rather than forward mode
because forward-over-reverse fails on some built-in losses in torch 2.13 (``nn.MSELoss`` with
``reduction="mean"`` raises "ZeroTensors are immutable"; DESIGN.md §6).
"""

from __future__ import annotations

import torch

from hessian_lab.output_curvature.base import OutputCurvature, OutputState


class AutogradCurvature(OutputCurvature):
    """Λ-products of an arbitrary loss ``(outputs, targets) -> scalar``, by double backward."""

    def _needs_graph(self) -> bool:
        return True

    def _factors(self, z: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> dict:
        # Keep the graph of ∂L/∂z(z) so that each product is one backward in output space.
        return {"z": z, "grad": grad}

    def hessian_vector(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """Λu = ∂(∂L_b/∂z · u)/∂z, one backward per tangent through the kept graph."""
        z, grad = state.factors["z"], state.factors["grad"]
        if u.dim() == z.dim():
            return self._one(z, grad, u)
        return torch.stack([self._one(z, grad, ui) for ui in u])

    @staticmethod
    def _one(z: torch.Tensor, grad: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            (hu,) = torch.autograd.grad(grad, z, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if hu is None else hu
