r"""The Lanczos process for symmetric operators: one recurrence, ``p`` start vectors in lockstep.

Given a symmetric ``A`` (size ``n``) and a unit start vector ``v_1``, ``m`` steps of Lanczos build
an orthonormal basis ``V_m = [v_1, ..., v_m]`` of the Krylov space
``K_m(A, v_1) = span{v_1, A v_1, ..., A^{m-1} v_1}`` and the tridiagonal ``T_m = V_mᵀ A V_m``
(diagonal :math:`\alpha_1..\alpha_m`, off-diagonal :math:`\beta_1..\beta_{m-1}`), related by

.. math::  A V_m = V_m T_m + \beta_m v_{m+1} e_m^\top .

Step ``j`` computes :math:`w = A v_j - \beta_{j-1} v_{j-1}`, :math:`\alpha_j = v_j^\top w`,
:math:`w \leftarrow w - \alpha_j v_j` (the local three-term step), reorthogonalizes ``w``, and sets
:math:`\beta_j = \|w\|`, :math:`v_{j+1} = w / \beta_j`. The eigenvalues of ``T_m`` (Ritz values)
approximate the extreme eigenvalues of ``A``; the squared first components of its eigenvectors are
the Gauss-quadrature weights of the spectral measure of ``A`` seen from ``v_1`` (used by
:func:`~hessian_lab.linalg.spectral_density.spectral_density`).

:class:`LanczosRecurrence` is the only implementation: it advances ``p`` independent processes
(the columns of a ``[n, p]`` start block) with one ``matmat`` per step, and ``p = 1`` is the
single-vector case. :func:`lanczos`, :func:`batched_lanczos`, :func:`~.eigsh.eigsh` and
:func:`~.spectral_density.spectral_density` all run it.

Reorthogonalization. In floating point the three-term recurrence loses orthogonality as soon as a
Ritz value converges, and converged eigenvalues reappear as spurious copies ("ghosts"; Paige
1971). Four modes:

* ``"full"`` (the default): after the local step, one classical Gram–Schmidt pass against the whole
  basis, :math:`w \leftarrow w - V_j (V_j^\top w)` — two matrix-vector products with the
  contiguous ``[j, n]`` block of a basis preallocated as ``[p, m, n]`` (batched over the ``p``
  processes) — and a second pass only when the first cancels much of ``w`` (:math:`\|w'\| <
  \|w\| / \sqrt 2`: "twice is enough"; Daniel, Gragg, Kaufman & Stewart 1976). Its cost is memory
  traffic, about ``2 j n`` reads at step ``j``.
* ``"partial"``: Simon's (1984) partial reorthogonalization, with Larsen's (1998) ranges. The
  level of orthogonality :math:`\omega_{j+1,k} \approx v_{j+1}^\top v_k` is tracked by the
  recurrence (Simon 1984, eq. 3.3)

  .. math::  \beta_j \omega_{j+1,k} = \beta_k \omega_{j,k+1} + (\alpha_k - \alpha_j)\omega_{j,k}
             + \beta_{k-1}\omega_{j,k-1} - \beta_{j-1}\omega_{j-1,k} \pm \vartheta_{j,k},

  a few vector operations of length ``j`` per step on the host, with the rounding term
  :math:`\vartheta_{j,k} = \varepsilon(\beta_k + \beta_j + \|A\|) + d_j + d_k`, where :math:`d_i
  = |v_{i-1}^\top w|` is the defect measured (and removed, with the component along :math:`v_i`)
  at step ``i`` after the three-term step: it captures the rounding of the operator's own
  products, often far above :math:`\varepsilon \|A\|` (a float32 network's products). The sign is
  chosen to grow :math:`|\omega|`. Only when :math:`\max_k |\omega_{j+1,k}| > \sqrt\varepsilon`
  is ``w`` reorthogonalized, against the stretches of the basis where :math:`|\omega_{j+1,k}| >
  \varepsilon^{3/4}` (orthogonality is lost along converged Ritz vectors, which live in a few
  stretches, usually the first vectors), and the next vector too (Simon's pair of steps); the
  estimates there restart at :math:`\varepsilon`. The basis stays semi-orthogonal,
  :math:`|v_i^\top v_k| \lesssim \sqrt\varepsilon`, which is enough for ``T_m`` to be the
  projection of ``A`` on the Krylov space to working precision (Simon 1984): Ritz values as
  accurate as with full reorthogonalization and no ghosts, for less traffic — how much less
  depends on how fast Ritz values converge (a few percent of the full cost on spectra without
  outliers; about 60% on a float32 network's Gauss–Newton matrix, whose outliers converge in a
  few steps). The returned basis is then only semi-orthogonal.
* ``"selective"``: Parlett & Scott's (1979) selective orthogonalization. By Paige's theorem the
  new vector's component along a Ritz vector :math:`y_i = V_j s_i` of ``T_j`` is
  :math:`|y_i^\top v_{j+1}| \approx \varepsilon\|A\| / (\beta_j |e_j^\top s_i|)`: orthogonality
  is lost only along Ritz vectors that converged, whose error bound :math:`\beta_j |e_j^\top s_i|`
  is at most :math:`\sqrt\varepsilon\,\|T_j\|` (with a float32 operator in float64 vectors,
  :math:`\varepsilon_{op}\|T_j\|/\sqrt\varepsilon`). Each such ``y_i`` is computed once, when it
  converges (one read of the basis for all that converge together), into a small block ``Y``,
  and ``w`` is orthogonalized against ``Y`` instead of the basis (``2 k n`` reads for ``k`` good
  Ritz vectors instead of ``2 j n``). When to look: Simon's estimates run as in ``"partial"``,
  projected off the span of ``Y`` whenever ``w`` is, and nothing happens until they exceed
  :math:`\sqrt\varepsilon` (where ``"partial"`` would reorthogonalize). Then, in order, as long
  as they still do: ``w`` is orthogonalized against the good Ritz vectors along which the
  estimates put a component above :math:`\varepsilon^{3/4}` (and again at the next step, Simon's
  pair); ``T_j`` is eigendecomposed on the host (``O(j²)``, about 1 ms at ``j = 100``) and the
  converged Ritz vectors not yet within :math:`\sqrt\varepsilon` of the span of ``Y`` (new ones,
  and old ones that moved: the refresh) join it; and, if the loss is still unexplained, the step
  does what ``"partial"`` does. The process hands over to ``"partial"`` for good — after one
  reorthogonalization against the whole basis, with the next step's, so that the estimates
  restart from :math:`\varepsilon` — when ``Y`` would outgrow ``max(16, j / 4)`` vectors (most
  Ritz values converged) and after a breakdown restart. It runs ``"partial"`` from the start
  with several processes (``p > 1``) and with vectors coarser than float64: in float32
  :math:`\sqrt\varepsilon\|T\| = 3\cdot10^{-4}\|T\|` is passed by most Ritz values of a network's
  spectrum, so the good set would be the basis, and the estimates were seen to let the loss
  reach 3 :math:`\sqrt\varepsilon`. The basis stays semi-orthogonal (at most 0.3
  :math:`\sqrt\varepsilon` over 6 spectra × 6 seeds in float64, where ``"partial"`` reached 4.6
  :math:`\sqrt\varepsilon` on one clustered spectrum). Basis reads, in percent of the full mode's,
  ``"selective"`` against ``"partial"`` (100 steps): 9% against 30% on a dense matrix with 10
  outliers, 4% against 16% with two tight clusters of outliers, 12% against 19% on the float64
  GGN of the benchmark (``analyses/benchmark_lanczos.py``).
* ``"none"``: the local step only; three vectors in memory, for spectral-density work on very
  large operators where ghosts only move a little weight.

``reorthogonalize=True`` / ``False`` mean ``"full"`` / ``"none"``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import scipy.linalg
import torch

from hessian_lab.linalg.linear_operator import TorchLinearOperator, as_linear_operator
from hessian_lab.linalg.probes import make_generator

__all__ = [
    "LanczosRecurrence",
    "LanczosResult",
    "REORTHOGONALIZATION_MODES",
    "Reorthogonalization",
    "batched_lanczos",
    "default_breakdown_tol",
    "lanczos",
    "reorthogonalization_mode",
    "tridiagonal_eigh",
]

#: Reorthogonalization modes of :class:`LanczosRecurrence` (see the module docstring).
Reorthogonalization = Literal["full", "partial", "selective", "none"]

#: The valid values of ``reorthogonalize`` (besides True / False).
REORTHOGONALIZATION_MODES: tuple[str, ...] = ("full", "partial", "selective", "none")

# A second Gram–Schmidt pass is needed when the first pass removed more than this fraction of the
# norm (DGKS criterion with eta = 1/sqrt(2)).
_REORTH_ETA = 1.0 / math.sqrt(2.0)

# Selective mode: past this many good Ritz vectors per basis vector, keeping them up costs more
# than Simon's ranges, and the process goes on in the "partial" mode.
_SELECTIVE_MAX_FRACTION = 0.25
_SELECTIVE_MIN_VECTORS = 16
# Selective orthogonalization runs in float64 only: with float32 vectors sqrt(eps)·‖T‖ = 3e-4 ‖T‖
# is passed by most Ritz values of a network's spectrum (the good set would be the basis) and
# its monitor was seen to let the loss exceed sqrt(eps) (up to 3 sqrt(eps), 6 spectra × 6 seeds).
_SELECTIVE_MAX_EPS = 1e-10


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


def default_breakdown_tol(op_dtype: torch.dtype) -> float:
    r"""Breakdown when :math:`\beta_j \le 100\,\varepsilon\,\|A\|_2` (operator's precision).

    Below this level the new direction is made of rounding errors of the product, not of ``A``.
    """
    return 100.0 * torch.finfo(op_dtype).eps


def reorthogonalization_mode(reorthogonalize: bool | str) -> Reorthogonalization:
    """Normalize a ``reorthogonalize`` argument: ``True`` is ``"full"``, ``False`` is ``"none"``.

    Raises:
        ValueError: For anything but a bool or one of ``"full"``, ``"partial"``,
            ``"selective"``, ``"none"`` (the message names them).
    """
    if isinstance(reorthogonalize, str):
        if reorthogonalize in REORTHOGONALIZATION_MODES:
            return reorthogonalize  # type: ignore[return-value]
    elif isinstance(reorthogonalize, (bool, np.bool_)):
        return "full" if reorthogonalize else "none"
    valid = ", ".join(repr(m) for m in REORTHOGONALIZATION_MODES)
    raise ValueError(
        f"reorthogonalize must be one of {valid}, or True (= 'full') / False (= 'none'); "
        f"got {reorthogonalize!r}."
    )


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices as runs ``[lo, hi)`` of consecutive values (gaps of 1-2 merged)."""
    if idx.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(idx) > 3)
    lows = np.concatenate([idx[:1], idx[cuts + 1]])
    highs = np.concatenate([idx[cuts], idx[-1:]]) + 1
    return list(zip(lows.tolist(), highs.tolist(), strict=True))


