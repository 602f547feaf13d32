r"""Compare several curvature operators of the same model and data in one tidy table.

For operators ``A, B, ...`` (e.g. the Hessian ``H``, the paper's ``Q`` = generalized Gauss–Newton
and the paper's ``GN`` = empirical Fisher) :func:`compare_operators` measures

* the top-``k`` eigenvalues of each (Lanczos, :func:`~hessian_lab.linalg.eigsh.eigsh`);
* the overlap of their top-``k`` eigenspaces, :math:`\|V_A^\top V_B\|_F^2 / k \in [0, 1]` (1: same
  subspace, ``k/n``: random subspaces; Gur-Ari, Roberts & Dyer 2018), and the principal angles
  :math:`\theta_i = \arccos \sigma_i(V_A^\top V_B)`;
* the relative distance :math:`\|A - B\|_F / \|A\|_F`, estimated with shared Rademacher probes as
  :math:`\sqrt{E\|(A - B) z\|^2 / E\|A z\|^2}` (Hutchinson), with a delta-method standard error;
* Hutchinson traces, from the same probes;
* Rayleigh quotients :math:`d^\top A d / d^\top d` along a direction ``d`` (e.g. the gradient ``G``:
  :math:`G^\top H G`, :math:`G^\top Q G`, :math:`G^\top GN\, G` up to :math:`\|G\|^2`);
* the negative spectral mass (fraction of the stochastic-Lanczos-quadrature weight below zero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from hessian_lab.linalg.eigsh import EigshResult, eigsh
from hessian_lab.linalg.linear_operator import TorchLinearOperator, as_linear_operator
from hessian_lab.linalg.monte_carlo import monte_carlo_estimate
from hessian_lab.linalg.probes import make_generator
from hessian_lab.linalg.spectral_density import SpectralDensity, spectral_density

if TYPE_CHECKING:  # pandas is imported when a table is built, not with the package
    import pandas as pd

__all__ = ["COMPARE_COLUMNS", "compare_operators"]

#: Columns of the table returned by :func:`compare_operators`.
COMPARE_COLUMNS = ["metric", "operator", "other", "index", "value", "standard_error"]


def _ratio_with_se(num: torch.Tensor, den: torch.Tensor) -> tuple[float, float]:
    """``mean(num) / mean(den)`` and its delta-method standard error (shared probes)."""
    p = num.numel()
    r = (num.mean() / den.mean()).item()
    if p < 2:
        return r, math.nan
    # Var(R) ≈ Var(num - R den) / (p mean(den)²) for a ratio of means of paired samples.
    resid = num - r * den
    se = (resid.std() / (math.sqrt(p) * den.mean().abs())).item()
    return r, se


def _resolve_direction(direction: object, ops: Mapping[str, Any], n: int) -> torch.Tensor | None:
    if direction is None:
        return None
    if isinstance(direction, str):
        if direction != "gradient":
            raise ValueError(f"direction must be a tensor, None or 'gradient', got {direction!r}.")
        for op in ops.values():
            if hasattr(op, "gradient"):
                return op.gradient()
        raise ValueError("direction='gradient' needs an operator with a .gradient() method.")
    d = torch.as_tensor(direction).reshape(-1)
    if d.shape[0] != n:
        raise ValueError(f"direction has {d.shape[0]} entries, the operators have size {n}.")
    return d


def compare_operators(
    ops: Mapping[str, object],
    k: int = 10,
    direction: object = None,
    num_probes: int = 30,
    seed: int | None = 0,
    *,
    which: str = "LA",
    eigsh_kwargs: Mapping[str, Any] | None = None,
    slq_probes: int = 5,
    slq_steps: int = 80,
    negative_mass_threshold: float | None = None,
    return_details: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, Any]]:
    r"""Compare operators of the same size: eigenvalues, eigenspaces, distances, curvature.

    Args:
        ops: ``{name: operator}``, at least one; all of the same size ``n``. Any
            linear-operator-like object (``HessianOperator``, ``GGNOperator``, a dense tensor, ...).
        k: Number of top eigenpairs per operator.
        direction: None, a vector ``[n]``, or ``"gradient"`` (the ``gradient()`` of the first
            operator that has one) for the Rayleigh quotients.
        num_probes: Rademacher probes shared by the Frobenius-distance and trace estimates
            (``num_probes`` products per operator). 0 skips both.
        seed: Seed for all random draws (probes, Lanczos start vectors).
        which: Which eigenpairs, as in :func:`~hessian_lab.linalg.eigsh.eigsh` (default ``"LA"``,
            the top of the spectrum).
        eigsh_kwargs: Extra keyword arguments for :func:`~hessian_lab.linalg.eigsh.eigsh`.
        slq_probes: SLQ probes for the negative spectral mass (0 skips it).
        slq_steps: Lanczos steps per SLQ probe.
        negative_mass_threshold: Passed to :meth:`SpectralDensity.negative_mass`.
        return_details: Also return ``{"eigsh": {name: EigshResult}, "density":
            {name: SpectralDensity}}`` so that callers can plot without recomputing.

    Returns:
        A tidy :class:`pandas.DataFrame`, one measurement per row, columns :data:`COMPARE_COLUMNS`:

        ============================  ==========  =======  ========================================
        ``metric``                    ``other``   index    ``value``
        ============================  ==========  =======  ========================================
        ``eigenvalue``                —           rank     ``i``-th wanted eigenvalue (rank 0 = the
                                                           most extreme: largest for ``"LA"``)
        ``eigenvalue_residual``       —           rank     :math:`\|A v_i - \lambda_i v_i\|`
        ``eigenspace_overlap``        B           —        :math:`\|V_A^\top V_B\|_F^2 / k`
        ``principal_angle``           B           i        ``i``-th principal angle (radians,
                                                           ascending) between the eigenspaces
        ``relative_frobenius_distance``  B        —        :math:`\|A - B\|_F / \|A\|_F` (+ s.e.)
        ``trace``                     —           —        Hutchinson :math:`\operatorname{tr} A`
                                                           (+ s.e.)
        ``rayleigh_quotient``         —           —        :math:`d^\top A d / d^\top d`
        ``negative_mass``             —           —        SLQ weight below 0 (+ s.e.)
        ============================  ==========  =======  ========================================

        ``operator`` is the name of ``A``; pairwise metrics have one row per ordered pair (so a
        ``pivot`` gives a full matrix); ``standard_error`` is NaN for deterministic quantities.
        Typical reshapes: ``df[df.metric == "eigenvalue"].pivot(index="index", columns="operator",
        values="value")`` (eigenvalues side by side) and ``df[df.metric ==
        "eigenspace_overlap"].pivot(index="operator", columns="other", values="value")``.
    """
    if not ops:
        raise ValueError("compare_operators needs at least one operator.")
    names = list(ops)
    lin: dict[str, TorchLinearOperator] = {name: as_linear_operator(op) for name, op in ops.items()}
    sizes = {name: A.n for name, A in lin.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"All operators must have the same size, got {sizes}.")
    n = next(iter(sizes.values()))
    device = next(iter(lin.values())).device
    rows: list[dict[str, Any]] = []

    def add(
        metric: str,
        operator: str,
        value: float | torch.Tensor,
        *,
        other: str | None = None,
        index: int | None = None,
        se: float | torch.Tensor = math.nan,
    ) -> None:
        rows.append(
            {
                "metric": metric,
                "operator": operator,
                "other": other,
                "index": index,
                "value": float(value),
                "standard_error": float(se),
            }
        )

    # Top-k eigenpairs of each operator.
    eig: dict[str, EigshResult] = {}
    for name in names:
        kw = {"seed": seed, **(eigsh_kwargs or {})}
        eig[name] = eigsh(lin[name], k=k, which=which, **kw)
        vals = eig[name].eigenvalues.detach().to("cpu", torch.float64)
        res = eig[name].residual_norms.detach().to("cpu", torch.float64)
        if which == "SA":
            order = torch.argsort(vals)
        elif which == "LM":
            order = torch.argsort(vals.abs(), descending=True)
        else:
            order = torch.argsort(vals, descending=True)
        for rank, i in enumerate(order.tolist()):
            add("eigenvalue", name, vals[i], index=rank)
            add("eigenvalue_residual", name, res[i], index=rank)

    # Eigenspace overlaps and principal angles, in float64 on the operators' device.
    for a in names:
        for b in names:
            if a == b:
                continue
            Va = eig[a].eigenvectors.to(torch.float64)
            Vb = eig[b].eigenvectors.to(device=Va.device, dtype=torch.float64)
            M = Va.T @ Vb
            kk = min(Va.shape[1], Vb.shape[1])
            add("eigenspace_overlap", a, (M * M).sum().item() / kk, other=b)
            sv = torch.linalg.svdvals(M).clamp(0.0, 1.0).cpu()
            angles = torch.sort(torch.arccos(sv)).values
            for i, ang in enumerate(angles.tolist()):
                add("principal_angle", a, ang, other=b, index=i)

    # Shared Rademacher probes: traces and relative Frobenius distances, one Monte-Carlo
    # estimate whose integrand stacks zᵀAz, ‖Az‖² and ‖(A - B)z‖² for every operator and pair.
    if num_probes > 0:
        r = len(names)
        pairs = [(i, j) for i in range(r) for j in range(i + 1, r)]

        def integrand(Z: torch.Tensor, *Y: torch.Tensor) -> torch.Tensor:
            rows = [(Z * Ya).sum(dim=0) for Ya in Y] + [(Ya * Ya).sum(dim=0) for Ya in Y]
            rows += [((Y[i] - Y[j]) ** 2).sum(dim=0) for i, j in pairs]
            return torch.stack(rows)

        est = monte_carlo_estimate(
            [lin[name] for name in names],
            integrand,
            num_probes,
            make_generator(device, None if seed is None else seed + 1),
            batch_size=num_probes,
            probe_dtype=torch.float64,
            keep_samples=True,
        )
        samples = est.samples
        distance_row = {}
        for t, (i, j) in enumerate(pairs):
            distance_row[i, j] = distance_row[j, i] = 2 * r + t
        for i, a in enumerate(names):
            add("trace", a, est.mean[i], se=est.standard_error[i])
            for j, b in enumerate(names):
                if i == j:
                    continue
                rel, se_rel = _ratio_with_se(samples[distance_row[i, j]], samples[r + i])
                dist = math.sqrt(max(rel, 0.0))
                # d sqrt(rel) = d rel / (2 sqrt(rel)).
                se = se_rel / (2 * dist) if dist > 0 else math.nan
                add("relative_frobenius_distance", a, dist, other=b, se=se)

    d = _resolve_direction(direction, ops, n)
    if d is not None:
        for name in names:
            A = lin[name]
            dd = d.to(device=A.device, dtype=torch.float64)
            Ad = A.matvec(dd)
            add("rayleigh_quotient", name, (dd @ Ad).item() / (dd @ dd).item())

    dens: dict[str, SpectralDensity] = {}
    if slq_probes > 0:
        for i, name in enumerate(names):
            s = None if seed is None else seed + 2 + i
            dens[name] = spectral_density(
                lin[name], num_probes=slq_probes, num_steps=slq_steps, seed=s
            )
            mass, se = dens[name].negative_mass(negative_mass_threshold)
            add("negative_mass", name, mass, se=se)

    import pandas as pd  # only here: `import hessian_lab` must not import pandas

    df = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    df["index"] = df["index"].astype("Int64")
    if return_details:
        return df, {"eigsh": eig, "density": dens}
    return df
