"""The paper's GN baseline: outer products of loss gradients (the "empirical Fisher")."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from hessian_lab.core import Batch, BatchFn, OutputFn
from hessian_lab.operators.ggn import JacobianCurvatureOperator
from hessian_lab.output_curvature import (
    OutputCurvature,
    gradient_outer_product,
    output_curvature,
)

MODES = ("per_sample", "batch")


class EmpiricalFisherOperator(JacobianCurvatureOperator):
    r"""The paper's GN matrix: ∇²L replaced by an outer product of loss gradients (footnote 8).

    The paper's text admits two readings; both are here.

    * ``mode="per_sample"`` (default), the *empirical Fisher*:

      .. math:: GN = \frac{1}{N} \sum_n g_n g_n^\top = \frac{1}{N} \sum_n J_n^\top
                (\nabla \ell_n \nabla \ell_n^\top) J_n, \qquad g_n = J_n^\top \nabla_z \ell_n

      (drop 1/N for ``reduction="sum"``; for MSE/BCE with ``"mean"``, ℓ_n is the example's loss
      averaged over its outputs, as PyTorch's mean does). GN v = (1/N) Σ g_n (∇ℓ_n · J_n v):
      one JVP, per-example dot products and one VJP; per-example gradients are never formed.
      It is Q with Λ_n replaced by ∇ℓ_n ∇ℓ_nᵀ
      (:class:`~hessian_lab.output_curvature.GradientOuterProduct`).
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
        output_fn: OutputFn | None = None,
        batch_fn: BatchFn | None = None,
        progress: bool = False,
        process_group: Any = None,
        jvp_method: str = "auto",
        trace_limit_bytes: int | None = 64 * 2**20,
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
            output_fn=output_fn,
            batch_fn=batch_fn,
            progress=progress,
            process_group=process_group,
            jvp_method=jvp_method,
            trace_limit_bytes=trace_limit_bytes,
        )

    def _output_matrix(self, outputs: torch.Tensor, targets: torch.Tensor) -> OutputCurvature:
        if self.mode == "batch":  # G Gᵀ needs only the gradient, whatever the reduction
            return output_curvature(self.loss_reduction, outputs, targets)
        return gradient_outer_product(self.loss_reduction)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """GN V for a checked ``[P, k]`` matrix V; for ``mode="batch"`` G (Gᵀ V)."""
        if self.mode == "per_sample":
            return super()._matmat(V)
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
