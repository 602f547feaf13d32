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


def loss_reduction(
    loss_fn: Callable, reduction: str | None = None, *, required: bool = False
) -> str:
    """How ``loss_fn`` reduces over the examples of a batch: ``"mean"`` or ``"sum"``.

    Taken from the loss's ``reduction`` attribute (every ``nn`` loss has one), else from the
    ``reduction`` argument. A plain callable with neither is assumed to average, unless the
    answer changes the result (``required``: several batches to combine, or per-example
    gradients to form), where guessing could return a silently wrong number.

    Raises:
        ValueError: Unsupported or contradictory reductions, or an unknown one when required.
    """
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be a loss module or a callable (outputs, targets) -> scalar, "
            f"got {type(loss_fn).__name__}."
        )
    declared = getattr(loss_fn, "reduction", None)
    if declared is not None and reduction is not None and declared != reduction:
        raise ValueError(
            f"reduction={reduction!r} contradicts loss_fn.reduction={declared!r}; drop one."
        )
    reduction = declared if declared is not None else reduction
    if reduction is None:
        if required:
            raise ValueError(
                "loss_fn has no `reduction` attribute, so it is unknown whether it averages or "
                "sums over the examples of a batch, which changes how batches combine and what "
                "a per-example gradient is. Pass reduction='mean' or reduction='sum' (or set "
                "loss_fn.reduction)."
            )
        reduction = "mean"
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r} is not supported: curvature is defined for a scalar risk. "
            "Use reduction='mean' or reduction='sum'."
        )
    return reduction


def mean_denominator(loss_fn: Callable, targets: torch.Tensor, batch_size: int) -> float:
    """What a ``"mean"`` loss divides the batch's summed loss by.

    N_b for most losses; for cross-entropy / NLL with class indices, the summed class weight of
    the targets that are not ``ignore_index`` (PyTorch's weighted mean). Combining batches with
    weights D_b / Σ D_b then reproduces the mean over the whole data set exactly.
    """
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and not targets.is_floating_point():
        valid = targets != loss_fn.ignore_index
        if loss_fn.weight is not None:
            return float(loss_fn.weight.to(targets.device)[targets[valid]].sum())
        return float(valid.sum())
    return float(batch_size)


def output_curvature(
    loss_fn: Callable, outputs: torch.Tensor, targets: torch.Tensor, *, force_autograd: bool = False
) -> OutputCurvature:
    """Return the Λ-product object for this loss and this batch.

    The closed forms are used only where they are exact for the given batch (e.g. cross-entropy
    with class indices and no class weights); anything else falls back to
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
