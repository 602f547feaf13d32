"""The paper's baseline: plain SGD with the best of ten learning rates (ADLER §3, footnote 14).

The grid is ``numpy.geomspace(1e-5, 3e-1, 10)``, ten rates evenly spaced in log scale. The best run
is picked by a named metric with an explicit direction (``"max"`` for an accuracy, ``"min"`` for a
loss); a run whose metric is missing or NaN (a diverged run) never wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("max", "min")


def sgd_learning_rates(low: float = 1e-5, high: float = 3e-1, num: int = 10) -> list[float]:
    """The paper's grid ``numpy.geomspace(low, high, num)`` as Python floats."""
    return [float(lr) for lr in np.geomspace(low, high, num)]


#: The paper's ten SGD learning rates, 1e-5 … 3e-1 in log scale.
SGD_LEARNING_RATES: tuple[float, ...] = tuple(sgd_learning_rates())


def _score(run: Mapping[str, Any], metric: str) -> float:
    if metric not in run:
        raise KeyError(f"Metric {metric!r} not in a run's results {sorted(run)}.")
    value = float(run[metric])
    return value if math.isfinite(value) else math.nan


def best_run(
    runs: Mapping[Hashable, Mapping[str, Any]], metric: str, mode: str
) -> tuple[Hashable, Mapping[str, Any]]:
    """The run with the best ``metric``.

    Args:
        runs: ``key -> {metric name: value}``, e.g. keyed by learning rate.
        metric: The metric to compare, e.g. ``"test_accuracy"`` or ``"train_loss"``.
        mode: ``"max"`` (accuracy-like) or ``"min"`` (loss-like); explicit on purpose.

    Returns:
        (key, results) of the best run; ties go to the first in ``runs``' order.

    Raises:
        ValueError: Unknown mode, no runs, or every run's metric is NaN/infinite.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}: say whether higher is better.")
    if not runs:
        raise ValueError("No runs to choose from.")
    best_key, best_value = None, math.nan
    for key, run in runs.items():
        value = _score(run, metric)
        if math.isnan(value):
            continue
        better = value > best_value if mode == "max" else value < best_value
        if best_key is None or better:
            best_key, best_value = key, value
    if best_key is None:
        raise ValueError(f"Every run has a NaN or infinite {metric!r}: all runs diverged.")
    return best_key, runs[best_key]


@dataclass
class GridSearchResult:
    """Outcome of :func:`grid_search`.

    Attributes:
        best_lr: The winning learning rate.
        best: Its results.
        runs: ``learning rate -> results`` for every rate tried.
        metric: The metric compared.
        mode: ``"max"`` or ``"min"``.
    """

    best_lr: float
    best: Mapping[str, Any]
    runs: dict[float, Mapping[str, Any]]
    metric: str
    mode: str


def grid_search(
    train: Callable[[float], Mapping[str, Any]],
    metric: str,
    mode: str,
    learning_rates: list[float] | tuple[float, ...] | None = None,
) -> GridSearchResult:
    """Run ``train(lr)`` for every rate of the grid and pick the best by ``metric``.

    Args:
        train: Trains a fresh model with plain SGD at rate ``lr`` and returns its metrics.
        metric: Name of the metric to compare.
        mode: ``"max"`` or ``"min"``.
        learning_rates: The grid; default the paper's :data:`SGD_LEARNING_RATES`.

    Example:
        >>> result = grid_search(lambda lr: {"loss": (lr - 1e-2) ** 2}, "loss", "min")
        >>> f"{result.best_lr:.3g}"
        '0.00965'
    """
    if mode not in MODES:  # fail before any training
        raise ValueError(f"mode={mode!r} is not one of {MODES}: say whether higher is better.")
    rates = SGD_LEARNING_RATES if learning_rates is None else tuple(learning_rates)
    runs = {float(lr): train(float(lr)) for lr in rates}
    best_lr, best = best_run(runs, metric, mode)
    return GridSearchResult(float(best_lr), best, runs, metric, mode)  # type: ignore[arg-type]
