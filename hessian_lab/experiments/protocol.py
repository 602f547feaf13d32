"""The experiment protocol of the paper's comparison, each rule written once.

* **The SGD grid**: :data:`SGD_LEARNING_RATES`, the paper's ``numpy.geomspace(1e-5, 3e-1, 10)``
  (defined in :mod:`hessian_lab.optim.grid_search`; re-exported here).
* **The best grid learning rate**: :func:`best_sgd_runs` — for every configuration that differs
  only in ``lr``, the SGD run with the best final metric, by
  :func:`hessian_lab.optim.grid_search.best_run` (highest accuracy or lowest loss, see
  :func:`metric_mode`; a diverged run, NaN, never wins; ties go to the first run; if every run
  diverged, the first is kept so that the table shows the failure).
* **What a variation is**: one network, data set and training budget on which the optimizers are
  compared — every setting that changes results (:meth:`TrainConfig.results_key`) except the
  optimizer's own (:data:`OPTIMIZER_FIELDS`); see :func:`variation_columns`. A summary table
  averages over :data:`REPLICATE_FIELDS` (the seed) only: runs that differ in any other setting
  (epochs, ``max_train``, batch size, β, ...) land in different rows, never in one mean.
* **When a finished run may be reused**: when its saved configuration has the same
  :meth:`TrainConfig.results_key` as the wanted one (:func:`config_differences`,
  :func:`check_reusable`): the bookkeeping fields (name, folder, device, data location,
  logging) may differ, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hessian_lab.experiments.config import BOOKKEEPING_FIELDS, TrainConfig
from hessian_lab.optim.grid_search import SGD_LEARNING_RATES, best_run

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "OPTIMIZER_FIELDS",
    "REPLICATE_FIELDS",
    "RESULT_FIELDS",
    "SGD_LEARNING_RATES",
    "best_sgd_runs",
    "check_reusable",
    "config_differences",
    "metric_mode",
    "setting_columns",
    "variation_columns",
]

#: Every configuration field that changes results (the columns of a variation and a setting).
RESULT_FIELDS: tuple[str, ...] = tuple(
    key for key in TrainConfig().to_dict() if key not in BOOKKEEPING_FIELDS
)

#: The optimizer's own settings: what differs between the runs compared on one variation.
OPTIMIZER_FIELDS: tuple[str, ...] = ("optimizer", "lr", "beta", "eps", "curvature", "adler_options")

#: What a summary's mean ± std is taken over by default: the seed, nothing else.
REPLICATE_FIELDS: tuple[str, ...] = ("seed",)


def metric_mode(metric: str) -> str:
    """``"min"`` for a loss-like metric (its name contains ``loss``), ``"max"`` otherwise."""
    return "min" if "loss" in metric else "max"


def config_differences(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """The settings in which two configurations differ, as ``"key: saved X, given Y"``.

    Empty when a run made with ``saved`` may be reused (or resumed) for ``wanted``.
    """
    a, b = saved.results_key(), wanted.results_key()
    return [f"{k}: saved {a.get(k)!r}, given {b.get(k)!r}" for k in b if a.get(k) != b[k]]


def check_reusable(run_dir: str | Path, wanted: TrainConfig) -> None:
    """Refuse to reuse or resume the run in ``run_dir`` for a different configuration.

    Nothing happens when ``run_dir`` holds no ``config.json``.

    Raises:
        ValueError: The saved configuration differs; the message lists the differences and the
            ways out.
    """
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return
    diff = config_differences(TrainConfig.load(path), wanted)
    if diff:
        raise ValueError(
            f"cannot reuse or resume {run_dir}: it holds a run with other settings, the "
            f"configuration differs from the saved one ({'; '.join(diff)}); use the same "
            f"settings (or --config {path}), another --name/--out-dir (another output folder "
            "for a sweep), or delete that folder"
        )


def variation_columns(columns: Iterable[str]) -> list[str]:
    """The columns of ``columns`` that define a variation (results fields, not the optimizer's)."""
    present = set(columns)
    return [c for c in RESULT_FIELDS if c not in OPTIMIZER_FIELDS and c in present]


def setting_columns(columns: Iterable[str], over: Sequence[str] = REPLICATE_FIELDS) -> list[str]:
    """The columns that runs sharing a table cell agree on: the results fields not in ``over``."""
    present = set(columns)
    return [c for c in RESULT_FIELDS if c not in over and c in present]


def best_sgd_runs(runs: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """The best grid learning rate: for each SGD configuration up to ``lr``, its best run.

    Args:
        runs: A table of runs (:func:`hessian_lab.experiments.summarize.collect_runs`): a
            ``status`` column, ``metric`` and the configuration fields.
        metric: The final metric that chooses (``test_acc``, ``train_loss``, ...); its
            direction is :func:`metric_mode`.

    Returns:
        The chosen rows of the finished SGD runs, one per group, in the groups' order.
    """
    if metric not in runs.columns:
        raise ValueError(f"unknown metric {metric!r}; available: {', '.join(runs.columns)}")
    sgd = runs[(runs["optimizer"] == "sgd") & (runs["status"] == "finished")].copy()
    if sgd.empty:
        return sgd
    sgd[metric] = sgd[metric].astype(float)
    keys = [c for c in setting_columns(sgd.columns, over=()) if c != "lr"]
    mode = metric_mode(metric)
    picks = []
    for _, group in sgd.groupby(keys, dropna=False, sort=False):
        candidates = {index: {metric: value} for index, value in group[metric].items()}
        try:
            index, _ = best_run(candidates, metric, mode)
        except ValueError:  # every run diverged: keep one so that the failure shows
            index = group.index[0]
        picks.append(index)
    return sgd.loc[picks]
