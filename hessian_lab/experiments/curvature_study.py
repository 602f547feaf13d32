"""Helpers of the curvature studies in ``analyses/``: the three operators, and density tables.

The analyses compare the exact Hessian **H**, the paper's PSD approximation **Q** (the
generalized Gauss–Newton matrix) and the paper's **GN** baseline (the per-example empirical
Fisher) on one fixed batch. :func:`make_operators` builds the three with the names used in every
table and figure; :func:`density_table` turns the spectral densities of
:func:`hessian_lab.linalg.compare_operators` into a table on a symmetric-log eigenvalue axis;
:func:`digits_cnn` builds the studies' network and data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from hessian_lab.linalg import SpectralDensity
from hessian_lab.operators import EmpiricalFisherOperator, GGNOperator, HessianOperator

if TYPE_CHECKING:
    from hessian_lab.experiments.training import RunSetup

__all__ = [
    "OPERATOR_COLORS",
    "OPERATOR_LABELS",
    "density_table",
    "digits_cnn",
    "make_operators",
    "symlog",
    "symlog_inverse",
]

#: Names and labels of the three operators, in table order.
OPERATOR_LABELS: dict[str, str] = {"H": "H (Hessian)", "Q": "Q (GGN)", "GN": "GN (emp. Fisher)"}

#: One colour per operator, the same in every figure.
OPERATOR_COLORS: dict[str, str] = {"H": "#d62728", "Q": "#1f77b4", "GN": "#2ca02c"}


def make_operators(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], loss_fn: nn.Module | None = None
) -> dict[str, Any]:
    """``{"H": HessianOperator, "Q": GGNOperator, "GN": EmpiricalFisherOperator}`` on ``data``.

    Args:
        model: The network (in eval mode).
        data: One batch ``(inputs, targets)``.
        loss_fn: The loss (default ``nn.CrossEntropyLoss()``, mean reduction).
    """
    loss = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    return {
        "H": HessianOperator(model, loss, data),
        "Q": GGNOperator(model, loss, data),
        "GN": EmpiricalFisherOperator(model, loss, data),
    }


def digits_cnn(args: Any) -> RunSetup:
    """The studies' setup: a ``cnn`` on digits (split seed 0) with ADLER, the paper's defaults.

    Through :func:`hessian_lab.experiments.training.setup_run`, the same construction as
    ``hessian-lab train``: the model drawn from ``torch.manual_seed(seed)``, in ``args.dtype``,
    in eval mode (no batch norm or dropout: the same function; the operators require eval).

    Args:
        args: The analysis' options (an ``argparse.Namespace``): ``activation``, ``width``,
            ``depth``, ``batch_size``, ``seed``, ``device`` and ``dtype`` (a torch dtype's name).
    """
    # Imported here: the operators and density tables do not need the training machinery.
    from hessian_lab.experiments.config import TrainConfig
    from hessian_lab.experiments.training import setup_run

    config = TrainConfig(
        model="cnn",
        activation=args.activation,
        width=args.width,
        depth=args.depth,
        dataset="digits",
        optimizer="adler",
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    setup = setup_run(config, dtype=getattr(torch, args.dtype))
    setup.model.eval()
    return setup


def symlog(x: np.ndarray | torch.Tensor, c: float) -> Any:
    """The symmetric-log coordinate ``u = sign(λ) log10(1 + |λ| / c)`` (linear for ``|λ| ≪ c``)."""
    lib = torch if isinstance(x, torch.Tensor) else np
    return lib.sign(x) * lib.log10(1 + lib.abs(x) / c)


def symlog_inverse(u: np.ndarray, c: float) -> np.ndarray:
    """``λ`` from the symmetric-log coordinate ``u``."""
    return np.sign(u) * c * (10 ** np.abs(u) - 1)


def density_table(
    details: dict[str, Any], phase: Any, c: float, sigma_u: float, lim: float
) -> pd.DataFrame:
    """SLQ densities of the symlog coordinate ``u`` of the eigenvalues.

    Each Ritz node θ is mapped to ``u(θ)`` and smoothed there with a Gaussian of standard deviation
    ``sigma_u`` (in decades of ``1 + |λ|/c``): every decade of the spectrum gets the same
    resolution, as in Papyan's (2020) log-scale densities, and the region ``|λ| < c`` around zero
    stays linear. The density is per unit of ``u`` and integrates to 1 over ``u``.

    Args:
        details: The ``details`` of ``compare_operators(..., return_details=True)``.
        phase: A label for the ``phase`` column (a phase name, a step).
        c: The linear threshold of the symlog axis.
        sigma_u: Smoothing standard deviation in ``u``.
        lim: The grid covers ``[-lim, lim]`` in eigenvalue.

    Returns:
        Columns ``phase``, ``operator``, ``eigenvalue``, ``u``, ``density``, ``se``.
    """
    u_lim = float(symlog(np.array(lim), c))
    u = np.linspace(-u_lim, u_lim, 1500)
    rows = []
    for name, sd in details["density"].items():
        in_u = SpectralDensity(symlog(sd.nodes, c), sd.weights, sd.n, sd.op_dtype)
        rows.append(
            pd.DataFrame(
                {
                    "phase": phase,
                    "operator": name,
                    "eigenvalue": symlog_inverse(u, c),
                    "u": u,
                    "density": in_u.density(u, sigma_u).numpy(),
                    "se": in_u.density_standard_error(u, sigma_u).numpy(),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)
