r"""A few eigenpairs of a symmetric operator by Lanczos (restart-free, fully reorthogonalized).

The Krylov space grows until the ``k`` wanted Ritz pairs meet the tolerance or the step budget is
spent; with full reorthogonalization there are no ghost eigenvalues, and breakdowns (invariant
subspaces, e.g. repeated eigenvalues) restart the process with a fresh orthogonal vector so that
multiplicities are found. Memory is ``n × num_steps`` for the basis.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import torch

from hessian_lab.linalg.lanczos import LanczosRecurrence, default_breakdown_tol, tridiagonal_eigh
from hessian_lab.linalg.linear_operator import as_linear_operator, reports_progress
from hessian_lab.linalg.probes import make_generator

__all__ = ["EigshResult", "eigsh", "select_which"]

Which = Literal["LA", "SA", "LM", "BE"]


class EigshResult(NamedTuple):
    r"""Output of :func:`eigsh`, in ascending algebraic order of the eigenvalues (as scipy).

    Attributes:
        eigenvalues: ``[k]`` Ritz values, ascending.
        eigenvectors: ``[n, k]`` unit Ritz vectors (columns), on the operator's device.
        residual_norms: ``[k]`` true residuals :math:`\|A v_i - \lambda_i v_i\|_2` (one extra
            product with ``A``).
        converged: ``[k]`` bool, residual within tolerance (see :func:`eigsh`).
        num_steps: Lanczos steps (= products with ``A``, not counting the residual check).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residual_norms: torch.Tensor
    converged: torch.Tensor
    num_steps: int


