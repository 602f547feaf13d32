"""The paper's Q: the generalized Gauss–Newton matrix (ADLER §2.2)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from hessian_lab.core import Linearization, params_to_matrix, params_to_vector
from hessian_lab.operators.base import CurvatureOperator
from hessian_lab.output_curvature import OutputCurvature, OutputState, output_curvature


@dataclass
class JacobianState:
    """A batch's linearization plus its output-space matrix M (Λ for Q, ∇ℓ∇ℓᵀ for GN)."""

    linearization: Linearization
    curvature: OutputCurvature
    output_state: OutputState


class JacobianCurvatureOperator(CurvatureOperator):
    """C = Σ_b w_b J_bᵀ M_b J_b for an output-space matrix M_b: the shared body of Q and GN.

    Per batch: C_b V = Jᵀ (M (J V)), vᵀ C_b v = (Jv)ᵀ M (Jv) (no VJP), and the gradient
    Jᵀ ∂L_b/∂z. Subclasses choose M through :meth:`_output_matrix`.
    """

    @abstractmethod
    def _output_matrix(self, outputs: torch.Tensor, targets: torch.Tensor) -> OutputCurvature:
        """M_b for one batch, from its outputs z and targets."""

    def _batch_state(self, inputs: Any, targets: torch.Tensor) -> JacobianState:
        """Forward once, keep the VJP closure, the linearized JVP and M's factors."""
        lin = Linearization(
            self._f,
            self._params,
            inputs,
            linearize=self.cache,
            method=self.jvp_method,
            trace_limit_bytes=self.trace_limit_bytes,
        )
        curvature = self._output_matrix(lin.outputs, targets)
        return JacobianState(lin, curvature, curvature.state(lin.outputs, targets))

    def _batch_matmat(
        self, state: JacobianState, tangents: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        u = state.linearization.jvp_batched(tangents)
        w = state.curvature.hessian_vector(state.output_state, u)
        return params_to_matrix(state.linearization.vjp_batched(w))

    def _batch_quadratic(
        self, state: JacobianState, tangent: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        u = state.linearization.jvp(tangent)
        return state.curvature.quadratic_form(state.output_state, u)

    def _batch_gradient(self, state: JacobianState) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_b, ∇L_b = Jᵀ ∂L_b/∂z) from a batch's Jacobian state."""
        grad = state.linearization.vjp(state.output_state.output_grad)
        return state.output_state.loss, params_to_vector(grad)


class GGNOperator(JacobianCurvatureOperator):
    r"""The paper's Q, the generalized Gauss–Newton (GGN) matrix of the risk.

    .. math:: Q = \frac{1}{N} \sum_n J_n^\top \Lambda_n J_n, \qquad
              \Lambda_n = \nabla^2_z \ell(z_n, y_n),\ J_n = \partial z_n / \partial \theta

    (drop 1/N for ``reduction="sum"``). This is ADLER's positive semi-definite approximation
    Q_S(θ) = ∇F_S(θ)ᵀ ∇²L_S(F_S(θ)) ∇F_S(θ) (Balboni & Bacciu, §2.2), known in the literature as
    the generalized Gauss–Newton matrix (Schraudolph 2002; Martens 2010). It is the Hessian H
    without the term Σ (∂ℓ/∂z)·∇²z, so it is PSD whenever the loss is convex in z.

    A product Q v costs one JVP (u = J v), an output-space product Λ u and one VJP; the quadratic
    form vᵀQv = (1/N) Σ u_nᵀ Λ_n u_n needs no VJP. See :class:`CurvatureOperator` for arguments.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessian_lab import GGNOperator
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> data = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> Q = GGNOperator(model, nn.CrossEntropyLoss(), data)
        >>> Q.shape
        (23, 23)
        >>> bool(Q.quadratic_form(torch.randn(23)) >= 0)
        True
    """

    def _output_matrix(self, outputs: torch.Tensor, targets: torch.Tensor) -> OutputCurvature:
        return output_curvature(self.loss_reduction, outputs, targets)
