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

_REDUCTIONS = ("mean", "sum")


def loss_reduction(loss_fn: Callable) -> str:
    """The reduction of ``loss_fn``: its ``reduction`` attribute, else ``"mean"`` for a callable."""
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be a loss module or a callable (outputs, targets) -> scalar, "
            f"got {type(loss_fn).__name__}."
        )
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r} is not supported: curvature is defined for a scalar risk. "
            "Use reduction='mean' or reduction='sum'."
        )
    return reduction


def output_curvature(
    loss_fn: Callable, outputs: torch.Tensor, targets: torch.Tensor, *, force_autograd: bool = False
) -> OutputCurvature:
    """Return the Λ-product object for this loss and this batch.

    The closed forms are used only where they are exact for the given batch (e.g. cross-entropy
    with class indices, no class weights and no ignored targets); anything else falls back to
    automatic differentiation, which is exact for every loss.

    Args:
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` or any callable.
        outputs: The batch's outputs z (decides whether a closed form applies).
        targets: The batch's targets.
        force_autograd: Always use automatic differentiation (for testing the closed forms).
    """
    reduction = loss_reduction(loss_fn)
    if not force_autograd:
        if (
            type(loss_fn) is nn.CrossEntropyLoss
            and loss_fn.weight is None
            and outputs.dim() == 2
            and not targets.is_floating_point()
            and not bool((targets == loss_fn.ignore_index).any())
        ):
            return CrossEntropyCurvature(loss_fn, reduction)
        if type(loss_fn) is nn.MSELoss and outputs.shape == targets.shape:
            return MSECurvature(loss_fn, reduction)
        if (
            type(loss_fn) is nn.BCEWithLogitsLoss
            and loss_fn.weight is None
            and loss_fn.pos_weight is None
            and outputs.shape == targets.shape
        ):
            return BCEWithLogitsCurvature(loss_fn, reduction)
    return AutogradCurvature(loss_fn, reduction)
