"""A run's folder: create it, resume it, overwrite it, mark it finished.

::

    config.json      the full TrainConfig
    steps.jsonl/csv  one record per step
    epochs.jsonl/csv one record per epoch (epoch 0 = initialization)
    checkpoint.pt    after every epoch, written atomically (temporary file + rename)
    result.json      final metrics; its presence marks the run as finished
    tensorboard/     TensorBoard event files (only with ``tensorboard = true``)
    .lock            held (``flock``) while a process trains in the folder

The rules: an existing run is never touched without ``resume`` or ``overwrite``; a run is resumed
(or a finished one returned) only for the same configuration up to bookkeeping
(:func:`hessian_lab.experiments.protocol.check_reusable`); two processes never train in one
folder at the same time (the second one gets :class:`RunInUseError` at once).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hessian_lab.experiments.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
)
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.protocol import check_reusable

__all__ = ["CONFIG_NAME", "RESULT_NAME", "RunFolder", "RunInUseError"]

#: File holding the run's configuration.
CONFIG_NAME = "config.json"

#: File marking a finished run.
RESULT_NAME = "result.json"

#: Files of a run (deleted by ``overwrite`` and before a fresh start).
RUN_FILES = (
    CONFIG_NAME,
    "steps.jsonl",
    "steps.csv",
    "epochs.jsonl",
    "epochs.csv",
    CHECKPOINT_NAME,
    RESULT_NAME,
)


class RunInUseError(FileExistsError):
    """Another process is training in this run folder."""


class RunFolder:
    """The folder of one run.

    Args:
        path: The run folder (``config.out_dir``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        """``config.json``."""
        return self.path / CONFIG_NAME

    @property
    def checkpoint_path(self) -> Path:
        """``checkpoint.pt``."""
        return self.path / CHECKPOINT_NAME

    @property
    def result_path(self) -> Path:
        """``result.json``."""
        return self.path / RESULT_NAME

    def exists(self) -> bool:
        """Whether the folder holds a run (a ``config.json``)."""
        return self.config_path.exists()

    def is_finished(self) -> bool:
        """Whether the run finished (``result.json`` exists)."""
        return self.result_path.exists()

    def result(self) -> dict[str, Any]:
        """The content of ``result.json``."""
        return json.loads(self.result_path.read_text())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock for the duration of the ``with`` block.

        Raises:
            RunInUseError: Another process holds it (a second sweep or command on the same run).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no protection
            yield
            return
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                raise RunInUseError(
                    f"{self.path} is in use by another process (pid {holder}); wait for it to "
                    "finish (a finished run is reused), or choose another --name/--out-dir"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def prepare(
        self, config: TrainConfig, *, resume: bool, overwrite: bool
    ) -> dict[str, Any] | None:
        """Decide what to do with an existing run before training.

        Args:
            config: The validated configuration.
            resume: Continue (or return) an existing run of the same configuration.
            overwrite: Delete an existing run first.

        Returns:
            The finished run's result (nothing to train), or None (train: from its checkpoint
            if :meth:`has_checkpoint`, else from scratch).

        Raises:
            FileExistsError: A run exists and neither ``resume`` nor ``overwrite`` was given.
            ValueError: ``resume`` with a different configuration.
        """
        if self.exists() and overwrite:
            self._delete_run_files()
        if self.exists() and not resume:
            raise FileExistsError(
                f"{self.path} already holds a run; pass resume (CLI: --resume) to continue it, "
                "overwrite (--overwrite) to start again, or choose another --name/--out-dir"
            )
        if self.exists():
            check_reusable(self.path, config)
            if self.is_finished():
                return self.result()
        return None

    def has_checkpoint(self) -> bool:
        """Whether there is a run with a checkpoint to resume from."""
        return self.exists() and self.checkpoint_path.exists()

    def start(self, config: TrainConfig) -> None:
        """Start from scratch: delete a killed run's leftovers, write ``config.json``."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._delete_run_files()
        config.save(self.config_path)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` atomically."""
        save_checkpoint(self.checkpoint_path, state)

    def load_checkpoint(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Read ``checkpoint.pt``."""
        return load_checkpoint(self.checkpoint_path, map_location=device)

    def write_result(self, result: dict[str, Any]) -> None:
        """Write ``result.json`` atomically: the run is finished."""
        text = json.dumps(result, indent=2) + "\n"
        atomic_write_bytes(self.result_path, lambda f: f.write(text.encode()))

    def _delete_run_files(self) -> None:
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
