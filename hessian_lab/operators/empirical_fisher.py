"""The paper's GN baseline: outer products of loss gradients (the "empirical Fisher")."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from hessian_lab.core import Batch, params_to_matrix
from hessian_lab.operators.base import CurvatureOperator
from hessian_lab.operators.ggn import JacobianState, jacobian_gradient, jacobian_state
from hessian_lab.output_curvature.base import _sum_trailing

MODES = ("per_sample", "batch")


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The paper's GN matrix: ∇²L replaced by an outer product of loss gradients (footnote 8).

    The paper's text admits two readings; both are here.

    * ``mode="per_sample"`` (default), the *empirical Fisher*:

      .. math:: GN = \frac{1}{N} \sum_n g_n g_n^\top = \frac{1}{N} \sum_n J_n^\top
                (\nabla \ell_n \nabla \ell_n^\top) J_n, \qquad g_n = J_n^\top \nabla_z \ell_n

      (drop 1/N for ``reduction="sum"``; for MSE/BCE with ``"mean"``, ℓ_n is the example's loss
      averaged over its outputs, as PyTorch's mean does). GN v = (1/N) Σ g_n (∇ℓ_n · J_n v):
      one JVP, per-example dot products and one VJP; per-example gradients are never formed.
    * ``mode="batch"``: L is the whole-data loss, so GN = G Gᵀ with G = ∇h, of rank one; in
      ADLER it gives η = 1 / ‖G‖².

    This matrix is not the loss's curvature (Kunstner et al., 2019): it is the paper's baseline.

    Args:
        mode: ``"per_sample"`` or ``"batch"``. Other arguments as in :class:`CurvatureOperator`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data: Batch | Iterable[Batch],
        params: Sequence[str] | None = None,
        mode: str = "per_sample",
        *,
        cache: bool | None = None,
        allow_train_mode: bool = False,
        matmat: str = "auto",
        reduction: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}.")
        self.mode = mode
        self._uses_example_gradients = mode == "per_sample"
        super().__init__(
            model,
            loss_fn,
            data,
            params,
            cache=cache,
            allow_train_mode=allow_train_mode,
            matmat=matmat,
            reduction=reduction,
        )

    def _batch_state(self, inputs: torch.Tensor, targets: torch.Tensor) -> JacobianState:
        return jacobian_state(self, inputs, targets)

    def _dots(self, state: JacobianState, u: torch.Tensor) -> torch.Tensor:
        """s_n = ∇ℓ_n · u_n for every example (and every leading tangent)."""
        out = state.output_state
        n_out = out.outputs.dim() - 1  # dimensions of one example's output
        scale = state.curvature.example_scale(out.outputs.shape[0])
        return scale * _sum_trailing(out.output_grad * u, n_out)

    def _batch_matmat(
        self, state: JacobianState, tangents: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        u = state.linearization.jvp_batched(tangents)
        s = self._dots(state, u)
        grad = state.output_state.output_grad
        # Jᵀ Σ_n s_n ∂L_b/∂z_n = (1/N_b) Σ_n g_n (g_n · v) for "mean" (∇ℓ_n = N_b ∂L_b/∂z_n).
        cot = s.reshape(*s.shape, *([1] * (grad.dim() - 1))) * grad
        return params_to_matrix(state.linearization.vjp_batched(cot))

    def _batch_quadratic(
        self, state: JacobianState, tangent: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        u = state.linearization.jvp(tangent)
        s = self._dots(state, u)
        scale = state.curvature.example_scale(u.shape[0])
        return (s * s).sum() / scale

    def _batch_gradient(self, state: JacobianState) -> tuple[torch.Tensor, torch.Tensor]:
        return jacobian_gradient(state)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return GN V for a ``[P, k]`` matrix V."""
        if self.mode == "per_sample":
            return super().matmat(V)
        V = self._check_vector(V, matrix=True)
        G = self.gradient()
        return G.unsqueeze(1) * (G @ V).unsqueeze(0)

    def quadratic_form(self, v: torch.Tensor) -> torch.Tensor:
        """Return vᵀ GN v; for ``mode="batch"`` this is (Gᵀv)²."""
        if self.mode == "per_sample":
            return super().quadratic_form(v)
        v = self._check_vector(v, matrix=False)
        return (self.gradient() @ v) ** 2

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", mode={self.mode!r})"
