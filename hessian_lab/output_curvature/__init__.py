"""Layer 2: output-space matrices (Λ for Q, gradient outer products for GN), one loss reduction."""

from hessian_lab.output_curvature.autograd_curvature import AutogradCurvature
from hessian_lab.output_curvature.base import OutputCurvature, OutputState, sum_per_tangent
from hessian_lab.output_curvature.closed_forms import (
    BCEWithLogitsCurvature,
    CrossEntropyCurvature,
    MSECurvature,
)
from hessian_lab.output_curvature.factory import gradient_outer_product, output_curvature
from hessian_lab.output_curvature.gradient_outer_product import GradientOuterProduct
from hessian_lab.output_curvature.reduction import REDUCTIONS, LossReduction, check_scalar

__all__ = [
    "AutogradCurvature",
    "BCEWithLogitsCurvature",
    "CrossEntropyCurvature",
    "GradientOuterProduct",
    "LossReduction",
    "MSECurvature",
    "OutputCurvature",
    "OutputState",
    "REDUCTIONS",
    "check_scalar",
    "gradient_outer_product",
    "output_curvature",
    "sum_per_tangent",
]
