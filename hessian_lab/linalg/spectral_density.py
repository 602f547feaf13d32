r"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric ``A`` (size ``n``, eigenpairs :math:`(\lambda_j, q_j)`) is

.. math::  \phi(t) = \frac{1}{n} \sum_{j=1}^n \delta(t - \lambda_j).

For a random unit probe ``v`` with :math:`E[v v^\top] = I/n` (normalized Rademacher),
:math:`\sum_j (q_j^\top v)^2 \delta(t - \lambda_j)` is an unbiased estimate of :math:`\phi`, and
``m`` Lanczos steps from ``v`` give its Gauss quadrature: nodes :math:`\theta_i` (eigenvalues of
``T_m``) and weights :math:`\tau_i = (e_1^\top s_i)^2` (squared first components of the
eigenvectors of ``T_m``), exact for polynomials of degree ``< 2m`` (Golub & Meurant; Lin, Saad &
Yang 2016; Ghorbani, Krishnan & Xiao 2019; Papyan 2020). Averaging over probes and smoothing each
node with a Gaussian gives a density; the spread across probes gives error bands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hessian_lab.linalg.lanczos import (
    Reorthogonalization,
    batched_lanczos,
    default_breakdown_tol,
    reorthogonalization_mode,
    tridiagonal_eigh,
)
from hessian_lab.linalg.linear_operator import as_linear_operator, reports_progress
from hessian_lab.linalg.probes import make_generator, rademacher

__all__ = ["SpectralDensity", "spectral_density"]


def _as_grid(grid: object) -> torch.Tensor:
    return torch.as_tensor(grid, dtype=torch.float64).reshape(-1).cpu()


def _gaussian_mixture(
    grid: torch.Tensor, centers: torch.Tensor, weights: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``[p, G]``: for each probe, ``sum_i w_i N(grid; c_i, sigma²)`` (``sigma`` a std. dev.)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive (it is a standard deviation), got {sigma}.")
    z = (grid[None, None, :] - centers[:, :, None]) / sigma  # [p, m, G]
    kernel = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2.0 * math.pi))
    return torch.einsum("pm,pmg->pg", weights, kernel)


