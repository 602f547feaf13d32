"""Gather finished (and unfinished) runs into a table and summarize them like the paper's Table 1.

Table 1 of the paper reports, per model and activation, the final CIFAR-100 test accuracy as
mean ± std over the variations (widths, depths, seeds) for three optimizers: SGD with the best of
its ten learning rates, ADLER and GN. :func:`paper_table` reproduces that from run folders: for
SGD it first keeps, for every configuration, the learning rate with the best final metric; the
rules are those of :mod:`hessian_lab.experiments.protocol`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.protocol import (
    REPLICATE_FIELDS,
    RESULT_FIELDS,
    best_sgd_runs,
    setting_columns,
)
from hessian_lab.experiments.run_folder import RESULT_NAME
from hessian_lab.experiments.run_log import read_jsonl

__all__ = ["collect_runs", "paper_table"]

_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def _find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    found: set[Path] = set()
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if (path / "config.json").is_file():
            found.add(path)
        found.update(p.parent for p in path.rglob("config.json"))
    return sorted(found)


def collect_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run folder found under ``paths`` (a folder holding ``config.json``).

    Columns: ``name``, ``status`` (``finished``, ``failed`` if ``error.txt`` exists, else
    ``incomplete``), ``epoch`` reached, the final ``train_loss``, ``train_acc``, ``test_loss``,
    ``test_acc``, ``best_test_acc``, then the configuration fields (option dicts as JSON text).

    Raises:
        FileNotFoundError: A path does not exist.
    """
    rows: list[dict[str, Any]] = []
    for run_dir in _find_run_dirs(paths):
        config = TrainConfig.load(run_dir / "config.json").to_dict()
        epochs = read_jsonl(run_dir / "epochs.jsonl") if (run_dir / "epochs.jsonl").exists() else []
        last = epochs[-1] if epochs else {}
        if (run_dir / RESULT_NAME).exists():
            status = "finished"
            result = json.loads((run_dir / RESULT_NAME).read_text())
        else:
            status = "failed" if (run_dir / "error.txt").exists() else "incomplete"
            result = {}
        test_accs = [float(r["test_acc"]) for r in epochs]
        row: dict[str, Any] = {
            "name": config["name"],
            "status": status,
            "epoch": last.get("epoch"),
            **{m: float(last[m]) if m in last else None for m in _METRICS},
            "best_test_acc": result.get("best_test_acc", max(test_accs, default=None)),
            "run_dir": str(run_dir),
        }
        config["synthetic_shape"] = "x".join(str(s) for s in config["synthetic_shape"])
        for key, value in config.items():  # dicts as JSON text: table cells must be hashable
            if isinstance(value, dict):
                config[key] = json.dumps(value, sort_keys=True)
        row.update({k: v for k, v in config.items() if k not in row})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["epoch"] = frame["epoch"].astype("Int64")  # integer even where a run has none
    return frame


def paper_table(
    runs: pd.DataFrame,
    metric: str = "test_acc",
    rows: tuple[str, ...] = ("dataset", "model", "activation"),
    over: tuple[str, ...] = REPLICATE_FIELDS,
) -> pd.DataFrame:
    """Mean ± std of the final ``metric`` per ``rows`` × optimizer, as in the paper's Table 1.

    Only finished runs count. SGD runs are first reduced to the best learning rate of each
    configuration (:func:`hessian_lab.experiments.protocol.best_sgd_runs`): the "best result of a
    grid search over ten SGD learning rates". Then the mean and std are taken over the fields
    ``over`` (default: the seed) and nothing else: runs that differ in any other setting (epochs,
    ``max_train``, width, ...) are never averaged together. Such settings become extra row
    columns, listed in ``table.attrs["split"]``.

    Args:
        runs: Output of :func:`collect_runs`.
        metric: A column of ``runs`` (``test_acc``, ``train_loss``, ``best_test_acc``, ...).
        rows: Columns that index the table's rows.
        over: Configuration fields averaged over (the paper: widths, depths and seeds, i.e.
            ``("width", "depth", "seed")``).

    Returns:
        One row per ``rows`` value (and split setting) and optimizer with ``mean``, ``std``
        (sample std, NaN for a single run), ``n`` and ``text`` ("0.268 ± 0.007").
    """
    if runs.empty:
        return pd.DataFrame(columns=[*rows, "optimizer", "mean", "std", "n", "text"])
    if metric not in runs.columns:
        raise ValueError(f"unknown metric {metric!r}; available: {', '.join(runs.columns)}")
    unknown = sorted(set(over) - set(RESULT_FIELDS))
    if unknown:
        raise ValueError(
            f"cannot average over {', '.join(unknown)}: not a setting that changes results; "
            f"choose among {', '.join(RESULT_FIELDS)}"
        )
    done = runs[runs["status"] == "finished"].copy()
    done[metric] = done[metric].astype(float)
    table = pd.concat(
        [done[done["optimizer"] != "sgd"], best_sgd_runs(done, metric)], ignore_index=True
    )
    if table.empty:
        return pd.DataFrame(columns=[*rows, "optimizer", "mean", "std", "n", "text"])
    # SGD's lr was optimized over: it is no longer a setting of the cell.
    table.loc[table["optimizer"] == "sgd", "lr"] = None
    settings = [c for c in setting_columns(table.columns, over) if c not in (*rows, "optimizer")]
    # A setting splits the rows only where it varies within one row (model_options, say, is
    # constant per model and need not be shown).
    cells = table[[*rows, "optimizer"]].map(_cell)
    split = [
        c
        for c in settings
        if table[c].map(_cell).groupby([cells[k] for k in cells]).nunique().max() > 1
    ]
    keys = [*rows, *split]
    grouped = table.groupby([*keys, "optimizer"], dropna=False)[metric]
    out = grouped.agg(["mean", "std", "count"]).rename(columns={"count": "n"}).reset_index()
    out["text"] = [
        f"{m:.3f} ± {s:.3f}" if pd.notna(s) else f"{m:.3f}"
        for m, s in zip(out["mean"], out["std"], strict=True)
    ]
    out.attrs["split"] = split
    return out


def _cell(value: Any) -> str:
    """A comparable text for a table cell: missing values (None, NaN) are one value."""
    if value is None or (isinstance(value, float) and value != value):
        return "<unset>"
    return str(value)
