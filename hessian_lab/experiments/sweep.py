"""Resumable sweeps over a grid of training runs, described by a TOML file.

The paper's study (ADLER §3, ``DESIGN.md`` §3) is a grid over model × activation × width/depth ×
seed × optimizer, with SGD expanded to ten learning rates ``numpy.geomspace(1e-5, 3e-1, 10)``
(the grid search ADLER is compared with). A sweep file::

    name = "digits-demo"          # optional, default: the file's stem
    out_dir = "runs/sweeps/demo"  # optional, default: runs/sweeps/<name>
    workers = 2                   # runs at once (0: one after the other, in this process)
    executor = "pool"             # pool (this machine, default), slurm, submitit-local

    [base]                        # settings shared by every run
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

    [slurm]                       # submitit's parameters, for executor = "slurm"
    timeout_min = 240
    slurm_partition = "gpu"
    gpus_per_node = 1

Keys of ``[base]``/``[grid]`` are the :class:`~hessian_lab.experiments.config.TrainConfig`
fields, plus the built-in models' options (``patch_size``, ``heads``, ``mlp_ratio``,
``last_layer_std``), both derived from the code (:data:`SWEEP_KEYS`). ``model`` and ``dataset``
may be factory references (``"my_models:make_model"``, with ``model_options = {...}``). A grid
value that is a table is merged into the run's configuration, which pairs values (e.g. width
with depth) instead of crossing them (except for the table-valued fields ``model_options``,
``adler_options``, ``dataset_options``, whose grid lists their values). A key goes only to the
runs it applies to: ``patch_size`` to the ViT, ``beta`` to ADLER and GN, ``lr`` to SGD
(identical runs that result are run once); a key that applies to no run at all is an error.

Runs go to ``<out_dir>/runs/<run name>/`` (the name ends with a hash of the configuration).
Re-running the sweep reuses finished runs (after checking that their saved configuration is the
same: :func:`hessian_lab.experiments.protocol.check_reusable`) and resumes interrupted ones
from their last checkpoint. A run that raises is reported with its error (also in
``<run>/error.txt``) and the others go on. All results are gathered in ``<out_dir>/results.csv``.

Executors: ``pool`` runs ``workers`` worker processes on this machine (``spawn``; several GPUs
are shared round robin); ``slurm`` submits one SLURM job per run through submitit
(:mod:`hessian_lab.experiments.cluster`); ``submitit-local`` runs the same submitit code path
as local processes.
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

from hessian_lab.experiments.config import TrainConfig, default_run_name
from hessian_lab.experiments.models import MODEL_OPTIONS
from hessian_lab.experiments.protocol import SGD_LEARNING_RATES, check_reusable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "EXECUTORS",
    "PAPER_SGD_LRS",
    "RESULT_COLUMNS",
    "SWEEP_KEYS",
    "SweepSpec",
    "expand_grid",
    "load_sweep",
    "run_one",
    "run_sweep",
]

#: The paper's SGD grid (:data:`hessian_lab.experiments.protocol.SGD_LEARNING_RATES`).
PAPER_SGD_LRS: tuple[float, ...] = SGD_LEARNING_RATES

#: How runs are executed: on this machine (``pool``), on SLURM, or submitit's local processes.
EXECUTORS: tuple[str, ...] = ("pool", "slurm", "submitit-local")

_CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
#: Fields whose values are tables: a grid of tables lists their values.
_TABLE_FIELDS = {"model_options", "adler_options", "dataset_options"}
_OPTION_KEYS = {key for options in MODEL_OPTIONS.values() for key in options}

#: Every key a sweep's ``[base]`` and ``[grid]`` accept.
SWEEP_KEYS: frozenset[str] = frozenset(_CONFIG_KEYS | _OPTION_KEYS)

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
        workers: Runs at once (``pool``: worker processes, 0 runs everything in the calling
            process; ``submitit-local``: jobs at once; ``slurm``: the job array's parallelism).
        base: Settings shared by every run.
        grid: Lists of values to combine.
        sgd_lrs: Learning rates that each ``optimizer = "sgd"`` grid point expands to.
        executor: ``pool``, ``slurm`` or ``submitit-local``.
        slurm: submitit parameters (``timeout_min``, ``slurm_partition``, ...).
    """

    name: str
    out_dir: str
    workers: int = 1
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    sgd_lrs: tuple[float, ...] = PAPER_SGD_LRS
    executor: str = "pool"
    slurm: dict[str, Any] = field(default_factory=dict)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep TOML file (see the module docstring for its format).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Unknown sections or keys, grid values that are not lists, bad worker count,
            an invalid run configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from err
    allowed = {"name", "out_dir", "workers", "executor", "base", "grid", "sgd", "slurm"}
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
    executor = doc.get("executor", "pool")
    if executor not in EXECUTORS:
        valid = ", ".join(EXECUTORS)
        raise ValueError(f"{path}: executor must be one of {valid}, got {executor!r}")
    grid = doc.get("grid", {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list, got {values!r}")
    sgd = doc.get("sgd", {})
    lrs = tuple(float(x) for x in sgd.get("lrs", PAPER_SGD_LRS))
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"{path}: sgd.lrs must be a non-empty list of positive numbers")
    slurm = doc.get("slurm", {})
    if not isinstance(slurm, dict):
        raise ValueError(f"{path}: [slurm] must be a table of submitit parameters")
    spec = SweepSpec(
        name=name,
        out_dir=str(doc.get("out_dir", Path("runs") / "sweeps" / name)),
        workers=workers,
        base=dict(doc.get("base", {})),
        grid=dict(grid),
        sgd_lrs=lrs,
        executor=executor,
        slurm=dict(slurm),
    )
    expand_grid(spec)  # report configuration errors now, before anything runs
    return spec


def _to_config(values: dict[str, Any], given: set[str]) -> tuple[TrainConfig, set[str]]:
    """The run's configuration, without the given keys that do not apply to it.

    Returns:
        The configuration and the given keys that were applied.
    """
    values = dict(values)
    options = dict(values.pop("model_options", {}))
    extra = {k: values.pop(k) for k in list(values) if k in _OPTION_KEYS and k not in _CONFIG_KEYS}
    unknown = sorted(set(values) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"unknown sweep key(s) {', '.join(unknown)}; valid keys are the TrainConfig fields "
            f"({', '.join(sorted(_CONFIG_KEYS))}) and model options "
            f"({', '.join(sorted(_OPTION_KEYS))})"
        )
    model = values.get("model", TrainConfig.model)
    # Model options apply only to the models that take them (a grid may mix CNNs and ViTs).
    applied_options = {k for k in extra if k in MODEL_OPTIONS.get(model, ())}
    options.update({k: extra[k] for k in applied_options})
    config = TrainConfig(**values, model_options=options)
    dropped = {k for k in config.inapplicable() if k in values and k in given}
    defaults = TrainConfig.defaults()
    for key in dropped:  # e.g. beta for an SGD point of a grid that also has ADLER
        value = defaults[key]
        setattr(config, key, tuple(value) if key == "synthetic_shape" else value)
    applied = (set(values) & given) - dropped | applied_options
    if "model_options" in given:
        applied.add("model_options")
    return config, applied


def _varied_parts(config: TrainConfig, varied: list[str]) -> list[str]:
    """Name parts for the varied fields that the default name does not spell out."""
    named = {"model", "activation", "width", "depth", "dataset", "optimizer", "lr", "curvature"}
    named |= {"seed", "model_options", "adler_options", *_OPTION_KEYS}
    return [f"{key}{getattr(config, key)}" for key in varied if key not in named]


def expand_grid(spec: SweepSpec) -> list[TrainConfig]:
    """All run configurations of the sweep, validated, with names and folders filled in.

    ``optimizer = "sgd"`` points expand over ``spec.sgd_lrs`` unless ``lr`` is set in the grid or
    base. Keys that do not apply to a run are not given to it; identical runs are kept once. Run
    folders are ``<out_dir>/runs/<run name>``.

    Raises:
        ValueError: A configuration is invalid (unknown model, activation, optimizer, ...), a
            key applies to no run, or two different runs would share a name.
    """
    keys = list(spec.grid)

    def pairs(key: str, value: Any) -> bool:  # a table that pairs fields, not a table value
        return isinstance(value, dict) and key not in _TABLE_FIELDS

    varied = sorted(
        {k for key in keys for v in spec.grid[key] for k in (v if pairs(key, v) else [key])}
    )
    given = set(spec.base) | set(varied)
    used: set[str] = set()
    configs: list[TrainConfig] = []
    seen: dict[str, TrainConfig] = {}
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        values = dict(spec.base)
        for key, value in zip(keys, combo, strict=True):
            if pairs(key, value):
                values.update(value)  # a table pairs several fields
            else:
                values[key] = value
        lrs: list[float | None] = [values.get("lr")]
        if values.get("optimizer", TrainConfig.optimizer) == "sgd" and values.get("lr") is None:
            lrs = list(spec.sgd_lrs)
        for lr in lrs:
            run = dict(values, lr=lr)
            try:
                config, applied = _to_config(run, given | {"lr"})
                used |= applied
                derived = not config.name
                config.validate()
                if derived:
                    config.name = default_run_name(config, _varied_parts(config, varied))
            except (TypeError, ValueError) as err:
                raise ValueError(f"sweep {spec.name!r}, run {run}: {err}") from err
            config.out_dir = str(Path(spec.out_dir) / "runs" / config.name)
            previous = seen.get(config.name)
            if previous is not None:
                if previous.results_key() == config.results_key():
                    continue  # the same run twice (e.g. beta varied for SGD points): run it once
                raise ValueError(
                    f"sweep {spec.name!r}: two different runs share the name {config.name!r}; "
                    "do not set name in [base], or vary a field that enters the name"
                )
            seen[config.name] = config
            configs.append(config)
    kinds = {c.optimizer == "sgd" for c in configs}
    if ("lr" in spec.base or "lr" in spec.grid) and kinds == {True, False}:
        raise ValueError(
            f"sweep {spec.name!r}: lr is SGD's learning rate for sgd runs and a multiplier of "
            "η̂ for adler/gn runs; give SGD's rates in [sgd] lrs, and pair an ADLER multiplier "
            'with its optimizer, e.g. grid.opt = [{ optimizer = "adler", lr = 0.5 }, '
            '{ optimizer = "sgd" }]'
        )
    unused = sorted(given - used - {"name", "out_dir"})
    if unused and configs:
        raise ValueError(
            f"sweep {spec.name!r}: {', '.join(unused)} applies to none of the runs (e.g. beta "
            "without optimizer adler/gn, patch_size without model vit); remove it"
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


def run_one(config_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    """Train one run (resuming if possible); never raises, reports errors instead.

    This is what every executor runs, in a worker process, a submitit job or in-process.

    Args:
        config_dict: ``TrainConfig.to_dict()`` of the run.
        threads: torch CPU threads (0: leave torch's setting).

    Returns:
        ``result.json``'s content with ``status = "finished"``, or ``status = "failed"`` and the
        error message (the traceback goes to ``<run>/error.txt``).
    """
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
    executor: str | None = None,
    slurm: dict[str, Any] | None = None,
    on_result: Callable[[TrainConfig, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every configuration of the sweep and write ``<out_dir>/results.csv``.

    Finished runs (with ``result.json`` and the same configuration) are not rerun; interrupted
    runs resume from their last checkpoint; a failing run is recorded with ``status =
    "failed"`` and its error message. Pool worker processes are started with the ``spawn``
    method (safe with threads and CUDA); with several GPUs visible, runs with
    ``device = "auto"`` use their worker's GPU, assigned round robin.

    Args:
        spec: The sweep.
        workers: Override ``spec.workers``.
        executor: Override ``spec.executor`` (``pool``, ``slurm``, ``submitit-local``).
        slurm: More submitit parameters (override ``spec.slurm``).
        on_result: Called in the main process as each run ends (for progress printing).

    Returns:
        One row per run (the rows of ``results.csv``), in grid order.

    Raises:
        ValueError: A run folder holds a run with other settings (nothing is run then), or an
            unknown executor.
        ImportError: ``slurm`` / ``submitit-local`` without submitit.
    """
    configs = expand_grid(spec)
    kind = spec.executor if executor is None else executor
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")
    for config in configs:  # before anything runs: never mix runs of other settings in
        check_reusable(config.out_dir, config)
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_workers = spec.workers if workers is None else workers
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
        result_file = Path(config.out_dir) / "result.json"
        if result_file.exists():
            finish(i, {**json.loads(result_file.read_text()), "status": "finished", "error": ""})
        else:
            pending.append(i)

    if kind != "pool":
        from hessian_lab.experiments.cluster import run_with_submitit

        run_with_submitit(
            kind,
            out_dir / "submitit",
            {**spec.slurm, **(slurm or {})},
            [(i, configs[i].to_dict()) for i in pending],
            finish,
            run_one,
            workers=max(1, n_workers),
            job_name=f"hessian-lab-{spec.name}",
        )
    elif n_workers == 0:
        for i in pending:
            finish(i, run_one(configs[i].to_dict(), 0))
    else:
        _run_pool(configs, pending, finish, n_workers)
    return [_row(configs[i], outcomes[i]) for i in range(len(configs))]


def _run_pool(
    configs: list[TrainConfig],
    pending: list[int],
    finish: Callable[[int, dict[str, Any]], None],
    n_workers: int,
) -> None:
    """Worker processes on this machine; a pool broken by a killed worker is restarted."""
    threads = max(1, (os.cpu_count() or 1) // max(1, n_workers))
    # A worker killed by the OS breaks the whole pool: retry the affected runs in a fresh pool
    # (they resume from their checkpoints); after a few rounds report them as failed.
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
                pool.submit(run_one, configs[i].to_dict(), threads): i for i in pending
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
        finish(i, {"status": "failed", "error": f"worker process died in {rounds} attempts"})