@dataclass(frozen=True)
class SpectralDensity:
    r"""Per-probe Gauss quadratures of the spectral measure of an operator.

    Attributes:
        nodes: ``[num_probes, m]`` Ritz values :math:`\theta_{p,i}` (float64, CPU). Probes whose
            Lanczos process broke down early (an invariant subspace: the quadrature is then exact)
            are padded with zero-weight nodes.
        weights: ``[num_probes, m]`` Gauss weights :math:`\tau_{p,i} \ge 0`; each row sums to 1.
        n: Size of the operator.
        op_dtype: Dtype of the operator's products (sets the default rounding thresholds).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    n: int
    op_dtype: torch.dtype = torch.float64

    @property
    def num_probes(self) -> int:
        """Number of probes."""
        return int(self.nodes.shape[0])

    @property
    def spectral_norm_estimate(self) -> float:
        """``max |θ|`` over all nodes: a lower bound on ``‖A‖₂``, sharp after a few steps."""
        return float(self.nodes.abs().max())

    def probe_densities(self, grid: object, sigma: float) -> torch.Tensor:
        r"""Smoothed density of each probe on ``grid``: ``[num_probes, G]``.

        :math:`\phi_p(t) = \sum_i \tau_{p,i}\, \mathcal N(t;\ \theta_{p,i},\ \sigma^2)`.

        Args:
            grid: Points ``t`` (1-D array-like).
            sigma: **Standard deviation** (not variance) of the Gaussian kernel, in units of
                eigenvalues. Each curve integrates to 1 over the real line.
        """
        return _gaussian_mixture(_as_grid(grid), self.nodes, self.weights, float(sigma))

    def density(self, grid: object, sigma: float) -> torch.Tensor:
        r"""Estimated spectral density on ``grid``: the mean of :meth:`probe_densities`.

        Args:
            grid: Points ``t`` (1-D array-like), in units of eigenvalues.
            sigma: **Standard deviation** of the Gaussian smoothing kernel (not its variance;
                peers differ on this). The result integrates to 1 over the real line (up to the part
                of the Gaussians outside a finite grid).

        Returns:
            ``[G]`` float64 density values.
        """
        return self.probe_densities(grid, sigma).mean(dim=0)

    def density_standard_error(self, grid: object, sigma: float) -> torch.Tensor:
        """Standard error of :meth:`density` across probes: ``std(ddof=1) / sqrt(num_probes)``.

        Use ``density ± 1.96 · standard_error`` as a pointwise 95% band. Zero with one probe.
        """
        per = self.probe_densities(grid, sigma)
        if self.num_probes < 2:
            return torch.zeros(per.shape[1], dtype=per.dtype)
        return per.std(dim=0) / math.sqrt(self.num_probes)

    def _log_abs_nodes(self, floor: float | None) -> tuple[torch.Tensor, float]:
        if floor is None:
            floor = math.sqrt(torch.finfo(self.op_dtype).eps) * self.spectral_norm_estimate
        floor = max(float(floor), torch.finfo(torch.float64).tiny)
        return torch.log10(self.nodes.abs().clamp(min=floor)), floor

    def log_abs_density(
        self,
        grid: object,
        sigma: float,
        *,
        sign: str | None = None,
        floor: float | None = None,
        per_probe: bool = False,
    ) -> torch.Tensor:
        r"""Density of :math:`u = \log_{10}|\lambda|` (Papyan 2020), for spectra over many decades.

        :math:`\psi(u) = \sum_i \tau_i\, \mathcal N(u;\ \log_{10}\max(|\theta_i|, \mathrm{floor}),\
        \sigma^2)`, averaged over probes. Smoothing in ``log|λ|`` gives each decade the same
        resolution, which a linear grid cannot.

        Args:
            grid: Points ``u`` in decades (``log10|λ|``).
            sigma: **Standard deviation** of the Gaussian kernel, in decades.
            sign: None (all nodes; integrates to 1), ``"positive"`` (only :math:`\theta > 0`) or
                ``"negative"`` (only :math:`\theta < 0`); the two signed parts integrate to the
                positive and negative spectral masses and add up to the whole.
            floor: Magnitudes below it are clamped to it (a pile-up at ``log10(floor)`` stands for
                the numerically-zero eigenvalues). Default :math:`\sqrt{\varepsilon}\max|\theta|`
                in the operator's precision.
            per_probe: Return ``[num_probes, G]`` instead of the mean ``[G]``.
        """
        centers, _ = self._log_abs_nodes(floor)
        w = self.weights
        if sign == "positive":
            w = w * (self.nodes > 0)
        elif sign == "negative":
            w = w * (self.nodes < 0)
        elif sign is not None:
            raise ValueError(f"sign must be None, 'positive' or 'negative', got {sign!r}.")
        per = _gaussian_mixture(_as_grid(grid), centers, w, float(sigma))
        return per if per_probe else per.mean(dim=0)

    def negative_mass(self, threshold: float | None = None) -> tuple[float, float]:
        r"""Fraction of the spectrum below ``-threshold``, with its standard error across probes.

        Estimates :math:`\#\{j: \lambda_j < -\mathrm{threshold}\} / n` by the quadrature weight of
        nodes below ``-threshold``. Unbiased over probes only where the spectrum has a gap around
        ``-threshold``: Gauss nodes have a resolution of about ``width / num_steps``, so eigenvalue
        mass piled up next to the threshold (a Hessian's bulk near 0) can be counted on the wrong
        side. Compare several ``num_steps`` before reading much into small differences.

        Args:
            threshold: Default :math:`\sqrt{\varepsilon}\max|\theta|` in the operator's precision,
                so that rounding-level negative nodes of a PSD operator do not count.

        Returns:
            ``(mass, standard_error)``.
        """
        if threshold is None:
            threshold = math.sqrt(torch.finfo(self.op_dtype).eps) * self.spectral_norm_estimate
        per = (self.weights * (self.nodes < -threshold)).sum(dim=1)
        se = per.std().item() / math.sqrt(self.num_probes) if self.num_probes > 1 else 0.0
        return per.mean().item(), se

    def expectation(self, f: object) -> tuple[float, float]:
        r"""Estimate :math:`\frac1n \operatorname{tr} f(A) = \int f\,d\phi` and its standard error.

        Args:
            f: Elementwise function of a float64 tensor (e.g. ``torch.log`` or ``lambda t: t``).
        """
        per = (self.weights * f(self.nodes)).sum(dim=1)
        se = per.std().item() / math.sqrt(self.num_probes) if self.num_probes > 1 else 0.0
        return per.mean().item(), se


@reports_progress("spectral density", total=lambda a: a["num_probes"] * a["num_steps"])
def spectral_density(
    op: object,
    num_probes: int = 10,
    num_steps: int = 80,
    seed: int | None = 0,
    *,
    reorthogonalize: bool | Reorthogonalization = True,
    accumulate_dtype: torch.dtype | None = None,
    probe_batch_size: int | None = None,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature of the spectral density of a symmetric operator.

    Each probe is a Rademacher vector divided by :math:`\sqrt n`; ``num_steps`` Lanczos steps from
    it give ``num_steps`` Gauss nodes and weights. Cost: ``num_probes × num_steps`` products.

    Args:
        op: Symmetric linear-operator-like object.
        num_probes: Number of random probes (more probes: less variance of the weights).
        num_steps: Lanczos steps per probe (more steps: finer resolution of the spectrum; the
            quadrature is exact for polynomials of degree ``< 2 num_steps``). Capped at ``n``.
        seed: Seed of the probes (a :class:`torch.Generator` on the operator's device).
        reorthogonalize: ``True`` / ``"full"``: full reorthogonalization (default);
            ``"partial"``: Simon's partial reorthogonalization (the same nodes and weights to
            rounding, less time; see :mod:`~hessian_lab.linalg.lanczos`); ``"selective"``:
            Parlett & Scott's selective orthogonalization, which runs only with one probe per
            batch (``probe_batch_size=1``) and float64 vectors, and is ``"partial"`` otherwise;
            ``False`` / ``"none"``:
            ghost nodes share the weight of outliers, and the basis is not stored.
        accumulate_dtype: Working dtype of the Lanczos vectors (e.g. float64 for float32 operators).
        probe_batch_size: Probes run in lockstep, sharing one ``matmat`` per step (much cheaper
            than one product per probe with our vmapped operators). Memory: ``probe_batch_size ×
            num_steps × n`` for the bases. Default: as many as fit in about 256 MB.
        progress: Show a progress bar counting the products (default ``False``).

    Returns:
        A :class:`SpectralDensity`; call ``.density(grid, sigma)`` with ``sigma`` a **standard
        deviation**.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.linspace(0.0, 1.0, 500, dtype=torch.float64))
        >>> sd = spectral_density(A, num_probes=4, num_steps=30)
        >>> grid = torch.linspace(-0.5, 1.5, 2001, dtype=torch.float64)
        >>> mass = torch.trapezoid(sd.density(grid, sigma=0.05), grid).item()
        >>> round(mass, 6)
        1.0
    """
    A = as_linear_operator(op)
    if num_probes < 1 or num_steps < 1:
        raise ValueError("num_probes and num_steps must be positive.")
    mode = reorthogonalization_mode(reorthogonalize)
    dtype = accumulate_dtype or A.dtype
    m = min(int(num_steps), A.n)
    if probe_batch_size is None:
        # Probes share each product (one matmat per step); keep their bases within ~256 MB.
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_probe = (m if mode != "none" else 3) * A.n * itemsize
        probe_batch_size = max(1, min(num_probes, (256 * 2**20) // per_probe))
    gen = make_generator(A.device, seed)
    nodes = torch.zeros(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    for start in range(0, num_probes, probe_batch_size):
        b = min(probe_batch_size, num_probes - start)
        Z = rademacher((A.n, b), generator=gen, dtype=dtype, device=A.device)
        alphas, betas, lengths = batched_lanczos(
            A, Z, m, reorthogonalize=mode, breakdown_tol=default_breakdown_tol(A.dtype)
        )
        for c in range(b):
            k = int(lengths[c])  # a breakdown ends a probe early: its quadrature is exact
            theta, S = tridiagonal_eigh(alphas[c, :k], betas[c, : k - 1])
            p = start + c
            nodes[p, :k] = theta
            nodes[p, k:] = theta[-1]  # zero-weight padding inside the spectrum's range
            weights[p, :k] = S[0] ** 2
    return SpectralDensity(nodes, weights, A.n, A.dtype)
