r"""Conjugate gradients on a (damped) curvature operator, with negative-curvature detection.

Solves :math:`(A + \lambda I) x = b`, i.e. minimizes the quadratic model

.. math::  \varphi(x) = \tfrac12 x^\top (A + \lambda I) x - b^\top x,

by (preconditioned) CG (Hestenes & Stiefel 1952). CG needs :math:`A + \lambda I` positive definite;
the exact Hessian often is not. When a search direction ``p`` has
:math:`p^\top (A + \lambda I) p \le 0` the model is unbounded below along ``p``; we stop there and
return the current iterate together with ``p`` (the truncation of Steihaug 1983 / Toint 1981, as in
Newton-CG), instead of dividing by a non-positive curvature and diverging.

Stopping rules: ``"residual"`` (scipy's):
:math:`\|r_i\| \le \max(\mathrm{tol}\,\|b\|, \mathrm{atol})`;
``"martens"`` (Martens 2010, Hessian-free optimization) additionally stops when the model stops
making relative progress: at iteration ``i`` with :math:`k = \max(10, \lceil 0.1\,i \rceil)`,
:math:`i > k`, :math:`\varphi_i < 0` and
:math:`(\varphi_i - \varphi_{i-k}) / \varphi_i < k\,\epsilon`.

Several right-hand sides (columns of ``b``) are solved together — one ``matmat`` per iteration — but
independently: each column has its own step sizes and stops on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from hessian_lab.linalg.linear_operator import (
    TorchLinearOperator,
    as_linear_operator,
    reports_progress,
)

__all__ = ["CGInfo", "cg"]


@dataclass
class CGInfo:
    r"""Diagnostics of :func:`cg`.

    For a 1-D ``b`` the per-column fields are scalars (``int``, ``bool``, ``str``) and the histories
    1-D; for ``b`` of shape ``[n, k]`` they are tensors with a trailing dimension ``k`` and lists.
    Histories have one row per iteration plus the start (``[T + 1]`` or ``[T + 1, k]``); a column
    that stopped early repeats its last value.

    Attributes:
        iterations: Iterations (products) done per column.
        converged: Whether the stopping rule was met (residual or Martens).
        negative_curvature: Whether a direction with :math:`p^\top (A + \lambda I) p \le 0` was met.
        negative_curvature_direction: That direction ``p`` (``[n]`` or ``[n, k]``, zero columns
            where none was found), or None if no column met one.
        curvature: :math:`p^\top (A + \lambda I) p / \|p\|^2` along it (nan where none).
        residual_norms: :math:`\|b - (A + \lambda I) x_i\|` per iteration (from the CG recurrence).
        quadratic_model: :math:`\varphi(x_i) = -\frac12 (x_i^\top b + x_i^\top r_i)` per iteration.
        stop_reason: ``"converged"``, ``"martens"``, ``"negative_curvature"`` or ``"maxiter"``.
    """

    iterations: int | torch.Tensor
    converged: bool | torch.Tensor
    negative_curvature: bool | torch.Tensor
    negative_curvature_direction: torch.Tensor | None
    curvature: float | torch.Tensor
    residual_norms: torch.Tensor
    quadratic_model: torch.Tensor
    stop_reason: str | list[str]


def _as_preconditioner(
    preconditioner: object | None,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A callable ``R -> M R`` on ``[n, k]`` tensors, from a callable or an operator-like object."""
    if preconditioner is None:
        return None
    if isinstance(preconditioner, TorchLinearOperator) or hasattr(preconditioner, "shape"):
        M = as_linear_operator(preconditioner)
        return M.matmat
    if callable(preconditioner):
        return preconditioner
    raise TypeError(
        "preconditioner must be None, a callable R -> M R on [n, k] tensors, or a linear-operator-"
        f"like object approximating (A + damping I)^-1; got {type(preconditioner).__name__}."
    )


