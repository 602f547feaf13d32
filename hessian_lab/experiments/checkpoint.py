"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

``os.replace`` within one file system is atomic, so a run killed at any moment (SIGKILL included)
leaves either the previous checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_NAME", "atomic_write_bytes", "load_checkpoint", "save_checkpoint"]

#: File name of the checkpoint inside a run folder.
CHECKPOINT_NAME = "checkpoint.pt"


def atomic_write_bytes(path: str | Path, writer: Any) -> None:
    """Create ``path`` atomically.

    Args:
        path: Destination.
        writer: Callable receiving an open binary file object to write into.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable (directory entry); not possible on every platform.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, state dicts, plain values) atomically with ``torch.save``."""
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    ``weights_only=False`` because the state holds a ``torch.Generator`` state and plain Python
    values; only load checkpoints you wrote yourself.
    """
    return torch.load(path, map_location=map_location, weights_only=False)
