"""One training run: a run folder, a setup and the loop with logging callbacks.

:func:`train` combines a :class:`~hessian_lab.experiments.run_folder.RunFolder` (create, resume,
overwrite, result), a :class:`RunSetup` (device, data, model, loss, optimizer) and the loop of
:mod:`hessian_lab.experiments.loop` with the callbacks that log, evaluate and checkpoint.

Logs (see :mod:`hessian_lab.experiments.run_folder` for the folder's layout): ``steps.jsonl/csv``
one record per step (epoch, step, loss, η_k, η̂_k, ...), ``epochs.jsonl/csv`` one record per
epoch (epoch 0 = initialization: train loss/accuracy on the whole training set, test
loss/accuracy, last η̂, cumulative training time of the optimizer steps), optionally TensorBoard
event files.

Determinism: the model is initialized from ``torch.manual_seed(seed)``, the data order comes from
a separate ``torch.Generator`` seeded with ``seed`` whose state is checkpointed together with the
model, the optimizer state (ADLER's running averages s_k, c_k) and the global RNG state. Resuming
a run killed at any point (SIGKILL included) restarts from the last completed epoch, cuts the logs
back to that point, and on CPU reproduces the uninterrupted run's numbers exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessian_lab.core import progress_bar
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.datasets import ImageData, load_dataset
from hessian_lab.experiments.evaluate import evaluate
from hessian_lab.experiments.factories import (
    build_model_from_factory,
    is_factory_reference,
    load_dataset_from_factory,
)
from hessian_lab.experiments.loop import Callback, LoopState, ProgressCallback, run_loop, steps_in
from hessian_lab.experiments.models import build_model
from hessian_lab.experiments.optimizers import build_optimizer
from hessian_lab.experiments.run_folder import RESULT_NAME, RunFolder
from hessian_lab.experiments.run_log import MetricLog, read_jsonl

__all__ = [
    "EPOCH_COLUMNS",
    "RESULT_NAME",
    "RunSetup",
    "TensorBoardLogger",
    "load_data",
    "make_model",
    "resolve_device",
    "setup_run",
    "train",
]

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
    """Load the data set named by ``config`` (built in or a factory), with its subset limits."""
    if is_factory_reference(config.dataset):
        data = load_dataset_from_factory(
            config.dataset,
            config.dataset_options,
            data_dir=config.data_dir,
            download=config.download,
            split_seed=config.split_seed,
        )
        return data.subset(config.max_train, config.max_test)
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


def make_model(config: TrainConfig, data: ImageData) -> nn.Module:
    """Build the configured model for ``data`` (built in, or through its factory).

    Call after ``torch.manual_seed`` for a reproducible initialization (:func:`setup_run` does).
    """
    if is_factory_reference(config.model):
        return build_model_from_factory(
            config.model,
            data.in_shape,
            data.num_classes,
            config.model_settings(),
            config.model_options,
        )
    return build_model(
        config.model,
        activation=config.activation or "relu",
        in_shape=data.in_shape,
        num_classes=data.num_classes,
        width=config.width or 32,
        depth=config.depth or 2,
        **config.model_options,
    )


@dataclass
class RunSetup:
    """Everything a run trains with: the data on the device, the model, the loss, the optimizer.

    Attributes:
        config: The validated configuration.
        device: Where everything lives.
        data: The data set (CPU tensors as loaded).
        model: The freshly initialized model, on ``device``.
        loss_fn: ``nn.CrossEntropyLoss()``.
        optimizer: The configured stepper (``optimizers.build_optimizer``), or None.
        train_x: Training inputs on ``device``; ``train_y``, ``test_x``, ``test_y`` likewise.
    """

    config: TrainConfig
    device: torch.device
    data: ImageData
    model: nn.Module
    loss_fn: nn.Module
    optimizer: Any
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the whole training and test splits."""
        size = self.config.eval_batch_size
        train_loss, train_acc = evaluate(self.model, self.loss_fn, self.train_x, self.train_y, size)
        test_loss, test_acc = evaluate(self.model, self.loss_fn, self.test_x, self.test_y, size)
        return {
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
        }

    @property
    def num_params(self) -> int:
        """P, the number of trainable parameters."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def setup_run(
    config: TrainConfig,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    optimizer: bool = True,
) -> RunSetup:
    """Load the data, seed, build the model (and the optimizer) as ``config`` says.

    Args:
        config: The configuration (validated here, on a copy).
        dtype: Cast the model and the inputs (e.g. ``torch.float64`` for correctness studies).
        device: Override ``config.device``.
        optimizer: Also build the configured optimizer (off: ``RunSetup.optimizer`` is None).
    """
    config = copy.deepcopy(config).validate()
    where = resolve_device(config.device if device is None else str(device))
    data = load_data(config)
    torch.manual_seed(config.seed)  # model initialization
    model = make_model(config, data).to(device=where, dtype=dtype)
    loss_fn = nn.CrossEntropyLoss()
    stepper = build_optimizer(config, model, loss_fn) if optimizer else None

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=where, dtype=dtype) if dtype is not None else x.to(where)

    return RunSetup(
        config,
        where,
        data,
        model,
        loss_fn,
        stepper,
        cast(data.train_inputs),
        data.train_targets.to(where),
        cast(data.test_inputs),
        data.test_targets.to(where),
    )


class TensorBoardLogger(Callback):
    """Write the step and epoch records as TensorBoard scalars (``torch.utils.tensorboard``).

    Steps go to ``step/<key>``, epochs to ``epoch/<key>``, both against the step count. On
    resume, events after the checkpoint's step are purged (``purge_step``), so the curves match
    an uninterrupted run's.

    Args:
        log_dir: Folder of the event files.
        purge_step: First step to (re)write; None for a fresh run.
        log_every: Write every k-th step record.

    Raises:
        ImportError: The ``tensorboard`` package is missing (the message names the pip extra).
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None, log_every: int = 1) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                f"TensorBoard logging needs the tensorboard package ({err}); install it with "
                "pip install 'hessian-lab[tensorboard]' (or pip install tensorboard), or leave "
                "out --tensorboard"
            ) from err
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.log_every = log_every

    def on_step_end(self, state: LoopState, record: dict[str, float | int]) -> None:
        """Scalars of one step."""
        if state.step % self.log_every == 0:
            for key, value in record.items():
                self.writer.add_scalar(f"step/{key}", value, state.step)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Scalars of one epoch record."""
        for key, value in record.items():
            if key not in ("epoch", "step") and value is not None:
                self.writer.add_scalar(f"epoch/{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def _echo(bar: Any, text: str) -> None:
    """Print a line without breaking a live tqdm bar (tqdm.write) or into a log (print)."""
    from tqdm.std import tqdm as std_tqdm

    if isinstance(bar, std_tqdm) and not bar.disable:
        bar.write(text)
    else:
        print(text, flush=True)


class _RunLogger(Callback):
    """The run's own callback: step log, evaluation, epoch log, checkpoint after every epoch."""

    def __init__(
        self,
        setup: RunSetup,
        folder: RunFolder,
        step_log: MetricLog,
        epoch_log: MetricLog,
        best_test_acc: float,
        tensorboard: TensorBoardLogger | None,
        bar: Any,
        echo: bool,
        fresh: bool,
    ) -> None:
        self.setup, self.folder, self.fresh = setup, folder, fresh
        self.step_log, self.epoch_log = step_log, epoch_log
        self.best_test_acc = best_test_acc
        self.tensorboard, self.bar, self.echo = tensorboard, bar, echo
        self.record: dict[str, Any] = {}

    def on_train_begin(self, state: LoopState) -> None:
        if self.fresh:  # epoch 0 = initialization
            self.on_epoch_end(state)

    def on_step_end(self, state: LoopState, record: dict[str, float | int]) -> None:
        if state.step % self.setup.config.log_every == 0:
            self.step_log.write({"epoch": state.epoch, "step": state.step, **record})

    def on_epoch_end(self, state: LoopState) -> None:
        config = self.setup.config
        metrics = self.setup.evaluate()
        self.best_test_acc = max(self.best_test_acc, metrics["test_acc"])
        eta_hat = state.last.get("eta_hat") if state.epoch > 0 else None
        self.record = {
            "epoch": state.epoch,
            "step": state.step,
            **metrics,
            "eta_hat": eta_hat,
            "time_s": round(state.elapsed, 3),
        }
        self.epoch_log.write(self.record)
        if self.tensorboard is not None:
            self.tensorboard.log_epoch(self.record)
        if self.echo:
            _echo(
                self.bar,
                f"{config.name} epoch {state.epoch}: train loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_acc']:.3f} | test loss {metrics['test_loss']:.4f} "
                f"acc {metrics['test_acc']:.3f}",
            )
        self.folder.save_checkpoint(
            {
                "model": self.setup.model.state_dict(),
                "optimizer": self.setup.optimizer.state_dict(),
                "order_rng": state.order.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": state.epoch,
                "step": state.step,
                "elapsed": state.elapsed,
                "best_test_acc": self.best_test_acc,
                "log_sizes": {"steps": self.step_log.sizes(), "epochs": self.epoch_log.sizes()},
                "config": config.to_dict(),
            }
        )


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train one model as configured; log, checkpoint every epoch, and return the final metrics.

    Args:
        config: The run's configuration (validated here; not modified).
        resume: Continue the run in ``config.out_dir`` from its last checkpoint; a finished run is
            returned as is; a folder without checkpoint starts from scratch.
        overwrite: Delete an existing run in ``config.out_dir`` and start again.
        progress: Show a progress bar and one line per epoch (:func:`hessian_lab.core.progress_bar`:
            tqdm on a terminal, plain lines in a log).
        callbacks: More :class:`~hessian_lab.experiments.loop.Callback` objects, called after the
            run's own (logging and checkpointing) at each hook.

    Returns:
        The content of ``result.json``: name, folder, final and best metrics, steps, wall time.

    Raises:
        ValueError: Invalid configuration, or ``resume`` with a different configuration.
        FileExistsError: ``out_dir`` already holds a run and neither ``resume`` nor
            ``overwrite`` was given, or another process trains in it.
        FileNotFoundError: Missing data files.
        ImportError: ``tensorboard = true`` without the tensorboard package.
    """
    config = copy.deepcopy(config).validate()
    folder = RunFolder(config.out_dir)
    with folder.lock():
        finished = folder.prepare(config, resume=resume, overwrite=overwrite)
        if finished is not None:
            return finished
        setup = setup_run(config)
        order = torch.Generator().manual_seed(config.seed)  # data order, CPU for reproducibility
        start_epoch, step, elapsed, best_test_acc = 1, 0, 0.0, -1.0
        resumed = folder.has_checkpoint()
        if resumed:
            state = folder.load_checkpoint(setup.device)
            setup.model.load_state_dict(state["model"])
            setup.optimizer.load_state_dict(state["optimizer"])
            order.set_state(state["order_rng"].cpu())
            torch.set_rng_state(state["torch_rng"].cpu())
            for stem, sizes in state["log_sizes"].items():
                MetricLog.truncate(folder.path, stem, sizes)  # drop records after the checkpoint
            start_epoch, step = state["epoch"] + 1, state["step"]
            elapsed, best_test_acc = state["elapsed"], state["best_test_acc"]
        else:
            folder.start(config)

        tensorboard = None
        if config.tensorboard:
            tensorboard = TensorBoardLogger(
                folder.path / "tensorboard", step + 1 if resumed else None, config.log_every
            )
        step_log = MetricLog(folder.path, "steps", ("epoch", "step", *setup.optimizer.columns))
        epoch_log = MetricLog(folder.path, "epochs", EPOCH_COLUMNS)
        total = steps_in(len(setup.train_y), config.batch_size, config.epochs) - step
        bar = progress_bar(total=total, desc=config.name, unit="step", enable=progress)
        logger = _RunLogger(
            setup, folder, step_log, epoch_log, best_test_acc, tensorboard, bar, progress,
            fresh=not resumed,
        )  # fmt: skip
        hooks: list[Callback] = [logger]
        if tensorboard is not None:
            hooks.append(tensorboard)
        hooks.append(ProgressCallback(bar))
        try:
            run_loop(
                setup.model,
                setup.optimizer,
                setup.train_x,
                setup.train_y,
                batch_size=config.batch_size,
                order=order,
                epochs=config.epochs,
                callbacks=[*hooks, *callbacks],
                start_epoch=start_epoch,
                start_step=step,
                elapsed=elapsed,
            )
        finally:
            bar.close()
            step_log.close()
            epoch_log.close()
            if tensorboard is not None:
                tensorboard.close()

        record = logger.record or _last_epoch_record(folder.path)  # resumed after the last epoch
        result = {
            "name": config.name,
            "out_dir": str(folder.path),
            "status": "finished",
            "epochs": config.epochs,
            "steps": record["step"],
            "train_loss": record["train_loss"],
            "train_acc": record["train_acc"],
            "test_loss": record["test_loss"],
            "test_acc": record["test_acc"],
            "best_test_acc": logger.best_test_acc,
            "train_time_s": record["time_s"],
            "device": str(setup.device),
        }
        folder.write_result(result)
        return result


def _last_epoch_record(run_dir: Path) -> dict[str, Any]:
    rows = read_jsonl(run_dir / "epochs.jsonl")
    if not rows:
        raise RuntimeError(f"{run_dir}: checkpoint present but epochs.jsonl is empty")
    return rows[-1]
