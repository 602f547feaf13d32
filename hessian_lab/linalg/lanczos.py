r"""The Lanczos process for symmetric operators.

Given a symmetric ``A`` (size ``n``) and a unit start vector ``v_1``, ``m`` steps of Lanczos build
an orthonormal basis ``V_m = [v_1, ..., v_m]`` of the Krylov space
``K_m(A, v_1) = span{v_1, A v_1, ..., A^{m-1} v_1}`` and the tridiagonal ``T_m = V_mᵀ A V_m``
(diagonal :math:`\alpha_1..\alpha_m`, off-diagonal :math:`\beta_1..\beta_{m-1}`), related by

.. math::  A V_m = V_m T_m + \beta_m v_{m+1} e_m^\top .

The eigenvalues of ``T_m`` (Ritz values) approximate the extreme eigenvalues of ``A``; the squared
first components of its eigenvectors are the Gauss-quadrature weights of the spectral measure of
``A`` seen from ``v_1`` (used by :func:`~hessian_lab.linalg.spectral_density.spectral_density`).

In floating point the three-term recurrence loses orthogonality as soon as a Ritz value converges,
and converged eigenvalues reappear as spurious copies ("ghosts"; Paige 1971). We therefore
reorthogonalize every new vector against the whole basis by default: after the local three-term
step, one classical Gram–Schmidt pass against all previous vectors (two GEMVs with the ``[j, n]``
basis), and a second pass only when the first one cancels much of the vector ("twice is enough";
Daniel, Gragg, Kaufman and Stewart 1976). Its cost is memory traffic, about ``2 j n`` reads at step
``j``; ``reorthogonalize=False`` keeps only three vectors in memory, for spectral-density work on
very large operators where ghosts only move a little weight.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import scipy.linalg
import torch

from hessian_lab.linalg.linear_operator import TorchLinearOperator, as_linear_operator
from hessian_lab.linalg.probes import make_generator

__all__ = ["LanczosResult", "lanczos", "tridiagonal_eigh"]

# A second Gram–Schmidt pass is needed when the first pass removed more than this fraction of the
# norm (DGKS criterion with eta = 1/sqrt(2)).
_REORTH_ETA = 1.0 / math.sqrt(2.0)


class LanczosResult(NamedTuple):
    r"""Output of :func:`lanczos`.

    Attributes:
        alphas: Diagonal of ``T_m``, shape ``[m]``.
        betas: Off-diagonal of ``T_m``, shape ``[m - 1]``. An entry is exactly 0 where the process
            broke down and was restarted with a fresh vector (``T_m`` is then block diagonal).
        beta_last: :math:`\beta_m = \|r_m\|`, the norm of the residual after the last step
            (0 when the process stopped on an invariant subspace). Ritz pair ``(θ_i, V_m s_i)`` has
            residual norm :math:`\beta_m |e_m^\top s_i|`.
        basis: ``V_m`` of shape ``[n, m]`` (orthonormal columns) if requested, else None.
        breakdowns: Step indices ``j`` (0-based) after which :math:`\beta_j` fell below the
            breakdown tolerance, i.e. the Krylov space became invariant.
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    beta_last: float
    basis: torch.Tensor | None
    breakdowns: list[int]

    @property
    def num_steps(self) -> int:
        """Number ``m`` of Lanczos vectors built."""
        return int(self.alphas.shape[0])

    def tridiagonal(self) -> torch.Tensor:
        """Dense ``T_m`` of shape ``[m, m]``."""
        T = torch.diag(self.alphas)
        if self.betas.numel():
            T = T + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)
        return T


