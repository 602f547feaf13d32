"""Parallel, resumable sweeps over a grid of training runs, described by a TOML file.

The paper's study (ADLER §3, ``DESIGN.md`` §3) is a grid over model × activation × width/depth ×
seed × optimizer, with SGD expanded to ten learning rates ``numpy.geomspace(1e-5, 3e-1, 10)``
(the grid search ADLER is compared with). A sweep file::

    name = "digits-demo"          # optional, default: the file's stem
    out_dir = "runs/sweeps/demo"  # optional, default: runs/sweeps/<name>
    workers = 2                   # parallel worker processes (0: run in this process)

    [base]                        # TrainConfig fields shared by every run
    dataset = "digits"
    epochs = 3

    [grid]                        # lists; every combination is one run
    model = ["cnn", "rescnn"]
    activation = ["relu", "tanh"]
    arch = [{ width = 8, depth = 1 }, { width = 16, depth = 2 }]   # tables are merged in
    seed = [0, 1]
    optimizer = ["adler", "gn", "sgd"]

    [sgd]
    lrs = [0.01, 0.1]             # optional, default: the paper's ten learning rates

Keys of ``[base]``/``[grid]`` are :class:`~hessian_lab.experiments.config.TrainConfig` fields, plus
the model options (``patch_size``, ``heads``, ``mlp_ratio``, ``last_layer_std``) which are given to
the models that take them. A grid value that is a table is merged into the run's configuration,
which pairs values (e.g. width with depth) instead of crossing them.

Runs go to ``<out_dir>/runs/<run name>/``. Re-running the sweep skips finished runs and resumes
interrupted ones from their last checkpoint. A run that raises is reported with its error (also in
``<run>/error.txt``) and the others go on. All results are gathered in ``<out_dir>/results.csv``.
"""

from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from hessian_lab.experiments.config import TrainConfig, default_run_name
from hessian_lab.experiments.models import MODEL_OPTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "PAPER_SGD_LRS",
    "SweepSpec",
    "expand_grid",
    "load_sweep",
    "run_sweep",
]

#: The paper's SGD grid: ten learning rates log-spaced from 1e-5 to 3e-1.
PAPER_SGD_LRS: tuple[float, ...] = tuple(float(x) for x in np.geomspace(1e-5, 3e-1, 10))

_CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
_OPTION_KEYS = {key for options in MODEL_OPTIONS.values() for key in options}

#: Columns first in ``results.csv``; the remaining configuration fields follow.
RESULT_COLUMNS: tuple[str, ...] = (
    "name",
    "status",
    "error",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "best_test_acc",
    "steps",
    "train_time_s",
    "out_dir",
)