def _rowdot(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``[p, 1]`` row-wise inner products of two ``[p, n]`` blocks (no ``[p, n]`` temporary)."""
    return torch.bmm(X.unsqueeze(1), Y.unsqueeze(2)).view(-1, 1)


class LanczosRecurrence:
    r"""``p`` independent Lanczos processes advanced in lockstep, one ``matmat`` per step.

    The one implementation of the recurrence in this package (``p = 1`` for :func:`lanczos` and
    :func:`~.eigsh.eigsh`, ``p`` probes for stochastic Lanczos quadrature). Resumable: :meth:`run`
    may be called again with a larger step count. All vectors live in buffers allocated once: the
    basis ``[p, capacity, n]`` (each process's ``[j, n]`` block contiguous, so that
    reorthogonalization is two batched matrix-vector products) or, without a basis, two ``[p, n]``
    vectors, plus one ``[p, n]`` work vector. The coefficients live on the host (float64 copies of
    working-precision values), so each step synchronizes with the device once (twice with a
    second Gram–Schmidt pass or a partial reorthogonalization).

    A process (column) that breaks down, :math:`\beta_j \le` ``breakdown_tol`` :math:`\cdot
    \|A\|`, either stops there (its vector becomes zero, its coefficients end) or, with
    ``on_breakdown="restart"`` and a basis, continues with a random unit vector orthogonal to its
    basis and :math:`\beta_j = 0` in ``T``.

    Args:
        A: The operator in internal form.
        V0: ``[n, p]`` start vectors (any nonzero scale), in the working dtype on ``A.device``.
        capacity: Largest number of steps (capped at ``n``); the basis is preallocated for it.
        reorthogonalize: ``"full"``, ``"partial"``, ``"selective"`` or ``"none"`` (or True /
            False). ``"selective"`` runs for ``p = 1`` and float64 vectors; otherwise it is
            ``"partial"`` (see the module docstring).
        keep_basis: Keep the basis even without reorthogonalization.
        on_breakdown: ``"stop"`` or ``"restart"`` (needs the basis and reorthogonalization,
            otherwise the column stops).
        breakdown_tol: Relative tolerance on :math:`\beta_j / \|A\|`; default ``100 ε`` of the
            operator's dtype.
        generator: Source of the restart vectors.

    Attributes:
        alphas: ``[p, capacity]`` float64 host array, :math:`\alpha_j` of each column (0 after it
            stopped).
        betas: ``[p, capacity]`` float64 host array, :math:`\beta_j` after step ``j`` (0 at a
            breakdown).
        lengths: ``[p]`` steps done by each column.
        anorm: ``[p]`` running estimate :math:`\max_j \|A v_j\|` of :math:`\|A\|_2`.
        breakdowns: Per column, the steps ``j`` after which it broke down.
        basis: ``[p, capacity, n]`` or None.
        reorthogonalized_steps: Column-steps with a Gram–Schmidt pass against (part of) the basis.
        second_passes: Column-steps that needed a second pass (DGKS).
        basis_vector_reads: Length-``n`` vectors read by reorthogonalization (basis rows and
            good Ritz vectors; a Gram–Schmidt pass against ``k`` vectors reads ``2 k``): the
            memory traffic outside the products, in vectors.
        requested_mode: The ``reorthogonalize`` mode asked for; ``mode`` is the one running
            now (``"selective"`` may become ``"partial"``, see the module docstring).
        ritz_checks: Eigendecompositions of ``T`` by the ``"selective"`` monitor.
        ritz_vector_builds: Times it read the basis to build good Ritz vectors.
        switched_to_partial: Step at which ``"selective"`` became ``"partial"``, or None.
    """

    def __init__(
        self,
        A: TorchLinearOperator,
        V0: torch.Tensor,
        *,
        capacity: int,
        reorthogonalize: bool | str = "full",
        keep_basis: bool = False,
        on_breakdown: Literal["stop", "restart"] = "stop",
        breakdown_tol: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if on_breakdown not in ("stop", "restart"):
            raise ValueError(f"on_breakdown must be 'stop' or 'restart', got {on_breakdown!r}.")
        if V0.dim() != 2 or V0.shape[0] != A.n:
            raise ValueError(f"V0 must have shape [{A.n}, p], got {tuple(V0.shape)}.")
        self.A = A
        self.n, self.p = A.n, int(V0.shape[1])
        self.dtype, self.device = V0.dtype, V0.device
        self.capacity = max(1, min(int(capacity), self.n))
        self.requested_mode = reorthogonalization_mode(reorthogonalize)
        self.mode = self.requested_mode
        selective_here = self.p == 1 and torch.finfo(V0.dtype).eps <= _SELECTIVE_MAX_EPS
        if self.mode == "selective" and not selective_here:
            # Several columns (one set of good Ritz vectors per process is not implemented;
            # Simon's monitor is batched) or a working precision coarser than float64: partial.
            self.mode = "partial"
        self.keep_basis = bool(keep_basis) or self.mode != "none"
        self.can_restart = on_breakdown == "restart" and self.keep_basis and self.mode != "none"
        self.breakdown_tol = (
            default_breakdown_tol(A.dtype) if breakdown_tol is None else float(breakdown_tol)
        )
        self.generator = generator if generator is not None else make_generator(self.device, 0)
        self._tiny = torch.finfo(self.dtype).tiny

        norms = torch.linalg.vector_norm(V0, dim=0)
        if not bool(torch.all(torch.isfinite(norms) & (norms > 0))):
            raise ValueError("Every Lanczos start vector (v0) must be nonzero and finite.")
        p, n, cap = self.p, self.n, self.capacity
        if self.keep_basis:
            self.basis: torch.Tensor | None = torch.empty(
                p, cap, n, dtype=self.dtype, device=self.device
            )
            self._pair = None
            self.basis[:, 0] = (V0 / norms).T
        else:
            self.basis = None
            self._pair = torch.empty(2, p, n, dtype=self.dtype, device=self.device)
            self._pair[0] = (V0 / norms).T
        self._work = torch.empty(p, n, dtype=self.dtype, device=self.device)
        self._beta_prev = torch.zeros(p, 1, dtype=self.dtype, device=self.device)

        self.alphas = np.zeros((p, cap))
        self.betas = np.zeros((p, cap))
        self.lengths = np.zeros(p, dtype=np.int64)
        self.active = np.ones(p, dtype=bool)
        self._num_active = p
        self.anorm = np.zeros(p)
        self.breakdowns: list[list[int]] = [[] for _ in range(p)]
        self.m = 0
        self.finished = False  # every column stopped, or the basis spans the whole space
        self.reorthogonalized_steps = 0
        self.second_passes = 0
        self.basis_vector_reads = 0
        self.ritz_checks = 0
        self.ritz_vector_builds = 0
        if self.mode in ("partial", "selective"):
            self._eps = torch.finfo(self.dtype).eps
            self._omega = np.zeros((p, cap + 1))  # omega_{j, k}, k <= j (current vector j)
            self._omega_prev = np.zeros((p, cap + 1))  # omega_{j-1, k}
            self._omega[:, 0] = 1.0
            self._defect = np.zeros((p, cap))  # d_j = |v_{j-1}ᵀ w| before its removal
            self._force = np.zeros(p, dtype=bool)
            self._last_ranges: list[list[tuple[int, int]]] = [[] for _ in range(p)]
        if self.mode == "selective":
            # Good Ritz vectors Y = C V (rows), C their coordinates in the basis (host, [k, cap]).
            self._coords = np.zeros((0, cap))
            self._ritz: torch.Tensor | None = None
            self._ritz_buffer: torch.Tensor | None = None
            self._ritz_pair: list[tuple[int, int]] = []
        self.switched_to_partial: int | None = (
            0 if self.requested_mode == "selective" and self.mode == "partial" else None
        )

    @property
    def num_good_ritz_vectors(self) -> int:
        """Good Ritz vectors held by the ``"selective"`` mode (0 in the other modes)."""
        ritz = getattr(self, "_ritz", None)
        return 0 if ritz is None else int(ritz.shape[0])

    def _vector(self, j: int) -> torch.Tensor:
        """The ``[p, n]`` block of vectors ``v_j`` (a view of the basis or of the vector pair)."""
        if self.basis is not None:
            return self.basis[:, j]
        return self._pair[j % 2]

    def _project_out(self, W: torch.Tensor, j: int) -> torch.Tensor:
        """Remove from every row of ``W`` its components along its basis ``V[c, :j + 1]``.

        One classical Gram–Schmidt pass batched over the processes: ``w - V (Vᵀ w)`` as two
        batched matrix-vector products with the contiguous ``[j + 1, n]`` blocks (no host
        synchronization). Returns ``[p, 1]`` the coefficients along ``v_j`` (they belong to
        ``α_j``).
        """
        B = self.basis[:, : j + 1]  # [p, j + 1, n]
        h = torch.bmm(B, W.unsqueeze(2))
        W.unsqueeze(2).baddbmm_(B.transpose(1, 2), h, alpha=-1.0)
        self.reorthogonalized_steps += self.p
        self.basis_vector_reads += 2 * self.p * (j + 1)
        return h[:, j]

    def _project_out_range(self, w: torch.Tensor, c: int, j: int, lo: int, hi: int) -> float:
        """Remove from ``w`` (row ``c``) its components along ``V[c, lo:hi]``; CGS + DGKS.

        Returns the coefficient along ``v_j`` (0 when ``j`` is outside the range).
        """
        B = self.basis[c, lo:hi]
        before = torch.linalg.vector_norm(w)
        h = B @ w
        w.addmv_(B.T, h, alpha=-1.0)
        self.basis_vector_reads += 2 * (hi - lo)
        if bool(torch.linalg.vector_norm(w) < _REORTH_ETA * before):
            self.second_passes += 1
            h2 = B @ w
            w.addmv_(B.T, h2, alpha=-1.0)
            self.basis_vector_reads += 2 * (hi - lo)
            h = h + h2
        return h[j - lo].item() if lo <= j < hi else 0.0

    def _random_orthogonal(self, c: int, j: int) -> torch.Tensor | None:
        """A random unit vector orthogonal to ``V[c, :j]`` (None if numerically impossible)."""
        B = self.basis[c, :j]
        for _ in range(3):
            r = torch.randn(self.n, generator=self.generator, dtype=self.dtype, device=self.device)
            r = r / torch.linalg.vector_norm(r)
            for _ in range(2):
                r = r - B.T @ (B @ r)
            nr = torch.linalg.vector_norm(r).item()
            # A random unit vector keeps about sqrt((n - j) / n) of its norm; far less means it
            # was numerically in the span of the basis.
            if nr > 0.1 * math.sqrt((self.n - j) / self.n):
                return r / nr
        return None

    def _update_omega(self, j: int, rows: np.ndarray) -> np.ndarray:
        r"""Advance the estimates :math:`\omega_{j+1,k}` (rows ``rows``); return ``max_k |ω|``.

        Host work of ``O(j)`` per row on slices of the preallocated arrays; with every row
        active the two estimate buffers are swapped, not copied.
        """
        eps, whole = self._eps, rows.size == self.p
        sel = slice(None) if whole else rows
        om, om_prev = self._omega[sel, : j + 2], self._omega_prev[sel, : j + 2]
        new = np.zeros((rows.size, j + 2))
        if j > 0:
            a, b = self.alphas[sel, : j + 1], self.betas[sel, : j + 1]
            d, bj = self._defect[sel, : j + 1], b[:, j : j + 1]
            t = b[:, :j] * om[:, 1 : j + 1] + (a[:, :j] - a[:, j : j + 1]) * om[:, :j]
            t -= b[:, j - 1 : j] * om_prev[:, :j]
            t[:, 1:] += b[:, : j - 1] * om[:, : j - 1]
            scale = b[:, :j] + bj + self.anorm[sel][:, None]
            theta = eps * scale + d[:, :j] + d[:, j : j + 1]
            t += np.where(t >= 0, theta, -theta)
            new[:, :j] = t / np.where(bj > 0, bj, 1.0)
        new[:, j] = eps  # after the local step against v_j
        new[:, j + 1] = 1.0
        if whole:
            self._omega, self._omega_prev = self._omega_prev, self._omega
            self._omega[:, : j + 2] = new
        else:
            self._omega_prev[rows] = self._omega[rows]
            self._omega[rows, : j + 2] = new
        return np.abs(new[:, :j]).max(axis=1) if j > 0 else np.zeros(rows.size)

    def _ranges(self, c: int, j: int) -> list[tuple[int, int]]:
        r"""Index ranges ``[lo, hi)`` where :math:`|\omega_{j+1,k}| > \varepsilon^{3/4}`.

        Orthogonality is lost along converged Ritz vectors, which live in a few stretches of the
        basis (usually its first vectors): reorthogonalizing against those stretches only (Larsen
        1998) keeps the cost of a partial reorthogonalization far below that of a full one. Runs
        closer than 8 vectors are merged into one range.
        """
        idx = np.flatnonzero(np.abs(self._omega[c, :j]) > self._eps**0.75)
        if idx.size == 0:
            return []
        cuts = np.flatnonzero(np.diff(idx) > 8)
        lows = np.concatenate([idx[:1], idx[cuts + 1]])
        highs = np.concatenate([idx[cuts], idx[-1:]]) + 1
        return list(zip(lows.tolist(), highs.tolist(), strict=True))

    def _partial_reorthogonalization(self, W: torch.Tensor, j: int, beta: list[float]) -> bool:
        """Update the estimates and reorthogonalize the rows that need it (``"partial"`` mode).

        ``beta`` (host, ``[p]``) and ``self.alphas[:, j]`` are corrected in place for those rows.
        Returns whether any row was reorthogonalized.
        """
        rows = np.flatnonzero(self.active)
        if rows.size == 0:
            return False
        self.betas[:, j] = beta
        level = self._update_omega(j, rows)
        triggered, forced = level > math.sqrt(self._eps), self._force[rows]
        # Simon's pair: a triggered reorthogonalization forces one at the next step too.
        self._force[:] = False
        self._force[rows[triggered & ~forced]] = True
        need = rows[triggered | forced].tolist()
        for c in need:
            beta[c] = self._reorthogonalize_ranges(W[c], c, j)
        return bool(need)

    def _selective_reorthogonalization(self, W: torch.Tensor, j: int, beta: list[float]) -> bool:
        r"""The monitor of the ``"selective"`` mode (one process); returns whether ``w`` changed.

        Simon's estimates :math:`\omega_{j+1,k}` are advanced as in ``"partial"``. Only when
        :math:`\max_k |\omega_{j+1,k}| > \sqrt\varepsilon` (where ``"partial"`` would
        reorthogonalize) does anything happen, in this order, each only while the estimates
        still exceed :math:`\sqrt\varepsilon`:

        1. ``w`` is orthogonalized against the good Ritz vectors ``Y = C V`` already known along
           which the estimates put a component :math:`|(C\omega)_i| > \varepsilon^{3/4}` (Parlett
           & Scott's :math:`\tau`), and against the same ones at the next step (Simon's pair:
           ``v_j`` carries the loss into ``v_{j+2}``) (:meth:`_project_out_ritz`; ``C`` holds
           their orthonormal coordinates in the basis); the estimates are projected alike,
           :math:`\omega \leftarrow (I - C^\top C)\omega`;
        2. ``T_{j+1}`` is eigendecomposed (:meth:`_ritz_check`) and the converged Ritz vectors
           not yet covered join ``Y``, ``w`` being orthogonalized against them;
        3. the loss is not explained by converged Ritz vectors: the step does what ``"partial"``
           does (the stretches of the basis where :math:`|\omega| > \varepsilon^{3/4}`, and
           Simon's pair: the next step too).
        """
        if not self.active[0]:
            return False
        limit = math.sqrt(self._eps)
        self.betas[0, j] = beta[0]
        self._update_omega(j, np.zeros(1, dtype=np.int64))
        changed = False
        level = float(np.abs(self._omega[0, :j]).max()) if j > 0 else 0.0
        runs, self._ritz_pair = self._ritz_pair, []
        if level > limit and self._coords.shape[0]:
            # Only the good Ritz vectors along which the estimated component of v_{j+1},
            # tau = C omega (Parlett & Scott's tau), exceeds eps^(3/4); and those again at the
            # next step (Simon's pair: v_j still carries the loss into v_{j+2}).
            tau = self._coords[:, : j + 1] @ self._omega[0, : j + 1]
            runs = _runs(np.flatnonzero(np.abs(tau) > self._eps**0.75)) or runs
            self._ritz_pair = runs
        for lo, hi in runs:
            beta[0] = self._project_out_ritz(W[0], j, beta[0], lo, hi)
            changed = True
        if runs:
            level = float(np.abs(self._omega[0, :j]).max())
        if level > limit and beta[0] > 0 and self._ritz_check(W[0], j, beta):
            if self.mode == "partial":  # handed over, w reorthogonalized, the pair pending
                return True
            changed = True
            level = float(np.abs(self._omega[0, :j]).max())
        triggered, forced = level > limit, bool(self._force[0])
        self._force[0] = triggered and not forced
        if triggered or forced:
            beta[0] = self._reorthogonalize_ranges(W[0], 0, j)
            changed = True
        return changed

    def _project_out_ritz(self, w: torch.Tensor, j: int, beta: float, lo: int, hi: int) -> float:
        r"""``w ← w − Yᵀ(Y w)`` with the good Ritz vectors ``Y[lo:hi]``; returns the new ``‖w‖``.

        The estimates follow: scaled by the change of norm and projected,
        :math:`\omega \leftarrow (I - C^\top C)\,\omega` on those rows ``C`` of coordinates.
        The removed components along ``v_j`` belong to :math:`\alpha_j` (as in ``"full"``).
        """
        Y, C = self._ritz[lo:hi], self._coords[lo:hi, : j + 1]
        h = Y @ w
        w.addmv_(Y.T, h, alpha=-1.0)
        self.basis_vector_reads += 2 * Y.shape[0]
        host = torch.cat([h, torch.linalg.vector_norm(w).view(1)]).tolist()
        self.alphas[0, j] += float(np.dot(host[:-1], C[:, j]))
        om = self._omega[0, : j + 1]
        if host[-1] > 0:
            om[:j] *= beta / host[-1]
        om -= C.T @ (C @ om)
        return host[-1]

    def _to_partial(self, w: torch.Tensor | None = None, j: int = 0) -> float | None:
        r"""Leave the ``"selective"`` mode for ``"partial"`` from a clean state.

        The estimates were projected off the good Ritz vectors, which ``"partial"`` does not
        know: ``w`` (if given) is reorthogonalized against the whole basis, the estimates restart
        at :math:`\varepsilon`, and the next step is reorthogonalized too (Simon's pair).
        Returns the new ``‖w‖`` (None without ``w``).
        """
        self.mode, self._ritz, self._ritz_buffer = "partial", None, None
        self._coords = np.zeros((0, self.capacity))
        self.switched_to_partial = j
        if w is None:
            return None
        self.alphas[0, j] += self._project_out_range(w, 0, j, 0, j + 1)
        self._omega[0, : j + 1] = self._eps
        self._force[0] = True
        self._last_ranges[0] = [(0, j + 1)]
        self.reorthogonalized_steps += 1
        return torch.linalg.vector_norm(w).item()

    def _ritz_check(self, w: torch.Tensor, j: int, beta: list[float]) -> bool:
        r"""Eigendecompose ``T_{j+1}``; add the uncovered good Ritz vectors to ``Y``, project ``w``.

        Ritz pair ``(θ_i, V s_i)`` of ``T_{j+1}`` is good (converged) when
        :math:`\beta_{j+1} |e^\top s_i| \le \sqrt\varepsilon\,\|T\|` (Parlett & Scott 1979:
        by Paige's theorem :math:`|y_i^\top v_{j+2}| \approx \varepsilon\|A\| / (\beta_{j+1}
        |e^\top s_i|)`, so orthogonality is lost only along converged Ritz vectors); with an
        operator coarser than the working precision (``accumulate_dtype``) the products round at
        its :math:`\varepsilon_{op}` and the test is :math:`\beta_{j+1} |e^\top s_i| \le
        \varepsilon_{op}\|T\| / \sqrt\varepsilon`. A good
        ``s_i`` farther than :math:`\sqrt\varepsilon` from the span of ``C`` (new, or a Ritz
        vector that moved since it was built: the refresh) adds its orthonormalized remainder
        ``d`` to ``C`` and ``V d`` to ``Y``, all of them in one read of the basis. When ``Y``
        would hold more than ``max(16, (j + 1) / 4)`` vectors, keeping it up costs more than
        Simon's ranges and the process switches to ``"partial"``. Returns whether ``Y`` grew.
        """
        self.ritz_checks += 1
        theta, S = tridiagonal_eigh(
            torch.from_numpy(self.alphas[0, : j + 1]), torch.from_numpy(self.betas[0, :j])
        )
        theta, S = theta.numpy(), S.numpy()
        tnorm = max(float(np.abs(theta).max()), float(self.anorm[0]))
        bounds = beta[0] * np.abs(S[-1])
        # Paige's γ ≈ ε‖A‖ with ε the coarser of the working and the operator's precision
        # (a float32 operator in float64 vectors rounds its products at float32's ε).
        gamma = max(self._eps, torch.finfo(self.A.dtype).eps) * tnorm
        good = bounds <= gamma / math.sqrt(self._eps)
        if not good.any():
            return False
        C = self._coords[:, : j + 1]
        R = S[:, good]
        if C.shape[0]:
            R = R - C.T @ (C @ R)
            R = R - C.T @ (C @ R)  # twice is enough
        R = R[:, np.linalg.norm(R, axis=0) > math.sqrt(self._eps)]
        if R.shape[1] == 0:
            return False
        # Orthonormal new directions (SVD: drops dependent ones).
        U, sig, _ = np.linalg.svd(R, full_matrices=False)
        D = U[:, sig > math.sqrt(self._eps) * sig.max()].T  # [k_new, j + 1]
        k = self._coords.shape[0] + D.shape[0]
        if k > max(_SELECTIVE_MIN_VECTORS, _SELECTIVE_MAX_FRACTION * (j + 1)):
            # Too many good Ritz vectors (a spectrum that converges everywhere): Simon's ranges
            # are cheaper from here on.
            beta[0] = self._to_partial(w, j)
            return True
        new = np.zeros((D.shape[0], self.capacity))
        new[:, : j + 1] = D
        self._coords = np.concatenate([self._coords, new])
        # Y_new = D V in one read of the basis, into a buffer allocated at the first build. The
        # rows of D are orthonormal and orthogonal to C, so those of Y are orthonormal (and
        # orthogonal to the old ones) to the semi-orthogonality of the basis: no device pass.
        if self._ritz_buffer is None:
            rows = max(_SELECTIVE_MIN_VECTORS, int(_SELECTIVE_MAX_FRACTION * self.capacity))
            self._ritz_buffer = torch.empty(rows, self.n, dtype=self.dtype, device=self.device)
        old = 0 if self._ritz is None else self._ritz.shape[0]
        D_t = torch.from_numpy(D).to(self.device, self.dtype)
        torch.mm(D_t, self.basis[0, : j + 1], out=self._ritz_buffer[old:k])
        self._ritz = self._ritz_buffer[:k]
        self.ritz_vector_builds += 1
        self.basis_vector_reads += j + 1
        beta[0] = self._project_out_ritz(w, j, beta[0], old, k)
        self._ritz_pair = [*self._ritz_pair, (old, k)]  # and again at the next step
        return True

    def _reorthogonalize_ranges(self, w: torch.Tensor, c: int, j: int) -> float:
        r"""Reorthogonalize row ``c`` against its ranges where :math:`|\omega| > \varepsilon^{3/4}`.

        The ranges of the previous step are reused when none is found (the second step of
        Simon's pair). Corrects ``self.alphas[c, j]``, resets the estimates there to
        :math:`\varepsilon` and returns the new norm of ``w``.
        """
        ranges = self._ranges(c, j) or self._last_ranges[c]
        self._last_ranges[c] = ranges
        for lo, hi in ranges:
            self.alphas[c, j] += self._project_out_range(w, c, j, lo, hi)
            self._omega[c, lo:hi] = self._eps
        self.reorthogonalized_steps += 1
        return torch.linalg.vector_norm(w).item()

    def _step(self) -> None:
        j, p = self.m, self.p
        cur = self._vector(j)
        W = self._work
        out = self.A.matmat(cur.T).T  # [p, n]; stopped processes have v = 0
        anorm = torch.linalg.vector_norm(out, dim=1)
        # Local three-term step, written into the work vector (the operator's output is never
        # modified in place).
        if j > 0:
            torch.addcmul(out, self._vector(j - 1), self._beta_prev, value=-1.0, out=W)
        else:
            W.copy_(out)
        alpha = _rowdot(cur, W)
        W.addcmul_(cur, alpha, value=-1.0)
        mode = self.mode
        if mode == "full":
            before = torch.linalg.vector_norm(W, dim=1)
            alpha += self._project_out(W, j)
            beta = torch.linalg.vector_norm(W, dim=1)
            host = torch.stack([alpha[:, 0], beta, anorm, before]).tolist()
            if any(b < _REORTH_ETA * b0 for b, b0 in zip(host[1], host[3], strict=True)):
                # DGKS: the first pass cancelled most of some row; a second one, for all rows.
                self.second_passes += p
                alpha += self._project_out(W, j)
                beta = torch.linalg.vector_norm(W, dim=1)
                host[0], host[1] = torch.stack([alpha[:, 0], beta]).tolist()
        elif mode in ("partial", "selective"):
            if j > 0:  # local reorthogonalization against v_{j-1}; its size is a noise estimate
                prev = self._vector(j - 1)
                c_prev = _rowdot(prev, W)
                W.addcmul_(prev, c_prev, value=-1.0)
            else:
                c_prev = torch.zeros_like(alpha)
            c_cur = _rowdot(cur, W)
            W.addcmul_(cur, c_cur, value=-1.0)
            alpha += c_cur
            beta = torch.linalg.vector_norm(W, dim=1)
            host = torch.stack([alpha[:, 0], beta, anorm, c_prev[:, 0].abs()]).tolist()
            self._defect[:, j] = host[3]
        else:
            beta = torch.linalg.vector_norm(W, dim=1)
            host = torch.stack([alpha[:, 0], beta, anorm]).tolist()
        alpha_h, beta_h = host[0], host[1]
        active = self.active
        all_active = self._num_active == p
        if not all_active:  # stopped rows: zero vectors, zero coefficients
            alpha_h = [a if on else 0.0 for a, on in zip(alpha_h, active, strict=True)]
            beta_h = [b if on else 0.0 for b, on in zip(beta_h, active, strict=True)]
        self.alphas[:, j] = alpha_h
        self.anorm = np.maximum(self.anorm, host[2])
        beta_dev: torch.Tensor | None = beta  # the device copy, while it equals beta_h
        if mode == "partial" and self._partial_reorthogonalization(W, j, beta_h):
            beta_dev = None
        elif mode == "selective" and self._selective_reorthogonalization(W, j, beta_h):
            beta_dev = None

        self.m = j + 1
        if all_active:
            self.lengths[:] = j + 1
        else:
            self.lengths[active] = j + 1
        if j + 1 >= self.n:  # the basis spans the whole space: T_n is exact
            self.betas[:, j] = beta_h
            self.finished = True
            return
        tol, tiny = self.breakdown_tol, self._tiny
        broken = [
            c for c in range(p) if active[c] and beta_h[c] <= tol * max(float(self.anorm[c]), tiny)
        ]
        restarts: dict[int, torch.Tensor] = {}
        for c in broken:
            # Invariant subspace: the Krylov space cannot grow from this start vector.
            self.breakdowns[c].append(j)
            beta_h[c] = 0.0  # T becomes block diagonal (or the column ends)
            restart = None
            if self.can_restart and j + 1 < self.capacity:
                restart = self._random_orthogonal(c, j + 1)
            if restart is None:
                self.active[c] = False
                self._num_active -= 1
            else:
                restarts[c] = restart
                if mode == "selective":
                    # Past a restart T is block diagonal and its Ritz vectors no longer follow
                    # the recurrence: the process goes on in the "partial" mode (p = 1 here).
                    self._to_partial(None, j)
                if mode in ("partial", "selective"):
                    self._omega[c, : j + 1] = self._eps
                    self._force[c] = False
                    self._last_ranges[c] = []
        self.betas[:, j] = beta_h
        if self._num_active == 0:
            self.finished = True
        if j + 1 >= self.capacity:
            return
        nxt = self._vector(j + 1)
        if beta_dev is None or broken or not all_active:
            beta_dev = torch.tensor(beta_h, dtype=self.dtype, device=self.device)
            scale = torch.where(beta_dev > 0, beta_dev, torch.ones_like(beta_dev))
            torch.div(W, scale[:, None], out=nxt)
            for c in range(p):
                if not self.active[c]:
                    nxt[c].zero_()
            for c, r in restarts.items():
                nxt[c].copy_(r)
        else:
            torch.div(W, beta_dev[:, None], out=nxt)
        self._beta_prev = beta_dev[:, None]

    def run(self, num_steps: int) -> None:
        """Advance every process until ``num_steps`` steps are done (or none can go further)."""
        num_steps = min(int(num_steps), self.capacity)
        while self.m < num_steps and not self.finished:
            self._step()

    def result(self, column: int = 0, return_basis: bool = False) -> LanczosResult:
        """The state of one process as a :class:`LanczosResult`."""
        m = int(self.lengths[column])
        to = {"dtype": self.dtype, "device": self.device}
        alphas = torch.tensor(self.alphas[column, :m], **to)
        betas = torch.tensor(self.betas[column, : max(m - 1, 0)], **to)
        beta_last = float(self.betas[column, m - 1]) if m else 0.0
        basis = None
        if return_basis and self.basis is not None:
            basis = self.basis[column, :m].T
        return LanczosResult(alphas, betas, beta_last, basis, list(self.breakdowns[column]))


def lanczos(
    op: object,
    num_steps: int,
    *,
    v0: torch.Tensor | None = None,
    seed: int | None = 0,
    reorthogonalize: bool | Reorthogonalization = True,
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
        reorthogonalize: ``True`` / ``"full"`` (default): reorthogonalize each vector against the
            whole basis. ``"partial"``: only when the estimated loss of orthogonality exceeds
            :math:`\sqrt\varepsilon` (Simon 1984; same Ritz values to rounding, a fraction of the
            cost, a semi-orthogonal basis; see the module docstring). ``"selective"``:
            against the converged Ritz vectors only (Parlett & Scott 1979), each computed once
            when it converges, looked for where ``"partial"`` would reorthogonalize; a
            semi-orthogonal basis and the fewest basis reads when a few eigenvalues converge
            (outliers), in float64 vectors; it is ``"partial"`` in float32 and hands over to it
            when most Ritz values converge or after a restart (see the module docstring).
            ``False`` / ``"none"``:
            three vectors only, and ghost copies of converged eigenvalues appear.
        return_basis: Return ``V_m`` (``[n, m]``, on the operator's device). With
            ``reorthogonalize=False`` this stores the basis anyway, but does not use it.
        accumulate_dtype: Dtype of the vectors and coefficients (e.g. ``torch.float64`` for a
            float32 operator); products are still taken in the operator's dtype. Default: the
            operator's dtype.
        on_breakdown: What to do when :math:`\beta_j` vanishes (the Krylov space is invariant, e.g.
            ``A`` has fewer distinct eigenvalues than ``m``): ``"stop"`` returns the ``j + 1``
            steps done — the spectral information is then exact — and ``"restart"`` continues with
            a random vector orthogonal to the basis (``β_j = 0`` in ``T``), which lets the
            eigenvalue multiplicities appear. Restarts need reorthogonalization.
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
    mode = reorthogonalization_mode(reorthogonalize)
    dtype = accumulate_dtype or A.dtype
    generator = make_generator(A.device, seed)
    if v0 is None:
        v0 = torch.randn(A.n, generator=generator, dtype=dtype, device=A.device)
    else:
        v0 = torch.as_tensor(v0).to(device=A.device, dtype=dtype).reshape(-1)
        if v0.shape[0] != A.n:
            raise ValueError(f"v0 has {v0.shape[0]} entries but the operator has size {A.n}.")
    proc = LanczosRecurrence(
        A,
        v0.unsqueeze(1),
        capacity=num_steps,
        reorthogonalize=mode,
        keep_basis=return_basis,
        on_breakdown=on_breakdown,
        breakdown_tol=breakdown_tol,
        generator=generator,
    )
    proc.run(num_steps)
    return proc.result(0, return_basis)


def batched_lanczos(
    op: object,
    V0: torch.Tensor,
    num_steps: int,
    *,
    reorthogonalize: bool | Reorthogonalization = True,
    breakdown_tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Independent Lanczos processes from the columns of ``V0``, advanced in lockstep.

    Every step applies the operator once to all ``p`` current vectors with one ``matmat`` (our
    operators batch the columns with ``vmap``, which is much cheaper than ``p`` products); the
    recurrence and the reorthogonalization are batched over the columns
    (:class:`LanczosRecurrence`, the same code as :func:`lanczos`). Used for stochastic Lanczos
    quadrature, where probes are independent. A column whose process breaks down (invariant
    subspace) stops there: its vector is set to zero and its coefficients end.

    Args:
        op: Symmetric linear-operator-like object.
        V0: ``[n, p]`` start vectors (normalized here), in the working dtype.
        num_steps: Steps ``m`` per process (capped at ``n``).
        reorthogonalize: ``True`` / ``"full"``, ``"partial"`` or ``False`` / ``"none"``, as in
            :func:`lanczos`, each process against its own basis (memory ``p × m × n``).
            ``"selective"`` is accepted and runs ``"partial"`` when ``p > 1`` (its good Ritz
            vectors are per process; Simon's monitor is batched).
        breakdown_tol: As in :func:`lanczos`; default ``100 ε`` of the operator's dtype.

    Returns:
        ``(alphas, betas, lengths)``: ``[p, m]`` and ``[p, m - 1]`` coefficients (zero-padded after
        a breakdown) and ``[p]`` the number of steps of each process.
    """
    A = as_linear_operator(op)
    n = A.n
    m = min(int(num_steps), n)
    proc = LanczosRecurrence(
        A, V0, capacity=m, reorthogonalize=reorthogonalize, breakdown_tol=breakdown_tol
    )
    proc.run(m)
    to = {"dtype": V0.dtype, "device": V0.device}
    alphas = torch.tensor(proc.alphas[:, :m], **to)
    betas = torch.tensor(proc.betas[:, : m - 1], **to)
    return alphas, betas, torch.from_numpy(proc.lengths.copy())