def tridiagonal_eigh(
    alphas: torch.Tensor, betas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric tridiagonal matrix, in float64 on the CPU.

    The matrix is at most a few hundred wide, so LAPACK's tridiagonal solver on the host
    (``scipy.linalg.eigh_tridiagonal``, MRRR) is cheaper and more accurate than a dense ``eigh``
    (which was also orders of magnitude slower here) or anything on an accelerator.

    Args:
        alphas: Diagonal, shape ``[m]``.
        betas: Off-diagonal, shape ``[m - 1]``.

    Returns:
        ``(theta, S)``: eigenvalues in ascending order ``[m]`` and orthonormal eigenvectors
        ``[m, m]`` (columns), both float64 on the CPU.
    """
    a = alphas.detach().to("cpu", torch.float64).numpy()
    b = betas.detach().to("cpu", torch.float64).numpy()
    if a.shape[0] == 1:
        return torch.from_numpy(a.copy()), torch.ones(1, 1, dtype=torch.float64)
    try:
        theta, S = scipy.linalg.eigh_tridiagonal(a, b)
    except (np.linalg.LinAlgError, ValueError):
        # MRRR can fail on matrices with tiny off-diagonals; QL/QR iteration always works.
        theta, S = scipy.linalg.eigh_tridiagonal(a, b, lapack_driver="stev")
    return torch.from_numpy(theta), torch.from_numpy(S)


class LanczosProcess:
    r"""A resumable Lanczos process (used by :func:`lanczos` and :func:`~.eigsh.eigsh`).

    Args:
        A: The operator in internal form.
        v0: Start vector (any nonzero scale), shape ``[n]``, in the working dtype on ``A.device``.
        capacity: Largest number of steps this process may take (memory is preallocated for it when
            the basis is kept).
        reorthogonalize: Full reorthogonalization (keeps the basis).
        keep_basis: Keep the basis even without reorthogonalization.
        on_breakdown: ``"stop"`` or ``"restart"`` (continue with a random vector orthogonal to the
            basis; needs the basis, otherwise the process stops).
        breakdown_tol: Relative tolerance on :math:`\beta_j / \|A\|`.
        generator: Source of the restart vectors.
    """

    def __init__(
        self,
        A: TorchLinearOperator,
        v0: torch.Tensor,
        *,
        capacity: int,
        reorthogonalize: bool,
        keep_basis: bool,
        on_breakdown: Literal["stop", "restart"],
        breakdown_tol: float,
        generator: torch.Generator,
    ) -> None:
        self.A = A
        self.n = A.n
        self.dtype = v0.dtype
        self.device = v0.device
        self.capacity = min(int(capacity), self.n)
        self.reorthogonalize = reorthogonalize
        self.keep_basis = keep_basis or reorthogonalize
        self.on_breakdown = on_breakdown
        self.breakdown_tol = breakdown_tol
        self.generator = generator

        norm = torch.linalg.vector_norm(v0)
        if not torch.isfinite(norm) or norm.item() == 0.0:
            raise ValueError("The Lanczos start vector v0 must be nonzero and finite.")
        v = v0 / norm
        # Rows are basis vectors: a contiguous [j, n] block makes both projections plain GEMVs.
        if self.keep_basis:
            self.V = torch.empty(self.capacity, self.n, dtype=self.dtype, device=self.device)
            self.V[0] = v
        else:
            self.V = None
        self.v = v
        self.v_prev = torch.zeros_like(v)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # beta_j after step j (last one = residual norm)
        self.breakdowns: list[int] = []
        self.anorm = 0.0  # running estimate of ||A||_2 (max ||A v_j||)
        self.finished = False  # invariant subspace reached (stop) or the whole space spanned
        self.next_vector: torch.Tensor | None = None
        self.second_passes = 0  # DGKS second Gram-Schmidt passes (diagnostics)

    @property
    def m(self) -> int:
        """Number of completed steps."""
        return len(self.alphas)

    def _project_out(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Remove from ``w`` its components along ``V[:j]`` (CGS with a DGKS second pass).

        ``w`` has already been through the local three-term step, so one pass usually suffices
        and costs two GEMVs with the ``[j, n]`` basis; a second pass runs only when the first
        one cancelled most of ``w``. Returns the projected vector, the coefficients removed and
        its norm (the Lanczos beta).
        """
        Vj = self.V[:j]
        norm_before = torch.linalg.vector_norm(w).item()
        h = Vj @ w
        w = w.addmv(Vj.T, h, alpha=-1.0)
        norm_after = torch.linalg.vector_norm(w).item()
        if norm_after < _REORTH_ETA * norm_before:
            self.second_passes += 1
            h2 = Vj @ w
            w = w.addmv(Vj.T, h2, alpha=-1.0)
            h = h + h2
            norm_after = torch.linalg.vector_norm(w).item()
        return w, h, norm_after

    def _random_orthogonal(self, j: int) -> torch.Tensor | None:
        """A random unit vector orthogonal to ``V[:j]`` (None if numerically impossible)."""
        for _ in range(3):
            r = torch.randn(self.n, generator=self.generator, dtype=self.dtype, device=self.device)
            r = r / torch.linalg.vector_norm(r)
            for _ in range(2):
                r = r - self.V[:j].T @ (self.V[:j] @ r)
            nr = torch.linalg.vector_norm(r).item()
            # A random unit vector keeps about sqrt((n - j) / n) of its norm; far less means it
            # was numerically in the span of the basis.
            if nr > 0.1 * math.sqrt((self.n - j) / self.n):
                return r / nr
        return None

    def run(self, num_steps: int) -> None:
        """Advance the process until ``num_steps`` steps are done (or it cannot go further)."""
        num_steps = min(int(num_steps), self.capacity)
        A = self.A
        while self.m < num_steps and not self.finished:
            j = self.m
            w = A.matvec(self.v)
            self.anorm = max(self.anorm, torch.linalg.vector_norm(w).item())
            # Local three-term step (the whole algorithm without reorthogonalization). The first
            # update makes a new tensor: the operator's output is never modified in place.
            beta_prev = self.betas[-1] if self.betas else 0.0
            w = w - beta_prev * self.v_prev if beta_prev else w.clone()
            alpha_t = torch.dot(self.v, w)
            w.sub_(alpha_t * self.v)
            if self.reorthogonalize:
                # Full reorthogonalization: remove what rounding left along the whole basis.
                w, h, beta = self._project_out(w, j + 1)
                alpha = (alpha_t + h[j]).item()
            else:
                alpha = alpha_t.item()
                beta = torch.linalg.vector_norm(w).item()
            self.alphas.append(alpha)

            if j + 1 >= self.n:  # the basis spans the whole space: T_n is exact
                self.betas.append(beta)
                self.finished = True
                break
            if beta <= self.breakdown_tol * max(self.anorm, torch.finfo(self.dtype).tiny):
                # Invariant subspace: the Krylov space cannot grow from this start vector.
                self.breakdowns.append(j)
                restart = None
                if self.on_breakdown == "restart" and self.keep_basis and self.reorthogonalize:
                    restart = self._random_orthogonal(j + 1)
                if restart is None:
                    self.betas.append(0.0)
                    self.finished = True
                    break
                self.betas.append(0.0)  # T becomes block diagonal
                v_next = restart
            else:
                self.betas.append(beta)
                v_next = w / beta
            if j + 1 < self.capacity:
                self.v_prev, self.v = self.v, v_next
                if self.V is not None:
                    self.V[j + 1] = v_next
            else:
                self.next_vector = v_next

    def result(self, return_basis: bool) -> LanczosResult:
        """Package the current state as a :class:`LanczosResult`."""
        m = self.m
        alphas = torch.tensor(self.alphas, dtype=self.dtype, device=self.device)
        betas = torch.tensor(self.betas[: m - 1], dtype=self.dtype, device=self.device)
        beta_last = self.betas[m - 1] if m else 0.0
        if self.finished and self.breakdowns and self.breakdowns[-1] == m - 1:
            beta_last = 0.0
        basis = self.V[:m].T if (return_basis and self.V is not None) else None
        return LanczosResult(alphas, betas, float(beta_last), basis, list(self.breakdowns))


def default_breakdown_tol(op_dtype: torch.dtype) -> float:
    r"""Breakdown when :math:`\beta_j \le 100\,\varepsilon\,\|A\|_2` (operator's precision).

    Below this level the new direction is made of rounding errors of the product, not of ``A``.
    """
    return 100.0 * torch.finfo(op_dtype).eps


def lanczos(
    op: object,
    num_steps: int,
    *,
    v0: torch.Tensor | None = None,
    seed: int | None = 0,
    reorthogonalize: bool = True,
    return_basis: bool = False,
    accumulate_dtype: torch.dtype | None = None,
    on_breakdown: Literal["stop", "restart"] = "stop",
    breakdown_tol: float | None = None,
) -> LanczosResult:
    r"""Run ``num_steps`` steps of the Lanczos process on a symmetric operator.

    Builds ``T_m = V_mᵀ A V_m`` (tridiagonal) and optionally ``V_m`` with
    :math:`A V_m = V_m T_m + \beta_m v_{m+1} e_m^\top`, ``m = min(num_steps, n)``. Each step costs
    one product with ``A``; full reorthogonalization adds two GEMVs with the ``[j, n]`` basis.

    Args:
        op: Symmetric linear-operator-like object (see
            :func:`~hessian_lab.linalg.linear_operator.as_linear_operator`). Only symmetry is
            assumed, not definiteness.
        num_steps: Number of Lanczos steps ``m`` (capped at ``n``).
        v0: Start vector ``[n]`` (normalized here). If None, a standard normal vector drawn from a
            :class:`torch.Generator` on the operator's device seeded with ``seed``.
        seed: Seed of the start vector (and of restart vectors).
        reorthogonalize: Reorthogonalize each vector against the whole basis (default). False keeps
            three vectors only and lets ghost copies of converged eigenvalues appear.
        return_basis: Return ``V_m`` (``[n, m]``, on the operator's device). With
            ``reorthogonalize=False`` this stores the basis anyway, but does not use it.
        accumulate_dtype: Dtype of the vectors and coefficients (e.g. ``torch.float64`` for a
            float32 operator); products are still taken in the operator's dtype. Default: the
            operator's dtype.
        on_breakdown: What to do when :math:`\beta_j` vanishes (the Krylov space is invariant, e.g.
            ``A`` has fewer distinct eigenvalues than ``m``): ``"stop"`` returns the ``j + 1``
            steps done — the spectral information is then exact — and ``"restart"`` continues with
            a random vector orthogonal to the basis (``β_j = 0`` in ``T``), which lets the
            eigenvalue multiplicities appear. Restarts need ``reorthogonalize=True``.
        breakdown_tol: Breakdown when :math:`\beta_j \le` ``breakdown_tol`` :math:`\cdot\|A\|_2`
            (estimated). Default ``100 ε`` of the operator's dtype.

    Returns:
        A :class:`LanczosResult` with ``alphas``, ``betas`` and ``basis`` on the operator's device.

    Example:
        >>> import torch
        >>> lam = torch.cat([torch.linspace(0, 1, 99), torch.tensor([10.0])]).double()
        >>> res = lanczos(torch.diag(lam), 30)  # an isolated top eigenvalue converges fast
        >>> theta = torch.linalg.eigvalsh(res.tridiagonal())
        >>> round(theta[-1].item(), 10)
        10.0
    """
    A = as_linear_operator(op)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if on_breakdown not in ("stop", "restart"):
        raise ValueError(f"on_breakdown must be 'stop' or 'restart', got {on_breakdown!r}.")
    dtype = accumulate_dtype or A.dtype
    generator = make_generator(A.device, seed)
    if v0 is None:
        v0 = torch.randn(A.n, generator=generator, dtype=dtype, device=A.device)
    else:
        v0 = torch.as_tensor(v0).to(device=A.device, dtype=dtype).reshape(-1)
        if v0.shape[0] != A.n:
            raise ValueError(f"v0 has {v0.shape[0]} entries but the operator has size {A.n}.")
    proc = LanczosProcess(
        A,
        v0,
        capacity=num_steps,
        reorthogonalize=reorthogonalize,
        keep_basis=return_basis,
        on_breakdown=on_breakdown,
        breakdown_tol=default_breakdown_tol(A.dtype) if breakdown_tol is None else breakdown_tol,
        generator=generator,
    )
    proc.run(num_steps)
    return proc.result(return_basis)


def batched_lanczos(
    op: object,
    V0: torch.Tensor,
    num_steps: int,
    *,
    reorthogonalize: bool = True,
    breakdown_tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Independent Lanczos processes from the columns of ``V0``, advanced in lockstep.

    Every step applies the operator once to all ``p`` current vectors with one ``matmat`` (our
    operators batch the columns with ``vmap``, which is much cheaper than ``p`` products), then
    runs the usual recurrence and full reorthogonalization column by column (batched GEMVs). Used
    for stochastic Lanczos quadrature, where probes are independent. A column whose process breaks
    down (invariant subspace) stops there: its vector is set to zero and its coefficients end.

    Args:
        op: Symmetric linear-operator-like object.
        V0: ``[n, p]`` start vectors (normalized here), in the working dtype.
        num_steps: Steps ``m`` per process (capped at ``n``).
        reorthogonalize: Full reorthogonalization of each process against its own basis
            (memory ``p × m × n``).
        breakdown_tol: As in :func:`lanczos`; default ``100 ε`` of the operator's dtype.

    Returns:
        ``(alphas, betas, lengths)``: ``[p, m]`` and ``[p, m - 1]`` coefficients (zero-padded after
        a breakdown) and ``[p]`` the number of steps of each process.
    """
    A = as_linear_operator(op)
    n, p = V0.shape
    m = min(int(num_steps), n)
    dtype, device = V0.dtype, V0.device
    tol = default_breakdown_tol(A.dtype) if breakdown_tol is None else breakdown_tol
    norms = torch.linalg.vector_norm(V0, dim=0)
    if not bool(torch.all(norms > 0)):
        raise ValueError("Every Lanczos start vector must be nonzero.")
    v = (V0 / norms).T.contiguous()  # [p, n]: one process per row
    v_prev = torch.zeros_like(v)
    basis = torch.empty(p, m, n, dtype=dtype, device=device) if reorthogonalize else None
    if basis is not None:
        basis[:, 0] = v
    alphas = torch.zeros(p, m, dtype=dtype, device=device)
    betas = torch.zeros(p, m, dtype=dtype, device=device)
    lengths = torch.full((p,), m, dtype=torch.long)
    active = torch.ones(p, dtype=torch.bool, device=device)
    anorm = torch.zeros(p, dtype=dtype, device=device)
    for j in range(m):
        w = A.matmat(v.T).T  # [p, n]; stopped processes have v = 0
        anorm = torch.maximum(anorm, torch.linalg.vector_norm(w, dim=1))
        w = w - betas[:, j - 1 : j] * v_prev if j > 0 else w.clone()
        alpha = (v * w).sum(dim=1)
        w -= alpha[:, None] * v
        if basis is not None:
            Bj = basis[:, : j + 1]  # [p, j+1, n]
            before = torch.linalg.vector_norm(w, dim=1)
            h = torch.bmm(Bj, w.unsqueeze(2))  # [p, j+1, 1]
            w -= torch.bmm(Bj.transpose(1, 2), h).squeeze(2)
            alpha += h[:, j, 0]
            if bool((torch.linalg.vector_norm(w, dim=1) < _REORTH_ETA * before).any()):
                h2 = torch.bmm(Bj, w.unsqueeze(2))  # DGKS second pass, for all rows at once
                w -= torch.bmm(Bj.transpose(1, 2), h2).squeeze(2)
                alpha += h2[:, j, 0]
        beta = torch.linalg.vector_norm(w, dim=1)
        alphas[:, j] = torch.where(active, alpha, torch.zeros_like(alpha))
        if j + 1 == m:
            break
        stop = active & (beta <= tol * anorm)
        for c in torch.nonzero(stop).flatten().tolist():
            lengths[c] = j + 1
        active &= ~stop
        betas[:, j] = torch.where(active, beta, torch.zeros_like(beta))
        safe = torch.where(active, beta, torch.ones_like(beta))
        v_prev, v = v, torch.where(active[:, None], w / safe[:, None], torch.zeros_like(w))
        if basis is not None:
            basis[:, j + 1] = v
        if not bool(active.any()):
            break
    return alphas, betas[:, : m - 1], lengths