def select_which(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the ``k`` wanted values of ascending ``theta``, returned in ascending order.

    ``"LA"``/``"SA"``: largest/smallest algebraic; ``"LM"``: largest magnitude; ``"BE"``: ``k // 2``
    from each end, the extra one (odd ``k``) from the high end — the semantics of
    :func:`scipy.sparse.linalg.eigsh`.
    """
    m = theta.shape[0]
    k = min(k, m)
    if which == "LA":
        idx = torch.arange(m - k, m)
    elif which == "SA":
        idx = torch.arange(0, k)
    elif which == "LM":
        idx = torch.argsort(theta.abs(), descending=True, stable=True)[:k]
    elif which == "BE":
        hi = k - k // 2
        idx = torch.cat([torch.arange(0, k // 2), torch.arange(m - hi, m)])
    else:
        raise ValueError(f"which must be one of 'LA', 'SA', 'LM', 'BE', got {which!r}.")
    # Ascending algebraic order of the selected values (theta is ascending).
    return torch.sort(idx).values


def _complement_explored(
    proc: LanczosRecurrence,
    theta: torch.Tensor,
    idx: torch.Tensor,
    k: int,
    which: str,
    floor: float,
) -> bool:
    r"""Whether the small Ritz residuals can be trusted, or wanted eigenvalues may be unseen.

    When :math:`\beta_j` is (nearly) zero the span of the basis is (nearly) invariant and its
    orthogonal complement is unexplored, so small Ritz residuals prove nothing about it: we keep
    going (the next vector, orthogonal to the basis, starts exploring the complement). We treat
    :math:`\beta_j \le \varepsilon^{2/3}\|A\|` as a block boundary (4e-11 in float64; in
    float32, 5e-6 is already the rounding level of the products). One case is decidable: a
    block of size one after a boundary, i.e. a vector of the complement that is (nearly) an
    eigenvector. For a random vector that means that the whole complement is (nearly) an eigenspace
    of that eigenvalue, as the null space of a rank-deficient operator. We then know the full
    spectrum and check that its wanted part is already among the Ritz values; further steps add
    the missing copies.
    """
    m = proc.m
    if proc.finished:
        return True  # nothing is left to explore (whole space, or a stop without restart)
    near = torch.finfo(proc.A.dtype).eps ** (2.0 / 3.0) * max(float(proc.anorm[0]), floor)
    small = proc.betas[0, :m] <= near
    if not small[m - 1]:
        return True  # the last block is still growing: the usual Lanczos test applies
    if m < 2 or not small[m - 2]:
        return False  # an unexplored invariant complement of unknown spectrum: keep going
    copies = proc.n - m
    last = float(proc.alphas[0, m - 1])
    full = torch.sort(torch.cat([theta, theta.new_full((copies,), last)])).values
    want_full = full[select_which(full, k, which)]
    want_seen = theta[idx]
    return want_seen.shape == want_full.shape and bool(
        torch.all((want_seen - want_full).abs() <= floor)
    )


@reports_progress("eigsh", total=lambda a: a["num_steps"])
def eigsh(
    op: object,
    k: int = 6,
    which: Which = "LA",
    *,
    num_steps: int | None = None,
    tol: float | None = None,
    v0: torch.Tensor | None = None,
    seed: int | None = 0,
    accumulate_dtype: torch.dtype | None = None,
    check_every: int = 10,
    warn: bool = True,
) -> EigshResult:
    r"""``k`` eigenpairs of a symmetric operator, like :func:`scipy.sparse.linalg.eigsh`.

    Lanczos with full reorthogonalization from a random start vector; every ``check_every`` steps
    the Ritz pairs of ``T_m`` are computed and the process stops once the ``k`` wanted ones
    satisfy the convergence test below (estimated by :math:`\beta_m |e_m^\top s_i|`). At the end the
    residuals :math:`\|A v_i - \theta_i v_i\|` are measured with one product.

    Convergence of pair ``i``: :math:`\|A v_i - \theta_i v_i\| \le
    \max(\mathrm{tol}\,|\theta_i|,\ 100\,\varepsilon_{op}\,\|A\|_2)` — relative to the eigenvalue,
    with a floor at the rounding level of the operator's products (so that zero eigenvalues of a
    rank-deficient operator can converge). Eigenvalue errors are bounded by the residual (and by
    residual²/gap for isolated eigenvalues).

    Args:
        op: Symmetric linear-operator-like object.
        k: Number of eigenpairs.
        which: ``"LA"`` largest algebraic (default; the top of a Hessian's spectrum), ``"SA"``
            smallest algebraic, ``"LM"`` largest magnitude, ``"BE"`` both ends (``k // 2`` from
            the bottom, the rest from the top). As in scipy, results come in **ascending algebraic
            order** whatever ``which`` is, so the top eigenvalue of ``"LA"`` is the last one.
        num_steps: Largest Krylov dimension (= products). Default ``min(n, max(20 k, 200))``.
        tol: Relative residual tolerance. Default :math:`\varepsilon^{2/3}` of the operator's
            dtype (about 4e-11 in float64, 5e-6 in float32), as ARPACK.
        v0: Start vector ``[n]``; default random normal from ``seed``.
        seed: Seed of the start vector and of restart vectors.
        accumulate_dtype: Working dtype of the Lanczos vectors (e.g. ``torch.float64`` for a
            float32 operator).
        check_every: Steps between two convergence checks.
        warn: Emit a :class:`RuntimeWarning` when some pairs did not converge.
        progress: Show a progress bar counting the products (default ``False``).

    Returns:
        An :class:`EigshResult` (ascending eigenvalues, eigenvectors ``[n, k]``, residual norms,
        converged flags, number of steps).

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 201.0, dtype=torch.float64))
        >>> [round(v, 8) for v in eigsh(A, k=3).eigenvalues.tolist()]
        [198.0, 199.0, 200.0]
    """
    A = as_linear_operator(op)
    n = A.n
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n = {n}, got {k}.")
    if which not in ("LA", "SA", "LM", "BE"):
        raise ValueError(f"which must be one of 'LA', 'SA', 'LM', 'BE', got {which!r}.")
    dtype = accumulate_dtype or A.dtype
    eps_op = torch.finfo(A.dtype).eps
    tol = eps_op ** (2.0 / 3.0) if tol is None else float(tol)
    max_steps = min(n, max(20 * k, 200)) if num_steps is None else min(int(num_steps), n)
    if max_steps < k:
        raise ValueError(f"num_steps = {max_steps} must be at least k = {k}.")

    generator = make_generator(A.device, seed)
    if v0 is None:
        v0 = torch.randn(n, generator=generator, dtype=dtype, device=A.device)
    else:
        v0 = torch.as_tensor(v0).to(device=A.device, dtype=dtype).reshape(-1)
    proc = LanczosRecurrence(
        A,
        v0.unsqueeze(1),
        capacity=max_steps,
        reorthogonalize="full",
        keep_basis=True,
        on_breakdown="restart",
        breakdown_tol=default_breakdown_tol(A.dtype),
        generator=generator,
    )

    def wanted() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Ritz values (ascending), Ritz vectors of T, wanted indices, residual estimates.
        res = proc.result(0)
        theta, S = tridiagonal_eigh(res.alphas, res.betas)
        idx = select_which(theta, k, which)
        est = res.beta_last * S[-1, idx].abs()
        return theta, S, idx, est

    # First check once the space could hold the k pairs with some room, then every check_every.
    target = min(max_steps, max(2 * k + 1, check_every))
    while True:
        proc.run(target)
        theta, S, idx, est = wanted()
        anorm = max(theta.abs().max().item(), float(proc.anorm[0]))
        floor = 100.0 * eps_op * anorm
        done = bool(torch.all(est <= torch.clamp(tol * theta[idx].abs(), min=floor)))
        done = done and _complement_explored(proc, theta, idx, k, which, floor)
        if done or proc.finished or proc.m >= max_steps:
            break
        target = min(max_steps, proc.m + check_every)

    m = proc.m
    if idx.numel() < k:
        raise RuntimeError(
            f"Lanczos spanned only {m} directions (< k = {k}); the operator may be too small or "
            "the start vector degenerate."
        )
    S_k = S[:, idx].to(device=A.device, dtype=dtype)
    vecs = proc.basis[0, :m].T @ S_k  # [n, k] Ritz vectors
    # One product, in the operator's precision, for the true residuals. The Rayleigh quotients
    # vᵀAv are then free and at least as accurate as the Ritz values (error ~ residual² / gap).
    AV = A.matmat(vecs)
    vals = (vecs * AV).sum(dim=0) / (vecs * vecs).sum(dim=0)
    order = torch.argsort(vals)
    vals, vecs, AV = vals[order], vecs[:, order], AV[:, order]
    residual_norms = torch.linalg.vector_norm(AV - vecs * vals, dim=0)
    thresh = torch.clamp(tol * vals.abs(), min=floor)
    converged = residual_norms <= thresh
    if warn and not bool(converged.all()):
        bad = int((~converged).sum())
        warnings.warn(
            f"eigsh: {bad} of {k} Ritz pairs did not converge to tol={tol:.1e} in {m} Lanczos "
            f"steps (max residual {residual_norms.max().item():.2e}); increase num_steps.",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigshResult(vals, vecs, residual_norms, converged, m)
