"""The network linearized at θ on one batch: z = f(x; θ), u = J v (JVP) and Jᵀ w (VJP).

Built once per batch and reused for every vector, so a product costs one tangent pass and one
backward instead of a fresh forward each time (DESIGN.md §5).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch


class Linearization:
    """Jacobian products of ``f(params, inputs)`` at fixed params and inputs.

    Args:
        f: Pure model function ``f(params, inputs) -> outputs``.
        params: The point θ (detached tensors keyed by name).
        inputs: The batch's inputs x (a tensor, a tuple of tensors or a dict of tensors).
        linearize: From the second JVP on, trace the JVP once with ``torch.func.linearize`` so
            that later JVPs skip the primal computation. Tracing costs about two gradients, so
            the first JVP uses ``torch.func.jvp`` (an operator used once never pays for it).
            ``False`` always uses ``torch.func.jvp`` (less memory).

    Attributes:
        outputs: z = f(x; θ), detached.
    """

    def __init__(
        self,
        f: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor],
        params: Mapping[str, torch.Tensor],
        inputs: Any,
        linearize: bool = True,
    ) -> None:
        params = dict(params)

        def g(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return f(p, inputs)

        self._g, self._params = g, params
        with torch.enable_grad():
            outputs, self._vjp_fn = torch.func.vjp(g, params)
        self.outputs = outputs.detach()
        self._linearize = linearize
        self._jvp_calls = 0
        self._jvp_fn: Callable | None = None

    def _linearized(self) -> Callable | None:
        self._jvp_calls += 1
        if self._jvp_fn is None and self._linearize and self._jvp_calls > 1:
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

    def jvp(self, tangents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return u = J v for one tangent (parameter-shaped dict); shape of z."""
        jvp_fn = self._linearized()
        if jvp_fn is not None:
            return jvp_fn(dict(tangents))
        return torch.func.jvp(self._g, (self._params,), (dict(tangents),))[1]

    def jvp_batched(self, tangents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return ``[k, *z.shape]`` for k tangents given as ``[k, *shape]`` tensors."""
        if next(iter(tangents.values())).shape[0] == 1:
            return self.jvp({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
        jvp_fn = self._linearized()  # decided outside vmap: tracing must not run under it
        if jvp_fn is None:

            def jvp_fn(t: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.func.jvp(self._g, (self._params,), (t,))[1]

        return torch.func.vmap(jvp_fn)(dict(tangents))

    def vjp(self, cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return Jᵀ w for one output-shaped cotangent w, as a parameter-shaped dict."""
        return self._vjp_fn(cotangent)[0]

    def vjp_batched(self, cotangents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return Jᵀ w for k cotangents ``[k, *z.shape]``; values are ``[k, *shape]``."""
        if cotangents.shape[0] == 1:
            return {n: t.unsqueeze(0) for n, t in self.vjp(cotangents[0]).items()}
        return torch.func.vmap(self.vjp)(cotangents)
