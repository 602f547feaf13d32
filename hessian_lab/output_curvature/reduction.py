"""The one owner of a loss's reduction: decided once from ``(loss_fn, reduction=)``.

How a loss reduces over the examples of a batch changes every curvature's scale, per-example
gradients most of all (DESIGN.md §6). A batch loss L_b over N_b examples is

* ``"mean"``: L_b = (1/D_b) Σ_n ℓ_n, with D_b = N_b (the first dimension of the targets), or,
  for ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with class indices, the summed class weight of
  the targets that are not ``ignore_index`` (PyTorch's weighted mean);
* ``"sum"``: L_b = Σ_n ℓ_n.

Over several batches the data-set risk is h = Σ_b w_b L_b with w_b = D_b / Σ_b D_b (mean) or 1
(sum), exactly one big batch's loss. The per-example gradient is ∇ℓ_n = s_b ∂L_b/∂z_n with
s_b = D_b (mean) or 1 (sum). Operators, output curvatures, step sizes, ADLER and the
distributed code all read these from one :class:`LossReduction`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

REDUCTIONS = ("mean", "sum")


def check_scalar(loss: Any) -> torch.Tensor:
    """Return ``loss`` if it is a 0-dim tensor, else raise a ValueError naming the fix."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"The loss must return a scalar, got {shape}. Use reduction='mean' or 'sum' "
            "(reduction='none' gives per-element losses, which have no single curvature)."
        )
    return loss


@dataclass(frozen=True)
class LossReduction:
    """A loss function together with how it reduces over a batch's examples.

    Build it with :meth:`of`. Attributes:
        loss_fn: The callable ``(outputs, targets) -> scalar``.
        reduction: ``"mean"`` or ``"sum"``.
        declared: Whether the reduction was known (an attribute or an argument) rather than
            assumed to be ``"mean"``.
    """

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    reduction: str
    declared: bool = True

    @classmethod
    def of(
        cls, loss_fn: Any, reduction: str | None = None, *, required: bool = False
    ) -> LossReduction:
        """Decide the reduction of ``loss_fn``, once.

        Taken from the loss's ``reduction`` attribute (every ``nn`` loss has one, and so may a
        callable object), else from the ``reduction`` argument. A plain callable with neither
        is assumed to average, unless the answer changes the result (``required``: several
        batches to combine, or per-example gradients to form), where guessing could return a
        silently wrong number. A :class:`LossReduction` passes through (checked against
        ``reduction``).

        Raises:
            TypeError: ``loss_fn`` is not callable.
            ValueError: Unsupported or contradictory reductions, or an unknown one when required.
        """
        if isinstance(loss_fn, LossReduction):
            if reduction is not None and reduction != loss_fn.reduction:
                raise ValueError(
                    f"reduction={reduction!r} contradicts the loss's {loss_fn.reduction!r}."
                )
            if required and not loss_fn.declared:
                return cls.of(loss_fn.loss_fn, None, required=True)
            return loss_fn
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a loss module or a callable (outputs, targets) -> scalar, "
                f"got {type(loss_fn).__name__}."
            )
        attribute = getattr(loss_fn, "reduction", None)
        if attribute is not None and reduction is not None and attribute != reduction:
            raise ValueError(
                f"reduction={reduction!r} contradicts loss_fn.reduction={attribute!r}; drop one."
            )
        chosen = attribute if attribute is not None else reduction
        declared = chosen is not None
        if chosen is None:
            if required:
                raise ValueError(
                    "loss_fn has no `reduction` attribute, so it is unknown whether it averages "
                    "or sums over the examples of a batch, which changes how batches combine and "
                    "what a per-example gradient is. Pass reduction='mean' or reduction='sum' "
                    "(or set loss_fn.reduction)."
                )
            chosen = "mean"
        if chosen not in REDUCTIONS:
            raise ValueError(
                f"reduction={chosen!r} is not supported: curvature is defined for a scalar risk. "
                "Use reduction='mean' or reduction='sum'."
            )
        return cls(loss_fn, chosen, declared)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """L_b(z), checked to be a scalar."""
        return check_scalar(self.loss_fn(outputs, targets))

    def _class_weights(self, targets: torch.Tensor) -> torch.Tensor | None:
        """Per-example weights of a class-index cross-entropy / NLL mean (ignored targets: 0)."""
        fn = self.loss_fn
        if not isinstance(fn, (nn.CrossEntropyLoss, nn.NLLLoss)) or targets.is_floating_point():
            return None
        valid = targets != fn.ignore_index
        if fn.weight is None:
            return valid.to(torch.float64)
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        return fn.weight.to(targets.device, torch.float64)[safe] * valid

    def denominator(self, targets: torch.Tensor) -> torch.Tensor | float:
        """D_b, what a ``"mean"`` loss divides the batch's summed loss by.

        A float N_b for most losses; for a class-index cross-entropy / NLL a 0-dim tensor (no
        host synchronization), the summed class weight of the non-ignored targets.
        """
        weights = self._class_weights(targets)
        if weights is not None:
            return weights.sum()
        return float(targets.shape[0]) if targets.dim() else 1.0

    def example_scale(self, targets: torch.Tensor) -> torch.Tensor | float:
        """s_b with ∇ℓ_n = s_b ∂L_b/∂z_n: D_b for ``"mean"``, 1 for ``"sum"``."""
        return self.denominator(targets) if self.reduction == "mean" else 1.0

    def batch_weight(self, targets: torch.Tensor, total_denominator: float) -> float:
        """w_b = D_b / D for ``"mean"`` (D = Σ_b D_b over the data), 1 for ``"sum"``."""
        if self.reduction == "sum":
            return 1.0
        return float(self.denominator(targets)) / total_denominator

    def sub_batch_scale(self, num_examples: int, num_sub_examples: int) -> float:
        """Factor taking a sub-batch's L to the batch's: N_b/m for ``"sum"``, 1 for ``"mean"``."""
        return num_examples / num_sub_examples if self.reduction == "sum" else 1.0
