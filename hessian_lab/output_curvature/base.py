"""Output-space curvature: the Hessian Λ = ∇²_z L_b of a batch loss with respect to the outputs.

For a batch of N_b examples with outputs z (shape ``[N_b, ...]``), L_b(z) is the loss exactly as
the PyTorch loss computes it, reduction included. Products with Λ are cheap (output space), and
they are what turns Jacobian products into the paper's Q = Jᵀ Λ J (DESIGN.md §2). The same
interface carries the GN baseline's output-space matrix (:mod:`.gradient_outer_product`), so
that every Jacobian-based curvature is C_b = Jᵀ M J with one M per curvature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from hessian_lab.output_curvature.reduction import LossReduction


@dataclass
class OutputState:
    """What a batch's output curvature needs, computed once and reused for every tangent.

    Attributes:
        outputs: z, detached, ``[N_b, ...]``.
        targets: y.
        loss: L_b(z), a 0-dim tensor.
        output_grad: ∂L_b/∂z, shape of z.
        factors: Loss-specific quantities (softmax probabilities, σ(1−σ), a scale, an autograd
            graph) that do not depend on the tangent.
    """

    outputs: torch.Tensor
    targets: torch.Tensor
    loss: torch.Tensor
    output_grad: torch.Tensor
    factors: dict


class OutputCurvature(ABC):
    """Products with an output-space matrix M (Λ for Q, ∇ℓ∇ℓᵀ for GN) for one loss.

    Tangents ``u`` have the shape of z, optionally with one leading dimension of k tangents.

    Args:
        loss: The loss and its reduction (:class:`LossReduction`), decided once by the caller.
    """

    def __init__(self, loss: LossReduction):
        self.loss = loss

    @property
    def loss_fn(self):
        """The loss callable."""
        return self.loss.loss_fn

    @property
    def reduction(self) -> str:
        """``"mean"`` or ``"sum"``."""
        return self.loss.reduction

    def state(self, outputs: torch.Tensor, targets: torch.Tensor) -> OutputState:
        """Evaluate the loss, its output gradient and the tangent-independent factors."""
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(z, targets)
            (grad,) = torch.autograd.grad(loss, z, create_graph=self._needs_graph())
        state = OutputState(z.detach(), targets, loss.detach(), grad.detach(), {})
        state.factors = self._factors(z, targets, grad)
        return state

    def _needs_graph(self) -> bool:
        return False

    @abstractmethod
    def _factors(self, z: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> dict:
        """Tangent-independent quantities for :meth:`hessian_vector`."""

    @abstractmethod
    def hessian_vector(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """Return M u (same shape as u)."""

    def quadratic_form(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """Return uᵀ M u, one value per leading tangent if u has an extra leading dimension."""
        prod = self.hessian_vector(state, u) * u
        return sum_per_tangent(prod, state.outputs.dim())


def sum_per_tangent(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Sum the last ``ndim`` dimensions (one tangent's worth, or one example's) of t."""
    return t.sum(dim=tuple(range(t.dim() - ndim, t.dim()))) if ndim else t
