"""Layer 4: matrix-free linear algebra on curvature operators.

Every routine takes anything with ``shape``, ``dtype``, ``device`` and a product (our operators, a
dense tensor, a numpy array, a scipy ``LinearOperator``) and runs on the operator's device.
"""

from hessian_lab.linalg.cg import CGInfo, cg
from hessian_lab.linalg.compare import COMPARE_COLUMNS, compare_operators
from hessian_lab.linalg.diagonal import DiagonalEstimate, hutchinson_diagonal
from hessian_lab.linalg.eigsh import EigshResult, eigsh
from hessian_lab.linalg.lanczos import LanczosResult, lanczos
from hessian_lab.linalg.linear_operator import TorchLinearOperator, as_linear_operator
from hessian_lab.linalg.monte_carlo import MonteCarloEstimate, monte_carlo_estimate
from hessian_lab.linalg.spectral_density import SpectralDensity, spectral_density
from hessian_lab.linalg.trace import (
    TraceEstimate,
    hutchinson_squared_frobenius_norm,
    hutchinson_trace,
    hutchpp_trace,
)

__all__ = [
    "COMPARE_COLUMNS",
    "CGInfo",
    "DiagonalEstimate",
    "EigshResult",
    "LanczosResult",
    "MonteCarloEstimate",
    "SpectralDensity",
    "TorchLinearOperator",
    "TraceEstimate",
    "as_linear_operator",
    "cg",
    "compare_operators",
    "eigsh",
    "hutchinson_diagonal",
    "hutchinson_squared_frobenius_norm",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "monte_carlo_estimate",
    "spectral_density",
]