@dataclass
class SweepSpec:
    """A parsed sweep file.

    Attributes:
        name: Sweep name.
        out_dir: Folder of the sweep (runs in ``<out_dir>/runs``, table in ``results.csv``).
        workers: Number of worker processes; 0 runs everything in the calling process.
        base: Settings shared by every run.
        grid: Lists of values to combine.
        sgd_lrs: Learning rates that each ``optimizer = "sgd"`` grid point expands to.
    """

    name: str
    out_dir: str
    workers: int = 1
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    sgd_lrs: tuple[float, ...] = PAPER_SGD_LRS


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep TOML file (see the module docstring for its format).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Unknown sections or keys, grid values that are not lists, bad worker count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from err
    allowed = {"name", "out_dir", "workers", "base", "grid", "sgd"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ValueError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(allowed))}"
        )
    name = str(doc.get("name", path.stem))
    workers = doc.get("workers", 1)
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"{path}: workers must be an integer >= 0, got {workers!r}")
    grid = doc.get("grid", {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list, got {values!r}")
    sgd = doc.get("sgd", {})
    lrs = tuple(float(x) for x in sgd.get("lrs", PAPER_SGD_LRS))
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"{path}: sgd.lrs must be a non-empty list of positive numbers")
    spec = SweepSpec(
        name=name,
        out_dir=str(doc.get("out_dir", Path("runs") / "sweeps" / name)),
        workers=workers,
        base=dict(doc.get("base", {})),
        grid=dict(grid),
        sgd_lrs=lrs,
    )
    expand_grid(spec)  # report configuration errors now, before anything runs
    return spec


def _to_config(values: dict[str, Any]) -> TrainConfig:
    values = dict(values)
    options = dict(values.pop("model_options", {}))
    extra = {k: values.pop(k) for k in list(values) if k in _OPTION_KEYS}
    unknown = sorted(set(values) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"unknown sweep key(s) {', '.join(unknown)}; valid keys are the TrainConfig fields "
            f"({', '.join(sorted(_CONFIG_KEYS))}) and model options "
            f"({', '.join(sorted(_OPTION_KEYS))})"
        )
    model = values.get("model", TrainConfig.model)
    # Model options apply only to the models that take them (a grid may mix CNNs and ViTs).
    options.update({k: v for k, v in extra.items() if k in MODEL_OPTIONS.get(model, ())})
    return TrainConfig(**values, model_options=options)


#: Fields that :func:`default_run_name` already spells out.
_NAMED_FIELDS = {"model", "activation", "width", "depth", "dataset", "optimizer", "lr", "curvature"}
_NAMED_FIELDS |= {"seed", "model_options", *_OPTION_KEYS}


def _run_name(config: TrainConfig, varied: list[str]) -> str:
    """Default run name plus every other varied field (e.g. ``-batch_size32``)."""
    extra = [f"{key}{getattr(config, key)}" for key in varied if key not in _NAMED_FIELDS]
    return "-".join([default_run_name(config), *extra])


def expand_grid(spec: SweepSpec) -> list[TrainConfig]:
    """All run configurations of the sweep, validated, with names and folders filled in.

    ``optimizer = "sgd"`` points expand over ``spec.sgd_lrs`` unless ``lr`` is set in the grid or
    base. Run folders are ``<out_dir>/runs/<run name>``.

    Raises:
        ValueError: A configuration is invalid (unknown model, activation, optimizer, ...) or two
            grid points give the same run name.
    """
    keys = list(spec.grid)
    varied = sorted(
        {k for key in keys for v in spec.grid[key] for k in (v if isinstance(v, dict) else [key])}
    )
    configs: list[TrainConfig] = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        values = dict(spec.base)
        for key, value in zip(keys, combo, strict=True):
            if isinstance(value, dict):
                values.update(value)  # a table pairs several fields
            else:
                values[key] = value
        lrs: list[float | None] = [values.get("lr")]
        if values.get("optimizer", TrainConfig.optimizer) == "sgd" and values.get("lr") is None:
            lrs = list(spec.sgd_lrs)
        for lr in lrs:
            run = dict(values, lr=lr)
            try:
                config = _to_config(run)
                if not config.name:
                    config.name = _run_name(config, varied)
                config.validate()
            except (TypeError, ValueError) as err:
                raise ValueError(f"sweep {spec.name!r}, run {run}: {err}") from err
            config.out_dir = str(Path(spec.out_dir) / "runs" / config.name)
            configs.append(config)
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"sweep {spec.name!r}: grid points share run names {duplicates}; "
            "vary a field that enters the name, or set distinct names"
        )
    return configs


#: Device of this worker process when the sweep spreads workers over several GPUs.
_WORKER_DEVICE: str | None = None


def _init_worker(counter: Any) -> None:
    """Give each worker process its own GPU, round robin, when more than one is visible."""
    global _WORKER_DEVICE
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        _WORKER_DEVICE = f"cuda:{index % torch.cuda.device_count()}"


