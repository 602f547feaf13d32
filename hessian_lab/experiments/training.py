"""The training loop: minibatch steps, per-step and per-epoch logs, checkpoints, resume.

A run lives in one folder (``config.out_dir``)::

    config.json      the full TrainConfig
    steps.jsonl/csv  one record per step: epoch, step, loss, eta (η_k), eta_hat (η̂_k), ...
    epochs.jsonl/csv one record per epoch (epoch 0 = initialization): train loss/accuracy on the
                     whole training set, test loss/accuracy, last η̂, cumulative training time
    checkpoint.pt    after every epoch, written atomically (temporary file + rename)
    result.json      final metrics; its presence marks the run as finished

Determinism: the model is initialized from ``torch.manual_seed(seed)``, the data order comes from
a separate ``torch.Generator`` seeded with ``seed`` whose state is checkpointed together with the
model, the optimizer state (ADLER's running averages s_k, c_k) and the global RNG state. Resuming
a run killed at any point (SIGKILL included) restarts from the last completed epoch, cuts the logs
back to that point, and on CPU reproduces the uninterrupted run's numbers exactly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hessian_lab.experiments.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
)
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.datasets import ImageData, load_dataset
from hessian_lab.experiments.evaluate import evaluate
from hessian_lab.experiments.models import build_model
from hessian_lab.experiments.optimizers import build_optimizer
from hessian_lab.experiments.run_log import MetricLog

__all__ = ["EPOCH_COLUMNS", "RESULT_NAME", "load_data", "resolve_device", "train"]

#: Columns of the per-epoch log.
EPOCH_COLUMNS: tuple[str, ...] = (
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "eta_hat",
    "time_s",
)

#: File marking a finished run.
RESULT_NAME = "result.json"

_RUN_FILES = (
    "config.json",
    "steps.jsonl",
    "steps.csv",
    "epochs.jsonl",
    "epochs.csv",
    CHECKPOINT_NAME,
    RESULT_NAME,
)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; other names are passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'"
        )
    return device


def load_data(config: TrainConfig) -> ImageData:
    """Load the data set named by ``config`` (with its subset limits)."""
    return load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        download=config.download,
        split_seed=config.split_seed,
        max_train=config.max_train,
        max_test=config.max_test,
        in_shape=config.synthetic_shape,
        num_classes=config.synthetic_classes,
    )


def _check_resumable(saved: TrainConfig, given: TrainConfig, run_dir: Path) -> None:
    a, b = saved.results_key(), given.results_key()
    diff = [f"{k}: saved {a[k]!r}, given {b[k]!r}" for k in a if a[k] != b.get(k)]
    if diff:
        raise ValueError(
            f"cannot resume {run_dir}: the configuration differs from the saved one "
            f"({'; '.join(diff)}); use the same options (or --config {run_dir}/config.json), "
            "or another --name/--out-dir"
        )


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one model as configured; log, checkpoint every epoch, and return the final metrics.

    Args:
        config: The run's configuration (validated here; not modified).
        resume: Continue the run in ``config.out_dir`` from its last checkpoint; a finished run is
            returned as is; a folder without checkpoint starts from scratch.
        overwrite: Delete an existing run in ``config.out_dir`` and start again.
        progress: Show a tqdm progress bar (on stderr).

    Returns:
        The content of ``result.json``: name, folder, final and best metrics, steps, wall time.

    Raises:
        ValueError: Invalid configuration, or ``resume`` with a different configuration.
        FileExistsError: ``out_dir`` already holds a run and neither ``resume`` nor
            ``overwrite`` was given.
        FileNotFoundError: Missing data files.
    """
    config = copy.deepcopy(config).validate()
    run_dir = Path(config.out_dir)
    ckpt_path = run_dir / CHECKPOINT_NAME
    existing = (run_dir / "config.json").exists()
    if existing and overwrite:
        for name in _RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        existing = False
    if existing and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume (CLI: --resume) to continue it, "
            "overwrite (--overwrite) to start again, or choose another --name/--out-dir"
        )
    if existing:
        _check_resumable(TrainConfig.load(run_dir / "config.json"), config, run_dir)
        if (run_dir / RESULT_NAME).exists():
            return json.loads((run_dir / RESULT_NAME).read_text())

    device = resolve_device(config.device)
    data = load_data(config)
    torch.manual_seed(config.seed)  # model initialization
    model = build_model(
        config.model,
        activation=config.activation,
        in_shape=data.in_shape,
        num_classes=data.num_classes,
        width=config.width,
        depth=config.depth,
        **config.model_options,
    ).to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = build_optimizer(config, model, loss_fn)
    order = torch.Generator().manual_seed(config.seed)  # data order, CPU for reproducibility

    train_x, train_y = data.train_inputs.to(device), data.train_targets.to(device)
    test_x, test_y = data.test_inputs.to(device), data.test_targets.to(device)
    n_train = len(train_y)
    steps_per_epoch = math.ceil(n_train / config.batch_size)

    run_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, step, elapsed, best_test_acc = 0, 0, 0.0, -1.0
    if existing and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order.set_state(state["order_rng"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        for stem, sizes in state["log_sizes"].items():
            MetricLog.truncate(run_dir, stem, sizes)  # drop records written after the checkpoint
        start_epoch, step = state["epoch"] + 1, state["step"]
        elapsed, best_test_acc = state["elapsed"], state["best_test_acc"]
    else:
        for name in _RUN_FILES:  # leftovers of a run killed before its first checkpoint
            (run_dir / name).unlink(missing_ok=True)
        config.save(run_dir / "config.json")

    step_log = MetricLog(run_dir, "steps", ("epoch", "step", *optimizer.columns))
    epoch_log = MetricLog(run_dir, "epochs", EPOCH_COLUMNS)
    record: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            t0 = time.perf_counter()
            eta_hat = None
            if epoch > 0:
                perm = torch.randperm(n_train, generator=order).to(device)
                bar = tqdm(
                    total=steps_per_epoch,
                    desc=f"{config.name} epoch {epoch}/{config.epochs}",
                    disable=not progress,
                    leave=False,
                    dynamic_ncols=True,
                )
                for start in range(0, n_train, config.batch_size):
                    idx = perm[start : start + config.batch_size]
                    out = _train_step(optimizer, train_x[idx], train_y[idx])
                    step += 1
                    eta_hat = out["eta_hat"]
                    if step % config.log_every == 0:
                        step_log.write({"epoch": epoch, "step": step, **out})
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", eta_hat=f"{eta_hat:.3g}")
                bar.close()
            elapsed += time.perf_counter() - t0  # training time only, not evaluation
            train_loss, train_acc = evaluate(
                model, loss_fn, train_x, train_y, config.eval_batch_size
            )
            test_loss, test_acc = evaluate(model, loss_fn, test_x, test_y, config.eval_batch_size)
            best_test_acc = max(best_test_acc, test_acc)
            record = {
                "epoch": epoch,
                "step": step,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "eta_hat": eta_hat,
                "time_s": round(elapsed, 3),
            }
            epoch_log.write(record)
            if progress:
                tqdm.write(
                    f"{config.name} epoch {epoch}: train loss {train_loss:.4f} "
                    f"acc {train_acc:.3f} | test loss {test_loss:.4f} acc {test_acc:.3f}"
                )
            save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "order_rng": order.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "step": step,
                    "elapsed": elapsed,
                    "best_test_acc": best_test_acc,
                    "log_sizes": {"steps": step_log.sizes(), "epochs": epoch_log.sizes()},
                    "config": config.to_dict(),
                },
            )
    finally:
        step_log.close()
        epoch_log.close()

    if not record:  # resumed after the last epoch's checkpoint but before result.json
        record = _last_epoch_record(run_dir)
    result = {
        "name": config.name,
        "out_dir": str(run_dir),
        "status": "finished",
        "epochs": config.epochs,
        "steps": record["step"],
        "train_loss": record["train_loss"],
        "train_acc": record["train_acc"],
        "test_loss": record["test_loss"],
        "test_acc": record["test_acc"],
        "best_test_acc": best_test_acc,
        "train_time_s": record["time_s"],
        "device": str(device),
    }
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_bytes(run_dir / RESULT_NAME, lambda f: f.write(text.encode()))
    return result


def _train_step(
    optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, float | int]:
    """One optimizer step; tensors are converted to Python numbers for the logs (one sync)."""
    out = optimizer.step(inputs, targets)
    values = torch.stack([v.detach().reshape(()).to(torch.float64) for v in out.values()])
    record: dict[str, float | int] = dict(zip(out, values.tolist(), strict=True))
    if "skipped" in record:
        record["skipped"] = int(record["skipped"])
    return record


def _last_epoch_record(run_dir: Path) -> dict[str, Any]:
    from hessian_lab.experiments.run_log import read_jsonl

    rows = read_jsonl(run_dir / "epochs.jsonl")
    if not rows:
        raise RuntimeError(f"{run_dir}: checkpoint present but epochs.jsonl is empty")
    return rows[-1]
