"""Layer 6: the paper's experiments — models, data sets, training loop, checkpoints, sweeps, CLI.

The names below are imported lazily, so that ``import hessian_lab.experiments`` (or importing the
models alone) does not pull in the training machinery, scikit-learn or pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "models",
    "MLP": "models",
    "CNN": "models",
    "ViT": "models",
    "ImageData": "datasets",
    "load_dataset": "datasets",
    "TrainConfig": "config",
    "train": "training",
    "setup_run": "training",
    "RunSetup": "training",
    "RunFolder": "run_folder",
    "Callback": "loop",
    "run_loop": "loop",
    "load_sweep": "sweep",
    "run_sweep": "sweep",
    "collect_runs": "summarize",
    "paper_table": "summarize",
    "best_sgd_runs": "protocol",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