def _run_one(config_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    """Worker: train one run (resuming if possible); never raises, reports errors instead."""
    import torch

    from hessian_lab.experiments.training import train

    if threads > 0:
        torch.set_num_threads(threads)  # avoid oversubscribing cores across workers
    config = TrainConfig.from_dict(config_dict)
    if config.device == "auto" and _WORKER_DEVICE is not None:
        config.device = _WORKER_DEVICE  # the device does not enter the results: resume still works
    error_file = Path(config.out_dir) / "error.txt"
    try:
        result = train(config, resume=True, progress=False)
        error_file.unlink(missing_ok=True)
        return {**result, "status": "finished", "error": ""}
    except Exception as err:  # noqa: BLE001 - one failing run must not stop the sweep
        message = f"{type(err).__name__}: {err}"
        error_file.parent.mkdir(parents=True, exist_ok=True)
        error_file.write_text(traceback.format_exc())
        if not (error_file.parent / "config.json").exists():
            config.save(error_file.parent / "config.json")  # so `summarize` lists the failure
        return {
            "name": config.name,
            "out_dir": config.out_dir,
            "status": "failed",
            "error": message,
        }


def _row(config: TrainConfig, outcome: dict[str, Any]) -> dict[str, Any]:
    row = {key: outcome.get(key, "") for key in RESULT_COLUMNS}
    row["name"], row["out_dir"] = config.name, config.out_dir
    for key, value in config.to_dict().items():
        if key not in row:
            # Option dicts and shapes as JSON text, readable back with json.loads.
            row[key] = (
                json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
            )
    return row


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_sweep(
    spec: SweepSpec,
    *,
    workers: int | None = None,
    on_result: Callable[[TrainConfig, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every configuration of the sweep and write ``<out_dir>/results.csv``.

    Finished runs (with ``result.json``) are not rerun; interrupted runs resume from their last
    checkpoint; a failing run is recorded with ``status = "failed"`` and its error message. Worker
    processes are started with the ``spawn`` method (safe with threads and CUDA). With several
    GPUs visible, runs with ``device = "auto"`` use their worker's GPU, assigned round robin.

    Args:
        spec: The sweep.
        workers: Override ``spec.workers``.
        on_result: Called in the main process as each run ends (for progress printing).

    Returns:
        One row per run (the rows of ``results.csv``), in grid order.
    """
    from hessian_lab.experiments.training import RESULT_NAME

    configs = expand_grid(spec)
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_workers = spec.workers if workers is None else workers
    threads = max(1, (os.cpu_count() or 1) // max(1, n_workers))
    outcomes: dict[int, dict[str, Any]] = {}

    def finish(i: int, outcome: dict[str, Any]) -> None:
        outcomes[i] = outcome
        if on_result is not None:
            on_result(configs[i], outcome)
        _write_table(
            out_dir / "results.csv", [_row(configs[j], outcomes[j]) for j in sorted(outcomes)]
        )

    pending = []
    for i, config in enumerate(configs):
        result_file = Path(config.out_dir) / RESULT_NAME
        if result_file.exists():
            finish(i, {**json.loads(result_file.read_text()), "status": "finished", "error": ""})
        else:
            pending.append(i)

    if n_workers == 0:
        for i in pending:
            finish(i, _run_one(configs[i].to_dict(), 0))
    else:
        # A worker killed by the OS breaks the whole pool: retry the affected runs in a fresh
        # pool (they resume from their checkpoints); after a few rounds report them as failed.
        rounds = 3
        for _ in range(rounds):
            broken: list[int] = []
            context = multiprocessing.get_context("spawn")
            counter = context.Value("i", 0)
            with ProcessPoolExecutor(
                max_workers=n_workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(counter,),
            ) as pool:
                futures: dict[Future, int] = {
                    pool.submit(_run_one, configs[i].to_dict(), threads): i for i in pending
                }
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        finish(i, future.result())
                    except BrokenProcessPool:
                        broken.append(i)
            pending = broken
            if not pending:
                break
        for i in pending:
            finish(
                i,
                {"status": "failed", "error": f"worker process died in {rounds} attempts"},
            )
    return [_row(configs[i], outcomes[i]) for i in range(len(configs))]
