"""Layer 2: the Hessian Λ of the loss with respect to the network outputs."""

from hessian_lab.output_curvature.autograd_curvature import AutogradCurvature
from hessian_lab.output_curvature.base import OutputCurvature, OutputState
from hessian_lab.output_curvature.closed_forms import (
    BCEWithLogitsCurvature,
    CrossEntropyCurvature,
    MSECurvature,
)
from hessian_lab.output_curvature.factory import (
    loss_reduction,
    mean_denominator,
    output_curvature,
)

__all__ = [
    "AutogradCurvature",
    "BCEWithLogitsCurvature",
    "CrossEntropyCurvature",
    "MSECurvature",
    "OutputCurvature",
    "OutputState",
    "loss_reduction",
    "mean_denominator",
    "output_curvature",
]
