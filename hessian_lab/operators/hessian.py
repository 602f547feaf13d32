"""The exact Hessian H of the risk, by reverse-over-reverse (double backward) products."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hessian_lab.core import params_to_matrix, params_to_vector
from hessian_lab.operators.base import CurvatureOperator
from hessian_lab.output_curvature.base import _check_scalar


@dataclass
class HessianState:
    """A batch's loss and gradient with their autograd graph kept for Hessian products."""

    leaves: dict[str, torch.Tensor]
    loss: torch.Tensor
    grads: tuple[torch.Tensor, ...]
    inputs: torch.Tensor
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
    finite differences to 1e-10 there. ``k`` products at once (``matmat_mode="vmap"``) use
    forward-over-reverse, ``vmap(jvp(grad(h)))``, also exact through LayerNorm and measured
    1.3 instead of 1.7-1.9 gradients per column on a dense MLP; where forward mode fails
    (``MSELoss("mean")`` in torch 2.13) they fall back to ``is_grads_batched`` double backward,
    and to a loop where an operation has no batching rule.
    See :class:`CurvatureOperator` for arguments.
    """

    #: Whether vmapped forward-over-reverse works for this model and loss (None: not tried yet).
    _forward_over_reverse: bool | None = None

    def _batch_state(self, inputs: torch.Tensor, targets: torch.Tensor) -> HessianState:
        leaves = {n: p.detach().requires_grad_(True) for n, p in self._params.items()}
        with torch.enable_grad():
            loss = self.loss_fn(self._f(leaves, inputs), targets)
            _check_scalar(loss)
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        return HessianState(leaves, loss.detach(), grads, inputs, targets)

    def _forward_over_reverse_matmat(
        self, state: HessianState, tangents: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        params = {n: p.detach() for n, p in state.leaves.items()}

        def risk(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss_fn(self._f(p, state.inputs), state.targets)

        def hvp(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.jvp(torch.func.grad(risk), (params,), (t,))[1]

        return params_to_matrix(torch.func.vmap(hvp)(tangents))

    def _hvp(self, state: HessianState, tangents: list[torch.Tensor], batched: bool) -> tuple:
        with torch.enable_grad():
            return torch.autograd.grad(
                state.grads,
                list(state.leaves.values()),
                grad_outputs=tangents,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )

    def _batch_matmat(self, state: HessianState, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        ts = list(tangents.values())
        k = ts[0].shape[0]
        if k == 1:
            cols = [self._hvp(state, [t[0] for t in ts], batched=False)]
            return self._columns(state, cols)
        if self._forward_over_reverse is not False:
            try:
                out = self._forward_over_reverse_matmat(state, tangents)
                self._forward_over_reverse = True
                return out
            except (RuntimeError, NotImplementedError):
                self._forward_over_reverse = False  # e.g. ZeroTensors in MSELoss("mean")
        try:
            prods = self._hvp(state, ts, batched=True)
            return params_to_matrix(
                dict(zip(state.leaves, self._fill(state, prods, k), strict=True))
            )
        except RuntimeError:
            # Some operations have no vmap rule for their double backward: loop instead.
            cols = [self._hvp(state, [t[i] for t in ts], batched=False) for i in range(k)]
            return self._columns(state, cols)

    @staticmethod
    def _fill(state: HessianState, prods: tuple, k: int | None = None) -> list[torch.Tensor]:
        # A parameter the gradient does not depend on has a zero Hessian row.
        out = []
        for p, hp in zip(state.leaves.values(), prods, strict=True):
            if hp is None:
                hp = torch.zeros((k, *p.shape) if k else p.shape, dtype=p.dtype, device=p.device)
            out.append(hp)
        return out

    def _columns(self, state: HessianState, cols: list[tuple]) -> torch.Tensor:
        return torch.stack([params_to_vector(self._fill(state, c)) for c in cols], dim=1)

    def _batch_quadratic(
        self, state: HessianState, tangent: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        prods = self._fill(state, self._hvp(state, list(tangent.values()), batched=False))
        return sum((hp * t).sum() for hp, t in zip(prods, tangent.values(), strict=True))

    def _batch_gradient(self, state: HessianState) -> tuple[torch.Tensor, torch.Tensor]:
        return state.loss, params_to_vector([g.detach() for g in state.grads])
