"""Pick the output-space curvature for a loss: a closed form where one is exact, else autograd."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hessian_lab.output_curvature.autograd_curvature import AutogradCurvature
from hessian_lab.output_curvature.base import OutputCurvature
from hessian_lab.output_curvature.closed_forms import (
    BCEWithLogitsCurvature,
    CrossEntropyCurvature,
    MSECurvature,
)
from hessian_lab.output_curvature.gradient_outer_product import GradientOuterProduct
from hessian_lab.output_curvature.reduction import LossReduction


def output_curvature(
    loss: LossReduction | Callable,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    force_autograd: bool = False,
) -> OutputCurvature:
    """Return the Λ-product object for this loss and this batch.

    The closed forms are used only where they are exact for the given batch (e.g. cross-entropy
    with class indices and no class weights); anything else falls back to
    automatic differentiation, which is exact for every loss.

    Args:
        loss: The :class:`LossReduction` the caller decided (a bare loss is wrapped with
            ``LossReduction.of``, which reads its ``reduction`` attribute or assumes a mean).
        outputs: The batch's outputs z (decides whether a closed form applies).
        targets: The batch's targets.
        force_autograd: Always use automatic differentiation (for testing the closed forms).
    """
    loss = LossReduction.of(loss)
    fn = loss.loss_fn
    if not force_autograd:
        if (
            type(fn) is nn.CrossEntropyLoss
            and fn.weight is None
            and outputs.dim() == 2
            and not targets.is_floating_point()
        ):
            return CrossEntropyCurvature(loss)
        if type(fn) is nn.MSELoss and outputs.shape == targets.shape:
            return MSECurvature(loss)
        if (
            type(fn) is nn.BCEWithLogitsLoss
            and fn.weight is None
            and fn.pos_weight is None
            and outputs.shape == targets.shape
        ):
            return BCEWithLogitsCurvature(loss)
    return AutogradCurvature(loss)


def gradient_outer_product(loss: LossReduction | Callable) -> GradientOuterProduct:
    """The GN baseline's output-space matrix s_b γ_n γ_nᵀ for this loss (per example)."""
    return GradientOuterProduct(LossReduction.of(loss, required=True))
