"""Output-space curvature: the Hessian Λ = ∇²_z L_b of a batch loss with respect to the outputs.

For a batch of N_b examples with outputs z (shape ``[N_b, ...]``), L_b(z) is the loss exactly as
the PyTorch loss computes it, reduction included. Products with Λ are cheap (output space), and
they are what turns Jacobian products into the paper's Q = Jᵀ Λ J (DESIGN.md §2).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


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
    """Λ-products for one loss function and one reduction.

    Tangents ``u`` have the shape of z, optionally with one leading dimension of k tangents.

    Attributes:
        loss_fn: The callable ``(outputs, targets) -> scalar``.
        reduction: ``"mean"`` (the loss averages over examples) or ``"sum"``.
    """

    def __init__(
        self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], reduction: str
    ):
        self.loss_fn = loss_fn
        self.reduction = reduction

    def example_scale(self, num_batch_examples: int) -> float:
        """Factor turning ∂L_b/∂z_n into the per-example gradient ∇ℓ_n (N_b for mean, 1 for sum)."""
        return float(num_batch_examples) if self.reduction == "mean" else 1.0

    def state(self, outputs: torch.Tensor, targets: torch.Tensor) -> OutputState:
        """Evaluate the loss, its output gradient and the tangent-independent factors."""
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(z, targets)
            _check_scalar(loss)
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
        """Return Λ u (same shape as u)."""

    def quadratic_form(self, state: OutputState, u: torch.Tensor) -> torch.Tensor:
        """Return uᵀ Λ u, one value per leading tangent if u has an extra leading dimension."""
        prod = self.hessian_vector(state, u) * u
        return _sum_trailing(prod, state.outputs.dim())


def _sum_trailing(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Sum the last ``ndim`` dimensions (one tangent's worth) of t."""
    return t.sum(dim=tuple(range(t.dim() - ndim, t.dim()))) if ndim else t


def _check_scalar(loss: torch.Tensor) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"The loss must return a scalar, got {shape}. Use reduction='mean' or 'sum' "
            "(reduction='none' gives per-element losses, which have no single curvature)."
        )
