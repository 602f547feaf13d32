"""The exact Hessian H of the risk, by reverse-over-reverse (double backward) products."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hessian_lab.core import conv_double_backward, params_to_matrix, params_to_vector
from hessian_lab.operators.base import CurvatureOperator


def hessian_vector_products(
    grads: Sequence[torch.Tensor],
    leaves: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    *,
    batched: bool = False,
    retain_graph: bool = True,
) -> list[torch.Tensor]:
    """H v = ∂(∇h · v)/∂θ by a backward through the graph of ``grads`` (double backward).

    Args:
        grads: ∇h as tensors built with ``create_graph=True`` from ``leaves``; one without a
            graph (``requires_grad`` false) is a constant and contributes nothing.
        leaves: The parameters θ the gradient was taken with respect to.
        tangents: v, one tensor per leaf (with a leading dimension of k when ``batched``).
        batched: k tangents at once (``is_grads_batched``).
        retain_graph: Keep the graph for further products.

    Returns:
        H v per leaf; a parameter the gradient does not depend on gets a zero row of H.
    """
    # A gradient without a graph (of a parameter the loss does not use, or enters linearly with
    # a constant coefficient) does not depend on θ: its column block of H is zero.
    pairs = [(g, t) for g, t in zip(grads, tangents, strict=True) if g.requires_grad]
    prods: Sequence[torch.Tensor | None] = [None] * len(leaves)
    if pairs:
        with torch.enable_grad():
            prods = torch.autograd.grad(
                [g for g, _ in pairs],
                list(leaves),
                grad_outputs=[t for _, t in pairs],
                retain_graph=retain_graph,
                allow_unused=True,
                is_grads_batched=batched,
            )
    return [
        torch.zeros_like(t) if hp is None else hp for hp, t in zip(prods, tangents, strict=True)
    ]


def hessian_quadratic(
    grads: Sequence[torch.Tensor],
    leaves: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    *,
    retain_graph: bool = True,
) -> torch.Tensor:
    """vᵀ H v from one Hessian-vector product (:func:`hessian_vector_products`), a 0-dim tensor."""
    prods = hessian_vector_products(grads, leaves, tangents, retain_graph=retain_graph)
    return torch.stack([(hp * t).sum() for hp, t in zip(prods, tangents, strict=True)]).sum()


@dataclass
class HessianState:
    """A batch's loss and gradient with their autograd graph kept for Hessian products."""

    leaves: dict[str, torch.Tensor]
    loss: torch.Tensor
    grads: tuple[torch.Tensor, ...]
    inputs: Any
    targets: torch.Tensor


class HessianOperator(CurvatureOperator):
    r"""The exact Hessian H = ∇²h(θ) of the risk.

    .. math:: H = \frac{1}{N} \sum_n \Big[ J_n^\top \Lambda_n J_n
              + \sum_c \frac{\partial \ell_n}{\partial z_{nc}} \nabla^2_\theta z_{nc} \Big]

    (drop 1/N for ``reduction="sum"``); ∇²h_S(θ) in the paper's §2.2, of which Q keeps the first
    term. H can be indefinite.

    Products are double backward through a gradient graph built once per batch: H v =
    ∂(∇h · v)/∂θ. We do not use ``torch.func.hessian`` or reverse-over-forward, which return
    wrong Hessians through LayerNorm in torch 2.13 (DESIGN.md §6); double backward agrees with
    finite differences to 1e-10 there. ``matmat`` loops over the columns on CPU (the default),
    each one double backward through the cached graph on a contiguous column (the loop reads
    its columns from one transposed copy of V): ``matmat(16)`` measured 1.5 gradients per
    column on the MLP of ``analyses/benchmark_operators.py`` (1.3 for the products alone; a
    strided column cost 1.7) and 2.6-2.8 on its CNN, against 1.6 and 7.5 for vmapped
    forward-over-reverse, whose larger matrix products were no faster per column on one CPU
    thread. ``matmat_mode="vmap"`` (the default off the CPU) uses
    ``vmap(jvp(grad(h)))``, also exact through LayerNorm; where forward mode fails
    (``MSELoss("mean")`` in torch 2.13) it falls back to ``is_grads_batched`` double backward,
    and to a loop where an operation has no batching rule.
    See :class:`CurvatureOperator` for arguments.
    """

    #: Whether vmapped forward-over-reverse works for this model and loss (None: not tried yet).
    _forward_over_reverse: bool | None = None

    def _batch_state(self, inputs: Any, targets: torch.Tensor) -> HessianState:
        leaves = {n: p.detach().requires_grad_(True) for n, p in self._params.items()}
        # Convolutions with an exact double backward that does fewer convolutions than PyTorch's.
        with torch.enable_grad(), conv_double_backward():
            loss = self.loss_reduction(self._f(leaves, inputs), targets)
            grads = torch.autograd.grad(
                loss, list(leaves.values()), create_graph=True, allow_unused=True
            )
        # A parameter the loss does not use has a zero gradient (and zero rows and columns of H).
        grads = tuple(
            torch.zeros_like(p) if g is None else g
            for g, p in zip(grads, leaves.values(), strict=True)
        )
        return HessianState(leaves, loss.detach(), grads, inputs, targets)

    def _forward_over_reverse_matmat(
        self, state: HessianState, tangents: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        params = {n: p.detach() for n, p in state.leaves.items()}

        def risk(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss_reduction(self._f(p, state.inputs), state.targets)

        def hvp(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.jvp(torch.func.grad(risk), (params,), (t,))[1]

        return params_to_matrix(torch.func.vmap(hvp)(tangents))

    def _hvp(self, state: HessianState, tangents: list[torch.Tensor], batched: bool) -> list:
        return hessian_vector_products(
            state.grads, list(state.leaves.values()), tangents, batched=batched
        )

    def _batch_matmat(self, state: HessianState, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        ts = list(tangents.values())
        k = ts[0].shape[0]
        if k == 1:
            return self._columns([self._hvp(state, [t[0] for t in ts], batched=False)])
        if self._forward_over_reverse is not False:
            try:
                out = self._forward_over_reverse_matmat(state, tangents)
                self._forward_over_reverse = True
                return out
            except Exception:  # noqa: BLE001 - an optimization with an exact fallback below
                # e.g. ZeroTensors in MSELoss("mean"), or a model that does not run under vmap
                self._forward_over_reverse = False
        try:
            prods = self._hvp(state, ts, batched=True)
            return params_to_matrix(dict(zip(state.leaves, prods, strict=True)))
        except RuntimeError:
            # Some operations have no vmap rule for their double backward: loop instead.
            return self._columns(
                [self._hvp(state, [t[i] for t in ts], batched=False) for i in range(k)]
            )

    def _columns(self, cols: list[list[torch.Tensor]]) -> torch.Tensor:
        if len(cols) == 1:  # a view, not a stacked copy
            return params_to_vector(cols[0]).unsqueeze(1)
        return torch.stack([params_to_vector(c) for c in cols], dim=1)

    def _batch_quadratic(
        self, state: HessianState, tangent: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return hessian_quadratic(state.grads, list(state.leaves.values()), list(tangent.values()))

    def _batch_gradient(self, state: HessianState) -> tuple[torch.Tensor, torch.Tensor]:
        return state.loss, params_to_vector([g.detach() for g in state.grads])
