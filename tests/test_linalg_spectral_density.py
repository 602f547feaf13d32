"""Stochastic Lanczos quadrature against the exact eigenvalue distribution."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.stats import wasserstein_distance

from hessian_lab.linalg import SpectralDensity, spectral_density

F64 = torch.float64
N = 300


def known_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Qᵀ with a Haar-random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = lam.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return (Q * lam) @ Q.T


# Indefinite bulk, a skewed positive part and outliers: a Hessian-like spectrum.
LAM = torch.cat(
    [
        torch.linspace(-1.0, 0.0, 75, dtype=F64),
        torch.linspace(0.0, 1.0, N - 83, dtype=F64) ** 3,
        torch.linspace(5.0, 20.0, 8, dtype=F64),
    ]
)
A = known_spectrum(LAM)


def w1(sd) -> float:
    """1-Wasserstein distance between the SLQ measure (all probes pooled) and the exact one."""
    return wasserstein_distance(
        sd.nodes.flatten().numpy(), LAM.numpy(), sd.weights.flatten().numpy() / sd.num_probes
    )


def sampling_bound(num_probes: int) -> float:
    r"""Bound on E W1 from the probe variance alone (exact nodes).

    With unit Rademacher probes, F̂(t) = mean_p Σ_{λ_j ≤ t} (q_jᵀv)² has variance
    ≤ 2 min(F, 1 - F) / (n p) (Var zᵀPz ≤ 2 rank P for a projector P), so
    E W1 = E ∫|F̂ - F| ≤ ∫ sqrt(2 min(F, 1 - F) / (n p)) dt.
    """
    s = np.sort(LAM.numpy())
    F = np.arange(1, N) / N  # F between consecutive eigenvalues
    return float(np.sum(np.sqrt(2 * np.minimum(F, 1 - F) / (N * num_probes)) * np.diff(s)))


def jackson_bound(num_steps: int) -> float:
    r"""Bound on the quadrature part: Gauss with m nodes integrates polynomials of degree 2m - 1
    exactly, and a 1-Lipschitz f on [a, b] has a polynomial of that degree within
    π (b - a) / (4 · 2m) (Jackson), so |∫f dμ_m - ∫f dμ| ≤ π (b - a) / (4 m)."""
    width = (LAM.max() - LAM.min()).item()
    return math.pi * width / (4 * num_steps)


def test_weights_are_a_probability_and_nodes_in_hull():
    sd = spectral_density(A, num_probes=3, num_steps=40, seed=0)
    assert sd.nodes.shape == (3, 40) and sd.weights.shape == (3, 40)
    torch.testing.assert_close(sd.weights.sum(dim=1), torch.ones(3, dtype=F64))
    assert (sd.weights >= 0).all()
    assert sd.nodes.min() >= LAM.min() - 1e-10 and sd.nodes.max() <= LAM.max() + 1e-10


def test_w1_to_exact_spectrum_is_small_and_shrinks_with_probes():
    m, total = 80, 64
    sd = spectral_density(A, num_probes=total, num_steps=m, seed=0)
    mean_w1 = {}
    for p in (1, 4, 16, 64):
        # Average over the disjoint groups of p probes of one run: a low-noise estimate of E W1.
        groups = [
            SpectralDensity(sd.nodes[i : i + p], sd.weights[i : i + p], sd.n)
            for i in range(0, total, p)
        ]
        mean_w1[p] = float(np.mean([w1(g) for g in groups]))
    # Close: within the derived bound (probe variance + quadrature).
    for p, value in mean_w1.items():
        assert value <= sampling_bound(p) + jackson_bound(m), (p, value)
    # Shrinks: W1 ∝ 1/sqrt(p) while the probe variance dominates (x8 from 1 to 64 probes);
    # we ask for half of that, leaving room for the quadrature part that does not shrink.
    assert mean_w1[1] > mean_w1[4] > mean_w1[16] > mean_w1[64]
    assert mean_w1[64] < mean_w1[1] / 4


def test_density_integrates_to_one_and_matches_smoothed_histogram():
    sd = spectral_density(A, num_probes=20, num_steps=80, seed=1)
    sigma = 0.5
    grid = torch.linspace(-5.0, 25.0, 6001, dtype=F64)
    dens = sd.density(grid, sigma)
    assert abs(torch.trapezoid(dens, grid).item() - 1.0) < 1e-6
    # Exact density smoothed with the same kernel. Integrating by parts,
    # ∫|φ_σ * (μ - ν)| = ∫|φ_σ' * (F_μ - F_ν)| ≤ ‖φ_σ'‖₁ W1(μ, ν) = 2 φ_σ(0) W1(μ, ν).
    exact = torch.exp(-0.5 * ((grid[:, None] - LAM[None]) / sigma) ** 2).sum(1)
    exact = exact / (N * sigma * math.sqrt(2 * math.pi))
    l1 = torch.trapezoid((dens - exact).abs(), grid).item()
    assert l1 <= w1(sd) * 2 / (sigma * math.sqrt(2 * math.pi)) + 1e-6


def test_sigma_is_a_standard_deviation():
    # One node with weight 1: the density must be N(t; θ, σ²) — σ a standard deviation.
    sd = spectral_density(torch.diag(torch.full((10,), 2.0, dtype=F64)), 1, 5)
    assert sd.num_probes == 1 and sd.nodes[0, 0].item() == pytest.approx(2.0)
    sigma = 0.3
    t = torch.tensor([2.0, 2.3], dtype=F64)
    d = sd.density(t, sigma)
    assert d[0].item() == pytest.approx(1 / (sigma * math.sqrt(2 * math.pi)), rel=1e-12)
    assert (d[1] / d[0]).item() == pytest.approx(math.exp(-0.5), rel=1e-12)  # one σ away


def test_error_bands_and_per_probe_densities():
    sd = spectral_density(A, num_probes=6, num_steps=30, seed=2)
    grid = torch.linspace(-2, 22, 500, dtype=F64)
    per = sd.probe_densities(grid, 0.3)
    assert per.shape == (6, 500)
    torch.testing.assert_close(per.mean(0), sd.density(grid, 0.3))
    se = sd.density_standard_error(grid, 0.3)
    torch.testing.assert_close(se, per.std(0) / math.sqrt(6))
    assert (se > 0).any()


def test_negative_mass_and_log_density():
    # A spectral gap around 0: the quadrature resolves the sign of every node. (With mass piled up
    # next to 0, Gauss nodes straddle 0 and the count is biased by up to the weight within about
    # width / num_steps of 0; see the docstring of negative_mass.)
    lam = torch.cat(
        [torch.linspace(-1.0, -0.3, 70, dtype=F64), torch.linspace(0.2, 3.0, N - 70, dtype=F64)]
    )
    B = known_spectrum(lam, seed=5)
    sd = spectral_density(B, num_probes=30, num_steps=60, seed=3)
    mass, se = sd.negative_mass()
    truth = 70 / N
    assert se > 0 and abs(mass - truth) <= 3 * se
    # log10|λ| densities: the signed parts add up to the whole and integrate to the masses.
    u = torch.linspace(-12, 3, 4001, dtype=F64)
    whole = sd.log_abs_density(u, 0.1)
    pos = sd.log_abs_density(u, 0.1, sign="positive")
    neg = sd.log_abs_density(u, 0.1, sign="negative")
    assert abs(torch.trapezoid(whole, u).item() - 1.0) < 1e-6
    torch.testing.assert_close(pos + neg, whole)
    assert abs(torch.trapezoid(neg, u).item() - sd.negative_mass(threshold=0.0)[0]) < 1e-6
    per = sd.log_abs_density(u, 0.1, per_probe=True)
    assert per.shape == (30, 4001)


def test_breakdown_gives_exact_quadrature():
    # Four distinct eigenvalues: every probe's Lanczos process breaks down after 4 steps and its
    # quadrature is exact: nodes = the eigenvalues, weights = squared projections of the probe.
    # B = H diag(λ) Hᵀ with a Hadamard H / 8, orthogonal and formed without rounding: β_4 is then
    # ~2e-15, far below the breakdown tolerance 100 ε‖B‖ (~5e-14). A Haar Q left β_4 at 2–4e-14
    # from the rounding of Q Λ Qᵀ, so the breakdown hinged on the CPU's rounding (issue 9).
    lam = torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=F64).repeat(16)
    H = torch.tensor(scipy.linalg.hadamard(64), dtype=F64) / 8
    B = (H * lam) @ H.T
    sd = spectral_density(B, num_probes=4, num_steps=20, seed=0)
    assert sd.nodes.shape == (4, 20)
    assert (sd.weights[:, 4:] == 0).all()
    torch.testing.assert_close(
        sd.nodes[:, :4], torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=F64).expand(4, 4)
    )
    # ∫ t dμ_p = v_pᵀ B v_p exactly; averaged over probes it estimates tr(B) / n.
    mean, se = sd.expectation(lambda t: t)
    assert abs(mean - lam.mean().item()) <= 3 * se


def test_partial_reorthogonalization_gives_the_same_quadrature():
    # Semi-orthogonal Lanczos (Simon 1984) gives T_m to working precision, ‖δT‖ ≲ m ε ‖A‖ for m
    # steps: the nodes move by at most that (Weyl), and the smoothed density, e_1ᵀ φ_σ(t - T) e_1,
    # by at most ‖φ_σ'‖∞ ‖δT‖ (φ_σ is Lipschitz). Weights alone are ill-conditioned where nodes
    # are close, so they are compared through the density.
    m, eps, sigma = 80, torch.finfo(F64).eps, 0.1
    full = spectral_density(A, num_probes=6, num_steps=m)
    part = spectral_density(A, num_probes=6, num_steps=m, reorthogonalize="partial")
    dT = m * eps * LAM.abs().max().item()
    assert (full.nodes - part.nodes).abs().max() <= dT
    grid = torch.linspace(-2.0, 22.0, 2001, dtype=F64)
    lipschitz = 1.0 / (sigma**2 * math.sqrt(2 * math.pi * math.e))
    gap = (full.density(grid, sigma) - part.density(grid, sigma)).abs().max()
    assert gap <= lipschitz * dT
