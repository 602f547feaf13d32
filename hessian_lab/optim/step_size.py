r"""Step sizes that minimize the local quadratic model of the loss along a direction (ADLER §2.3).

For a batch I, the risk h = h_I, its gradient G = ∇h(θ), a direction d (default d = G) and a
curvature matrix C, the quadratic model h(θ − η d) ≈ h − η ∇hᵀd + ½ η² dᵀ(C + εI)d is minimized by

.. math:: \eta = \frac{\nabla h^\top d}{d^\top (C + \varepsilon I) d}
               = \frac{\nabla h^\top d}{d^\top C d + \varepsilon\, d^\top d}.

With d = G this is the paper's per-batch rate η_k = GᵀG / (GᵀQG + ε GᵀG). The ε of Algorithm 1
("Hessian regularization", 1e-10) is read as C + εI; this is our interpretation of a garbled text
(DESIGN.md §3). For the curvatures below it only matters when dᵀCd is tiny.

Curvatures C and their cost on top of one forward + backward for G (DESIGN.md §2):

* ``"ggn"``: the paper's Q, the generalized Gauss–Newton matrix. dᵀQd = uᵀΛu with u = J d:
  **one JVP** (by default a backward through G's kept graph; in forward mode,
  :func:`~hessian_lab.core.forward_jvp.forward_jvp`, it recomputes the primal alongside the
  tangent, about 1–2 forward passes) and an output-space product.
* ``"ef"``: the paper's GN read per example (empirical Fisher):
  dᵀGNd = (1/N) Σ_n (∇ℓ_n · u_n)², same u = J d: **one JVP**, no extra backward.
* ``"ef_batch"``: GN read on the whole batch, GN = G Gᵀ: dᵀGNd = (Gᵀd)², **free**.
  With d = G, η = 1 / (‖G‖² + ε).
* ``"hessian"``: the exact Hessian H. dᵀHd by **one Hessian-vector product**, double backward
  through the gradient's graph (forward + backward with ``create_graph=True``, then a second
  backward of about twice the cost). Not ``torch.func.hessian`` or reverse-over-forward, which are
  wrong through LayerNorm in torch 2.13 (DESIGN.md §6). H can be indefinite: when
  dᵀHd + ε dᵀd ≤ 0 the model has no minimizer along d; :class:`StepSize` then carries
  ``nonpositive_curvature=True`` and η = NaN, never a silently negative or infinite value.

``curvature_fraction`` estimates dᵀCd on the first ⌈f·N⌉ examples of the batch only (a sub-batch
mean for ``reduction="mean"``; for ``"sum"`` the sub-batch sum is scaled by N/m), which cuts the
JVP's (or the Hessian-vector product's) cost by about f.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from hessian_lab.core import (
    JVP_METHODS,
    ModelInputs,
    OutputFn,
    auto_jvp_method,
    backward_for_jvp,
    batch_examples,
    check_model_mode,
    conv_double_backward,
    forward,
    forward_jvp,
    functional_model,
    move_inputs,
    params_to_vector,
    select_parameters,
    slice_examples,
    vector_to_params,
)
from hessian_lab.operators.hessian import hessian_quadratic
from hessian_lab.output_curvature import (
    LossReduction,
    OutputCurvature,
    OutputState,
    gradient_outer_product,
    output_curvature,
)

CURVATURES = ("ggn", "ef", "ef_batch", "hessian")


class StepSize(NamedTuple):
    """The minimizer of the quadratic model along d, with its parts (all 0-dim tensors).

    Attributes:
        numerator: ∇hᵀd (GᵀG for d = G).
        denominator: dᵀCd + ε dᵀd.
        eta: numerator / denominator; NaN when the denominator is ≤ 0 or not finite.
        curvature: dᵀCd.
        nonpositive_curvature: True when dᵀCd + ε dᵀd ≤ 0 (possible only for ``"hessian"``, or
            for a zero direction).
    """

    numerator: torch.Tensor
    denominator: torch.Tensor
    eta: torch.Tensor
    curvature: torch.Tensor
    nonpositive_curvature: torch.Tensor


@dataclass
class GradientPass:
    """One batch's loss and gradient G, plus what the curvature along a direction still needs.

    Attributes:
        loss: h_I(θ), 0-dim, detached.
        gradient: G as parameter-shaped detached tensors keyed by name.
        num_examples: N_b, the batch's example count.
        curvature_examples: m, the examples the curvature term is computed on.
    """

    loss: torch.Tensor
    gradient: dict[str, torch.Tensor]
    num_examples: int
    curvature_examples: int
    inputs: ModelInputs
    targets: torch.Tensor
    output_curvature: OutputCurvature | None = None
    output_state: OutputState | None = None
    hessian_graph: tuple[list[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
    jvp_graph: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def flat_gradient(self) -> torch.Tensor:
        """G as one flat vector (the order of ``model.named_parameters()``)."""
        return params_to_vector(self.gradient)


def inner(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """aᵀb over parameter-shaped tensors, with dot products (no P-sized temporaries)."""
    dots = [torch.dot(t.reshape(-1), b[k].reshape(-1)) for k, t in a.items()]
    return torch.stack(dots).sum()


def curvature_examples(num_examples: int, fraction: float | None) -> int:
    """The sub-batch size m = ⌈f·N⌉ (at least 1), or N without a fraction."""
    if fraction is None:
        return num_examples
    return max(1, min(num_examples, math.ceil(fraction * num_examples)))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module torch.func can run: ``ddp.module`` for a DistributedDataParallel wrapper."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


class StepSizeEstimator:
    """Computes G and dᵀCd for one batch; :meth:`__call__` gives η = ∇hᵀd / dᵀ(C + εI)d.

    The two halves are separate (:meth:`gradient_pass`, :meth:`curvature_along`) so that a
    distributed optimizer can all-reduce G before the curvature is taken along it.

    Args:
        model: The network (a ``DistributedDataParallel`` wrapper is unwrapped to ``.module``).
        loss_fn: A loss ``(outputs, targets) -> scalar`` with ``reduction`` ``"mean"`` or ``"sum"``.
        reduction: For a plain callable loss without a ``reduction`` attribute: ``"mean"`` or
            ``"sum"`` (required for ``"ef"``); see
            :class:`~hessian_lab.output_curvature.LossReduction`.
        output_fn: Maps the model's output to the tensor the loss takes (default: a tensor,
            else its ``logits``).
        curvature: ``"ggn"`` (Q), ``"ef"`` (per-example GN), ``"ef_batch"`` (G Gᵀ) or
            ``"hessian"`` (H).
        params: ``None`` for every parameter with ``requires_grad``, or a list of names.
        eps: ε ≥ 0 of C + εI.
        curvature_fraction: f ∈ (0, 1] to estimate dᵀCd on a sub-batch; ``None`` for the batch.
        allow_train_mode: Accept BatchNorm/Dropout in train mode (see ``check_model_mode``).
        jvp_method: How u = J d is computed for ``"ggn"``/``"ef"``. ``"forward"``: forward-mode
            :func:`~hessian_lab.core.forward_jvp.forward_jvp` (recomputes the primal; about 3
            forward-matmul units per layer, 2 for the first).
            ``"double_backward"``: the gradient pass keeps G's graph as a function of ∂L/∂z and
            u = ∂(Gᵀd)/∂(∂L/∂z) is one more backward through it (about 2 units per layer, no
            primal recomputation, but the backward graph is kept: more memory; with
            ``curvature_fraction`` the forward is split in two so that this backward covers the
            sub-batch only). ``"auto"`` (default): :func:`auto_jvp_method`. Both are exact; they
            differ in rounding only.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        curvature: str = "ggn",
        params: Sequence[str] | None = None,
        eps: float = 1e-10,
        curvature_fraction: float | None = None,
        allow_train_mode: bool = False,
        jvp_method: str = "auto",
        *,
        reduction: str | None = None,
        output_fn: OutputFn | None = None,
    ) -> None:
        if jvp_method not in JVP_METHODS:
            raise ValueError(f"jvp_method={jvp_method!r} is not one of {JVP_METHODS}.")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature={curvature!r} is not one of {CURVATURES}.")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if curvature_fraction is not None and not 0 < curvature_fraction <= 1:
            raise ValueError(f"curvature_fraction must be in (0, 1], got {curvature_fraction}.")
        self.module = unwrap_model(model)
        check_model_mode(self.module, allow_train_mode)
        self.loss_fn = loss_fn
        # GN's per-example gradients depend on whether the loss averages or sums: never guess.
        self.loss_reduction = LossReduction.of(loss_fn, reduction, required=curvature == "ef")
        self.output_fn = output_fn
        self.curvature = curvature
        self.eps = float(eps)
        self.curvature_fraction = curvature_fraction
        self.jvp_method = jvp_method
        self._auto_jvp_method: str | None = None
        self.params = select_parameters(self.module, params)
        self.param_names = list(self.params)
        self._f = functional_model(self.module, self.param_names, output_fn)
        self._curvature_type: type[OutputCurvature] | None = None

    @property
    def reduction(self) -> str:
        """The loss's reduction, ``"mean"`` or ``"sum"``."""
        return self.loss_reduction.reduction

    # ---------------------------------------------------------------------------------------

    def _output_curvature(self, z: torch.Tensor, targets: torch.Tensor) -> OutputCurvature:
        """M of the curvature: the loss's Λ ("ggn", "hessian") or GN's ∇ℓ∇ℓᵀ ("ef")."""
        if self.curvature == "ef":
            return gradient_outer_product(self.loss_reduction)
        # Pick the closed form once: the factory inspects the targets (a host sync on CUDA).
        if self._curvature_type is None:
            chosen = output_curvature(self.loss_reduction, z, targets)
            self._curvature_type = type(chosen)
            return chosen
        return self._curvature_type(self.loss_reduction)

    def to_device(
        self, inputs: ModelInputs, targets: torch.Tensor
    ) -> tuple[ModelInputs, torch.Tensor]:
        """The batch on the parameters' device (no copy where it is there already)."""
        device = next(iter(self.params.values())).device
        return move_inputs(inputs, device), targets.to(device)

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        return forward(self.module, inputs, self.output_fn)

    def gradient_pass(self, inputs: ModelInputs, targets: torch.Tensor) -> GradientPass:
        """One forward + backward: the loss h_I(θ) and G = ∇h_I(θ).

        For ``"ggn"``/``"ef"`` the loss and ∂L/∂z are taken in output space and G = Jᵀ ∂L/∂z,
        so Λ's factors come for free. For ``"hessian"`` on the whole batch the graph of G is
        kept (``create_graph=True``) for the Hessian-vector product.
        """
        inputs, targets = self.to_device(inputs, targets)
        n = batch_examples(targets)
        m = curvature_examples(n, self.curvature_fraction)
        if self.curvature == "hessian" and m == n:
            loss, leaves, grads = self._gradient_graph(inputs, targets)
            gradient = {k: g.detach() for k, g in zip(self.param_names, grads, strict=True)}
            return GradientPass(
                loss.detach(), gradient, n, m, inputs, targets, hessian_graph=(leaves, grads)
            )
        leaves = list(self.params.values())
        # "double_backward": keep G's graph as a function of ∂L/∂z (sub-batch rows only) so that
        # u = J d = ∂(Gᵀd)/∂(∂L/∂z) reuses this forward instead of recomputing it.
        keep = self._jvp_method() == "double_backward" and self.curvature in ("ggn", "ef")
        split = keep and m < n
        # Convolutions whose backward differentiates cheaply to the JVP (core.backward_for_jvp).
        conv_mode = backward_for_jvp() if keep else nullcontext()
        with torch.enable_grad(), conv_mode:
            if split:  # two forwards, so the second backward runs over the sub-batch only
                z_sub = self._forward(slice_examples(inputs, slice(None, m)))
                z_rest = self._forward(slice_examples(inputs, slice(m, None)))
                z = torch.cat([z_sub, z_rest])
            else:
                z = self._forward(inputs)
        curv = self._output_curvature(z.detach(), targets)
        state = curv.state(z, targets)
        jvp_graph = None
        with torch.enable_grad():
            if not keep:
                grads = self._vjp(z, leaves, state.output_grad, create_graph=False)
            else:
                out_grad = state.output_grad[:m].detach().requires_grad_(True)
                sub = self._vjp(z_sub if split else z, leaves, out_grad, create_graph=True)
                jvp_graph = (sub, out_grad)
                grads = [g.detach() for g in sub]
                if split:
                    rest = self._vjp(z_rest, leaves, state.output_grad[m:], create_graph=False)
                    # In place: one P-sized allocation less per step (they page-fault, see
                    # docs/optimizer.md); rest is this backward's own output.
                    grads = [b.add_(a) for a, b in zip(grads, rest, strict=True)]
        gradient = dict(zip(self.param_names, grads, strict=True))
        if m < n:
            sub_state = curv.state(state.outputs[:m], targets[:m])
            return GradientPass(
                state.loss,
                gradient,
                n,
                m,
                slice_examples(inputs, slice(None, m)),
                targets[:m],
                curv,
                sub_state,
                None,
                jvp_graph,
            )
        return GradientPass(
            state.loss, gradient, n, m, inputs, targets, curv, state, None, jvp_graph
        )

    def _gradient_graph(
        self, inputs: ModelInputs, targets: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """(h, θ's leaves, ∇h built with ``create_graph=True``) for a Hessian-vector product.

        Convolutions run with the exact, lean double backward of
        :func:`~hessian_lab.core.conv_double_backward.conv_double_backward`.
        """
        leaves = list(self.params.values())
        with torch.enable_grad(), conv_double_backward():
            loss = self.loss_reduction(self._forward(inputs), targets)
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
        return loss, leaves, grads

    def _jvp_method(self) -> str:
        if self.jvp_method != "auto":
            return self.jvp_method
        if self._auto_jvp_method is None:
            self._auto_jvp_method = auto_jvp_method(self.module)
        return self._auto_jvp_method

    @staticmethod
    def _vjp(
        z: torch.Tensor, leaves: list[torch.Tensor], cotangent: torch.Tensor, create_graph: bool
    ) -> list[torch.Tensor]:
        """Jᵀ w for the parameters (zeros for a parameter z does not depend on)."""
        grads = torch.autograd.grad(
            z, leaves, grad_outputs=cotangent, create_graph=create_graph, allow_unused=True
        )
        return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)]

    def curvature_along(
        self, gp: GradientPass, direction: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """dᵀCd for the batch (or its sub-batch estimate), a 0-dim tensor.

        Args:
            gp: The batch's :meth:`gradient_pass`.
            direction: d as parameter-shaped tensors keyed by name (e.g. ``gp.gradient``).
        """
        direction = dict(direction)
        if self.curvature == "ef_batch":
            gd = inner(gp.gradient, direction)
            return gd * gd
        # "sum" reduction: scale a sub-batch sum up to the batch (a "mean" needs no scaling).
        scale = self.loss_reduction.sub_batch_scale(gp.num_examples, gp.curvature_examples)
        if self.curvature == "hessian":
            value = self._hessian_quadratic(gp, direction)
        else:
            value = self._jacobian_quadratic(gp, direction)
        return value * scale if scale != 1.0 else value

    def curvature_pass(
        self,
        inputs: ModelInputs,
        targets: torch.Tensor,
        direction: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, dᵀCd) on a batch whose gradient was taken elsewhere (the user's own backward).

        Only the curvature term is computed: for ``"ggn"``/``"ef"`` one forward-mode JVP
        (u = J d, with z alongside) and an output-space product; for ``"hessian"`` a forward +
        backward with the graph kept and one Hessian-vector product. ``curvature_fraction``
        applies as in :meth:`curvature_along`. For ``"ef_batch"`` dᵀGNd = (Gᵀd)² needs G, so
        the caller computes it; this returns NaN for both values then.

        Returns:
            The loss of the (sub-)batch at θ and dᵀCd, 0-dim tensors.
        """
        inputs, targets = self.to_device(inputs, targets)
        d = dict(direction)
        first = d[self.param_names[0]]
        if self.curvature == "ef_batch":
            nan = torch.full((), math.nan, dtype=first.dtype, device=first.device)
            return nan, nan
        n = batch_examples(targets)
        m = curvature_examples(n, self.curvature_fraction)
        if m < n:
            inputs, targets = slice_examples(inputs, slice(None, m)), targets[:m]
        scale = self.loss_reduction.sub_batch_scale(n, m)
        if self.curvature == "hessian":
            loss, leaves, grads = self._gradient_graph(inputs, targets)
            tangents = [d[k] for k in self.param_names]
            value = hessian_quadratic(grads, leaves, tangents, retain_graph=False)
            return loss.detach(), value * scale
        primals = {k: p.detach() for k, p in self.params.items()}

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return self._f(p, inputs)

        z, u = forward_jvp(f, primals, d)
        curv = self._output_curvature(z, targets)
        state = curv.state(z, targets)
        return state.loss, curv.quadratic_form(state, u) * scale

    def _jacobian_quadratic(self, gp: GradientPass, d: dict[str, torch.Tensor]) -> torch.Tensor:
        if gp.jvp_graph is not None:
            u = self._double_backward_jvp(gp, d)
        else:
            primals = {k: p.detach() for k, p in self.params.items()}
            inputs = gp.inputs

            def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return self._f(p, inputs)

            # u = J d by forward mode; no backward is needed for a quadratic form.
            _, u = forward_jvp(f, primals, d)
        state, curv = gp.output_state, gp.output_curvature
        assert state is not None and curv is not None
        # uᵀ M u with M = Λ ("ggn") or GN's ∇ℓ∇ℓᵀ ("ef"): the operators' own output matrices.
        return curv.quadratic_form(state, u)

    def _double_backward_jvp(self, gp: GradientPass, d: dict[str, torch.Tensor]) -> torch.Tensor:
        """The JVP u = J d as ∂(Jᵀw · d)/∂w at w = ∂L/∂z: one backward through G's graph."""
        assert gp.jvp_graph is not None
        grads, out_grad = gp.jvp_graph
        gp.jvp_graph = None  # the graph is freed by the backward below
        pairs = [(g, d[k]) for k, g in zip(self.param_names, grads, strict=True) if g.requires_grad]
        if not pairs:
            return torch.zeros_like(out_grad)
        with torch.enable_grad():
            (u,) = torch.autograd.grad(
                [g for g, _ in pairs], out_grad, grad_outputs=[t for _, t in pairs]
            )
        return u

    def _hessian_quadratic(self, gp: GradientPass, d: dict[str, torch.Tensor]) -> torch.Tensor:
        if gp.hessian_graph is None:
            # Sub-batch: its own forward + backward with the graph kept, then the product.
            _, leaves, grads = self._gradient_graph(gp.inputs, gp.targets)
        else:
            leaves, grads = gp.hessian_graph
            gp.hessian_graph = None  # the graph is freed by the product below
        tangents = [d[k] for k in self.param_names]
        return hessian_quadratic(grads, leaves, tangents, retain_graph=False)

    # ---------------------------------------------------------------------------------------

    def __call__(
        self,
        inputs: ModelInputs,
        targets: torch.Tensor,
        direction: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> StepSize:
        """η = ∇hᵀd / (dᵀCd + ε dᵀd) on one batch; d defaults to G."""
        gp = self.gradient_pass(inputs, targets)
        if direction is None:
            d = gp.gradient
        elif isinstance(direction, torch.Tensor):
            d = vector_to_params(direction, gp.gradient)
        else:
            d = dict(direction)
        numerator = inner(gp.gradient, d)
        d_sq = inner(d, d)
        curv = self.curvature_along(gp, d)
        return quadratic_step(numerator, curv, d_sq, self.eps)


def quadratic_step(
    numerator: torch.Tensor, curvature: torch.Tensor, d_sq: torch.Tensor, eps: float
) -> StepSize:
    """η = numerator / (curvature + ε d_sq), guarded: NaN (and a flag) when that is ≤ 0."""
    denominator = curvature + eps * d_sq
    nonpositive = denominator <= 0
    eta = torch.where(nonpositive, torch.full_like(denominator, math.nan), numerator / denominator)
    return StepSize(numerator, denominator, eta, curvature, nonpositive)


def step_size(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: ModelInputs,
    targets: torch.Tensor,
    curvature: str = "ggn",
    direction: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    *,
    eps: float = 1e-10,
    params: Sequence[str] | None = None,
    curvature_fraction: float | None = None,
    **kwargs: Any,
) -> StepSize:
    r"""The step η along d minimizing the quadratic model on one batch.

    .. math:: \eta = \frac{\nabla h^\top d}{d^\top (C + \varepsilon I) d}

    Args:
        model: The network.
        loss_fn: The loss (``reduction`` ``"mean"`` or ``"sum"``).
        inputs: The batch's inputs.
        targets: The batch's targets.
        curvature: ``"ggn"`` (Q), ``"ef"``, ``"ef_batch"`` or ``"hessian"``.
        direction: d, flat ``[P]`` or parameter-shaped dict; ``None`` for G.
        eps: ε of C + εI.
        params: Parameter names spanning θ (``None``: all trainable).
        curvature_fraction: Estimate dᵀCd on the first ⌈f·N⌉ examples.
        **kwargs: Passed to :class:`StepSizeEstimator` (``allow_train_mode``, ``jvp_method``,
            ``reduction``, ``output_fn``).

    Returns:
        A :class:`StepSize` of 0-dim tensors.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessian_lab.optim.step_size import step_size
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> bool(step_size(model, nn.CrossEntropyLoss(), x, y, "ggn").eta > 0)
        True
    """
    estimator = StepSizeEstimator(
        model, loss_fn, curvature, params, eps, curvature_fraction, **kwargs
    )
    return estimator(inputs, targets, direction)
