"""The network linearized at θ on one batch: z = f(x; θ), u = J v (JVP) and Jᵀ w (VJP).

Built once per batch and reused for every vector, so a product costs one tangent pass and one
backward instead of a fresh forward each time (DESIGN.md §5). Two ways to get u = J v:

* ``"double_backward"``: the forward's graph is kept and g(w) = Jᵀw is built once by a backward
  with ``create_graph=True`` at a placeholder w; since g is linear in w, u = ∂(g(w)·v)/∂w is one
  more backward through it. No primal recomputation and no tracing, so the first product costs
  what the later ones do; reverse-over-reverse, exact through LayerNorm (DESIGN.md §6). Measured
  (one thread, MLP 784-256-256-10, batch 512): 0.5 gradients per JVP, the same as a traced one.
* ``"forward"``: forward-mode AD (:func:`~hessian_lab.core.forward_jvp.forward_jvp`), which
  recomputes the primal (about 1.2–1.3 gradients), traced once with ``torch.func.linearize`` from
  the second JVP on (then about 0.3–0.5 gradients; the trace costs about 4 gradients on the CNN
  of ``analyses/benchmark_operators.py`` in a warm process, more in the process's first).

Convolutions, LayerNorm and eval-mode BatchNorm: PyTorch's own double backward of these forms
what a JVP does not need (3.3 gradients per JVP on that CNN); the forward behind
``"double_backward"``
therefore runs under :func:`~hessian_lab.core.backward_for_jvp.backward_for_jvp`, whose backward
differentiates to exactly the operations' tangents.

:func:`auto_jvp_method` chooses between them from the model's layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from hessian_lab.core.backward_for_jvp import backward_for_jvp
from hessian_lab.core.forward_jvp import forward_jvp

JVP_METHODS = ("auto", "forward", "double_backward")
_CONVOLUTION_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def auto_jvp_method(module: nn.Module) -> str:
    """The faster way to get u = J v for this model, from measurements (docs/operators.md).

    Double backward reuses the forward, so it is the choice for linear layers, attention,
    LayerNorm and convolutions run by :func:`~hessian_lab.core.backward_for_jvp.backward_for_jvp`.
    Forward mode is chosen where a trainable convolution keeps PyTorch's wasteful double backward
    (transposed, or with string padding such as ``"same"``) and its kernel differs from its stride.
    """
    for mod in module.modules():
        if isinstance(mod, _CONVOLUTION_MODULES) and any(
            p.requires_grad for p in mod.parameters(recurse=False)
        ):
            covered = not mod.transposed and not isinstance(mod.padding, str)
            if not covered and tuple(mod.kernel_size) != tuple(mod.stride):
                return "forward"
    return "double_backward"


class Linearization:
    """Jacobian products of ``f(params, inputs)`` at fixed params and inputs.

    Args:
        f: Pure model function ``f(params, inputs) -> outputs``.
        params: The point θ (detached tensors keyed by name).
        inputs: The batch's inputs x (a tensor, a tuple of tensors or a dict of tensors).
        linearize: With ``method="forward"``, trace the JVP with ``torch.func.linearize`` from
            the second JVP on, so that later JVPs skip the primal computation (an operator used
            once never pays for the trace). ``False`` always recomputes the primal
            (:func:`~hessian_lab.core.forward_jvp.forward_jvp`).
        method: ``"double_backward"`` or ``"forward"`` (module docstring). Where double backward
            is not available for an operation, the JVPs fall back to forward mode.
        trace_limit_bytes: Trace only when the activations the forward keeps for its backward
            (:attr:`activation_bytes`, counted with saved-tensor hooks) are at most this many
            bytes: the trace holds constants of its own, measured at about 6× those
            activations (a cached product of a ResNet-18 on 32 images of 32×32 went from 1.8
            to 4.7 gradient steps' peak memory with the trace). ``None``: no limit.

    Attributes:
        outputs: z = f(x; θ), detached.
        method: The JVP method in use.
    """

    def __init__(
        self,
        f: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor],
        params: Mapping[str, torch.Tensor],
        inputs: Any,
        linearize: bool = True,
        method: str = "forward",
        trace_limit_bytes: int | None = None,
    ) -> None:
        if method not in ("forward", "double_backward"):
            raise ValueError(f"method={method!r} is not 'forward' or 'double_backward'.")
        params = {n: p.detach() for n, p in params.items()}

        def g(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return f(p, inputs)

        self._g, self._params, self.method = g, params, method
        self._linearize = linearize
        self._trace_limit = trace_limit_bytes
        self._jvp_calls = 0
        self._jvp_fn: Callable | None = None
        self._leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        param_storages = {p.untyped_storage().data_ptr() for p in params.values()}
        saved: dict[int, int] = {}

        def count(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_storages:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        # Double backward differentiates this forward's backward: cheap tangents (module doc).
        conv_mode = backward_for_jvp() if method == "double_backward" else nullcontext()
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(count, lambda t: t),
            conv_mode,
        ):
            z = g(self._leaves)
        #: Bytes of the activations the forward's graph keeps (a trace holds about 6× this).
        self.activation_bytes = sum(saved.values())
        with torch.enable_grad():
            self._z = z
            self._w: torch.Tensor | None = None
            self._gw: list[tuple[str, GradientEdge]] = []
            if method == "double_backward":
                self._w = torch.zeros_like(z, requires_grad=True)
                grads = torch.autograd.grad(
                    z, list(self._leaves.values()), self._w, create_graph=True, allow_unused=True
                )
                # Jᵀw as a function of w; parameters z does not depend on have a zero row of J.
                # Only the graph is kept (its gradient edges): the values Jᵀ0 = 0 are never
                # read, and dropping them saves P numbers for as long as the operator lives.
                self._gw = [
                    (n, get_gradient_edge(gi))
                    for n, gi in zip(self._leaves, grads, strict=True)
                    if gi is not None and gi.requires_grad
                ]
                del grads
        self.outputs = z.detach()

    # ---------------------------------------------------------------------------------------

    def _linearized(self) -> Callable | None:
        self._jvp_calls += 1
        within_limit = self._trace_limit is None or self.activation_bytes <= self._trace_limit
        if self._jvp_fn is None and self._linearize and within_limit and self._jvp_calls > 1:
            with warnings.catch_warnings():
                # linearize's constant folding warns about attributes it does not need.
                warnings.filterwarnings("ignore", message="Attempted to insert a get_attr")
                try:
                    _, self._jvp_fn = torch.func.linearize(self._g, self._params)
                except Exception:  # noqa: BLE001 - tracing is an optimization only
                    # Some models do not trace (data-dependent Python control flow, ops
                    # without a tracing rule): every JVP then recomputes the primal instead.
                    self._linearize = False
        return self._jvp_fn

    def _forward_jvp(self, tangents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        jvp_fn = self._linearized()
        if jvp_fn is not None:
            return jvp_fn(dict(tangents))
        return forward_jvp(self._g, self._params, tangents)[1]

    def _double_backward_jvp(self, tangents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        assert self._w is not None
        if not self._gw:
            return torch.zeros_like(self.outputs)
        with torch.enable_grad():
            (u,) = torch.autograd.grad(
                [edge for _, edge in self._gw],
                self._w,
                [tangents[n] for n, _ in self._gw],
                retain_graph=True,
                allow_unused=True,
            )
        return torch.zeros_like(self.outputs) if u is None else u

    def jvp(self, tangents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return u = J v for one tangent (parameter-shaped dict); shape of z."""
        if self.method == "double_backward":
            try:
                return self._double_backward_jvp(tangents)
            except (RuntimeError, NotImplementedError):
                # An operation without double backward: forward mode from now on.
                self.method, self._gw, self._w = "forward", [], None
        return self._forward_jvp(tangents)

    def jvp_batched(self, tangents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return ``[k, *z.shape]`` for k tangents given as ``[k, *shape]`` tensors."""
        k = next(iter(tangents.values())).shape[0]
        if k == 1:
            return self.jvp({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
        if self.method == "double_backward":
            # Double backward: a loop measured as fast as is_grads_batched per column.
            return torch.stack([self.jvp({n: t[i] for n, t in tangents.items()}) for i in range(k)])
        jvp_fn = self._linearized()  # decided outside vmap: tracing must not run under it
        if jvp_fn is None:

            def jvp_fn(t: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.func.jvp(self._g, (self._params,), (t,))[1]

        return torch.func.vmap(jvp_fn)(dict(tangents))

    def vjp(self, cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return Jᵀ w for one output-shaped cotangent w, as a parameter-shaped dict."""
        with torch.enable_grad():
            grads = torch.autograd.grad(
                self._z,
                list(self._leaves.values()),
                cotangent,
                retain_graph=True,
                allow_unused=True,
            )
        return {
            n: torch.zeros_like(p) if gi is None else gi
            for (n, p), gi in zip(self._leaves.items(), grads, strict=True)
        }

    def vjp_batched(self, cotangents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return Jᵀ w for k cotangents ``[k, *z.shape]``; values are ``[k, *shape]``."""
        if cotangents.shape[0] == 1:  # views, no stacked copies
            return {n: t.unsqueeze(0) for n, t in self.vjp(cotangents[0]).items()}
        cols = [self.vjp(c) for c in cotangents]  # a loop: measured faster than batched grads
        return {n: torch.stack([c[n] for c in cols]) for n in self._leaves}