@reports_progress("CG", total=lambda a: a["maxiter"])
def cg(
    op: object,
    b: torch.Tensor,
    damping: float = 0.0,
    x0: torch.Tensor | None = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: object | None = None,
    callback: Callable[[torch.Tensor], None] | None = None,
    stopping: Literal["residual", "martens"] = "residual",
    *,
    martens_eps: float = 5e-4,
    curvature_tol: float = 0.0,
) -> tuple[torch.Tensor, CGInfo]:
    r"""Solve :math:`(A + \lambda I) x = b` by conjugate gradients, stopping on negative curvature.

    Args:
        op: Symmetric linear-operator-like object ``A``.
        b: Right-hand side ``[n]``, or ``[n, k]`` for ``k`` independent systems. A numpy array is
            accepted; the solution is a torch tensor on the operator's device.
        damping: :math:`\lambda \ge 0` added to the diagonal (Levenberg–Marquardt / Tikhonov).
        x0: Initial guess, shaped like ``b`` (default zero; costs one extra product otherwise).
        tol: Relative residual tolerance (as ``rtol`` of :func:`scipy.sparse.linalg.cg`).
        atol: Absolute residual tolerance.
        maxiter: Iteration limit (default ``10 n``, as scipy).
        preconditioner: ``M`` ≈ :math:`(A + \lambda I)^{-1}`, symmetric positive definite: a
            callable mapping an ``[n, k]`` tensor to ``M R``, or a linear-operator-like object.
        callback: Called as ``callback(x)`` after every iteration (``x`` shaped like ``b``).
        stopping: ``"residual"`` or ``"martens"`` (see the module docstring; the residual test
            stays active too).
        martens_eps: :math:`\epsilon` of Martens' rule (5e-4 in the paper).
        curvature_tol: Negative curvature is declared when
            :math:`p^\top (A + \lambda I) p \le` ``curvature_tol`` :math:`\cdot \|p\|^2`.

        progress: Show a progress bar counting the products (default ``False``).

    Returns:
        ``(x, info)``: the last iterate (shaped like ``b``) and a :class:`CGInfo`. A column that
        met negative curvature keeps the iterate from before that direction (``x0`` if it happened
        at the first iteration); Newton-CG callers commonly fall back to ``b`` (the steepest-descent
        direction of the model) in that case.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = cg(A, torch.tensor([1.0, 2.0], dtype=torch.float64), tol=1e-12)
        >>> torch.allclose(A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64)), info.iterations
        (True, 2)
    """
    A = as_linear_operator(op)
    n = A.n
    if stopping not in ("residual", "martens"):
        raise ValueError(f"stopping must be 'residual' or 'martens', got {stopping!r}.")
    b_t = torch.as_tensor(b, device=A.device)
    if not b_t.is_floating_point():
        b_t = b_t.to(A.dtype)
    vector = b_t.dim() == 1
    if b_t.shape[0] != n or b_t.dim() not in (1, 2):
        raise ValueError(f"b must have shape [n] or [n, k] with n = {n}, got {tuple(b_t.shape)}.")
    dtype = torch.promote_types(b_t.dtype, A.dtype)
    B = b_t.to(dtype).reshape(n, -1)
    k = B.shape[1]
    maxiter = 10 * n if maxiter is None else int(maxiter)
    M = _as_preconditioner(preconditioner)
    damping = float(damping)

    def apply(P: torch.Tensor) -> torch.Tensor:
        AP = A.matmat(P)
        return AP + damping * P if damping else AP

    def shaped(X: torch.Tensor) -> torch.Tensor:
        return X.reshape(-1) if vector else X

    if x0 is None:
        X = torch.zeros_like(B)
        R = B.clone()
    else:
        X = torch.as_tensor(x0, device=A.device).to(dtype).reshape(n, k).clone()
        R = B - apply(X)
    Z = M(R) if M is not None else R
    P = Z.clone()
    rz = (R * Z).sum(dim=0)

    b_norm = torch.linalg.vector_norm(B, dim=0)
    threshold = torch.clamp(tol * b_norm, min=atol)

    def model(X: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        # φ(x) = ½xᵀÃx − bᵀx and Ãx = b − r give φ = −½(xᵀb + xᵀr): no extra product.
        return -0.5 * ((X * B).sum(dim=0) + (X * R).sum(dim=0))

    r_norm = torch.linalg.vector_norm(R, dim=0)
    res_hist = [r_norm.clone()]
    qm_hist = [model(X, R)]
    iterations = torch.zeros(k, dtype=torch.long, device=A.device)
    reason = ["maxiter"] * k
    active = torch.ones(k, dtype=torch.bool, device=A.device)
    conv0 = r_norm <= threshold
    for j in torch.nonzero(conv0).flatten().tolist():
        reason[j] = "converged"
    active &= ~conv0
    neg_dir = torch.zeros_like(B)
    neg_curv = torch.full((k,), math.nan, dtype=dtype, device=A.device)
    neg_flag = torch.zeros(k, dtype=torch.bool, device=A.device)

    it = 0
    while it < maxiter and bool(active.any()):
        it += 1
        idx = torch.nonzero(active).flatten()
        Pa = P[:, idx]
        APa = apply(Pa)
        pAp = (Pa * APa).sum(dim=0)
        p_sq = (Pa * Pa).sum(dim=0)
        neg = pAp <= curvature_tol * p_sq
        if bool(neg.any()):
            # Steihaug truncation: the model is unbounded along p; keep x, report p.
            ni = idx[neg]
            neg_flag[ni] = True
            neg_dir[:, ni] = Pa[:, neg]
            neg_curv[ni] = pAp[neg] / p_sq[neg]
            active[ni] = False
            for j in ni.tolist():
                reason[j] = "negative_curvature"
        upd = ~neg
        ui = idx[upd]
        alpha = rz[ui] / pAp[upd]
        X[:, ui] += alpha * Pa[:, upd]
        R[:, ui] -= alpha * APa[:, upd]
        iterations[ui] += 1
        r_norm[ui] = torch.linalg.vector_norm(R[:, ui], dim=0)
        res_hist.append(r_norm.clone())
        qm_hist.append(model(X, R))

        stop = torch.zeros(k, dtype=torch.bool, device=A.device)
        conv = r_norm <= threshold
        stop[ui] = conv[ui]
        for j in torch.nonzero(stop).flatten().tolist():
            reason[j] = "converged"
        if stopping == "martens":
            i = it
            lag = max(10, math.ceil(0.1 * i))
            if i > lag:
                phi_i, phi_lag = qm_hist[-1], qm_hist[-1 - lag]
                progress = (phi_i - phi_lag) / phi_i
                mstop = (phi_i < 0) & (progress < lag * martens_eps)
                mstop_u = torch.zeros_like(stop)
                mstop_u[ui] = mstop[ui] & ~stop[ui]
                for j in torch.nonzero(mstop_u).flatten().tolist():
                    reason[j] = "martens"
                stop |= mstop_u
        active &= ~stop

        ai = torch.nonzero(active).flatten()
        if ai.numel():
            Ra = R[:, ai]
            Za = M(Ra) if M is not None else Ra
            rz_new = (Ra * Za).sum(dim=0)
            beta = rz_new / rz[ai]
            P[:, ai] = Za + beta * P[:, ai]
            rz[ai] = rz_new
        if callback is not None:
            callback(shaped(X))

    converged = torch.tensor([r in ("converged", "martens") for r in reason], device=A.device)
    res = torch.stack(res_hist)
    qm = torch.stack(qm_hist)
    any_neg = bool(neg_flag.any())
    if vector:
        info = CGInfo(
            iterations=int(iterations[0]),
            converged=bool(converged[0]),
            negative_curvature=bool(neg_flag[0]),
            negative_curvature_direction=neg_dir[:, 0] if any_neg else None,
            curvature=float(neg_curv[0]),
            residual_norms=res[:, 0],
            quadratic_model=qm[:, 0],
            stop_reason=reason[0],
        )
    else:
        info = CGInfo(
            iterations=iterations,
            converged=converged,
            negative_curvature=neg_flag,
            negative_curvature_direction=neg_dir if any_neg else None,
            curvature=neg_curv,
            residual_norms=res,
            quadratic_model=qm,
            stop_reason=reason,
        )
    return shaped(X), info
