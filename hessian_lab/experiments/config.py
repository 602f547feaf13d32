"""The full configuration of one training run, validated up front and saved next to its logs."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hessian_lab.experiments.datasets import DATASET_NAMES
from hessian_lab.experiments.models import ACTIVATIONS, MODEL_NAMES

__all__ = ["OPTIMIZER_NAMES", "TrainConfig", "default_run_name"]

#: Valid optimizers: ADLER with the paper's Q (GGN), ADLER with the GN (empirical Fisher)
#: curvature and its arithmetic averaging, plain SGD with a fixed learning rate.
OPTIMIZER_NAMES: tuple[str, ...] = ("adler", "gn", "sgd")

#: ADLER curvature matrices accepted by the ``curvature`` override.
CURVATURES: tuple[str, ...] = ("ggn", "ef", "ef_batch", "hessian")


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as ``config.json`` in the run folder).

    Attributes:
        model: ``"mlp"``, ``"cnn"``, ``"rescnn"`` or ``"vit"``.
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
        width: Hidden units / channels / embedding dimension.
        depth: Hidden layers / convolution blocks / transformer blocks.
        model_options: Model-specific options, e.g. ``{"patch_size": 4, "heads": 4}`` for the ViT.
        dataset: ``"digits"``, ``"cifar10"``, ``"cifar100"`` or ``"synthetic"``.
        data_dir: Folder of the CIFAR files.
        download: Allow downloading CIFAR when files are missing.
        split_seed: Seed of the digits train/test split (and of the synthetic data).
        max_train: Use only the first ``max_train`` training examples (None: all).
        max_test: Use only the first ``max_test`` test examples (None: all).
        synthetic_shape: Input shape of the synthetic data set.
        synthetic_classes: Classes of the synthetic data set.
        optimizer: ``"adler"`` (η from Q, log-averaged), ``"gn"`` (η from the empirical Fisher,
            arithmetic average) or ``"sgd"`` (fixed ``lr``, no momentum).
        lr: SGD learning rate (required for ``"sgd"``, ignored otherwise).
        beta: ADLER averaging factor β (paper: 0.99).
        eps: ADLER regularization ε in ``GᵀG / (Gᵀ Q G + ε GᵀG)`` (paper: 1e-10).
        curvature: Override the ADLER curvature (``ggn``, ``ef``, ``ef_batch``, ``hessian``);
            None: ``ggn`` for adler, ``ef`` for gn.
        adler_options: Extra keyword arguments of :class:`hessian_lab.optim.adler.ADLER`, e.g.
            the off-by-default extensions ``{"trust_region": 1.0}``, ``{"max_lr": 0.5}``,
            ``{"curvature_fraction": 0.25}``; empty: the paper's algorithm as written.
        epochs: Passes over the training set.
        batch_size: Minibatch size |I|.
        eval_batch_size: Batch size for the per-epoch evaluation (does not affect results).
        seed: Seed of the model initialization and of the data order.
        device: ``"auto"`` (cuda when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        name: Run name (folder name); empty: derived from the configuration.
        out_dir: Run folder; empty: ``runs/<name>``.
        log_every: Log one step record every ``log_every`` steps.
    """

    model: str = "cnn"
    activation: str = "relu"
    width: int = 32
    depth: int = 2
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    split_seed: int = 0
    max_train: int | None = None
    max_test: int | None = None
    synthetic_shape: tuple[int, int, int] = (3, 32, 32)
    synthetic_classes: int = 10
    optimizer: str = "adler"
    lr: float | None = None
    beta: float = 0.99
    eps: float = 1e-10
    curvature: str | None = None
    adler_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 64
    eval_batch_size: int = 1024
    seed: int = 0
    device: str = "auto"
    name: str = ""
    out_dir: str = ""
    log_every: int = 1

    def validate(self) -> TrainConfig:
        """Check names and ranges; raise ``ValueError`` naming the field and the valid choices.

        Returns:
            ``self``, with ``name`` and ``out_dir`` filled in when they were empty.
        """
        _choice("model", self.model, MODEL_NAMES)
        _choice("activation", self.activation, tuple(ACTIVATIONS))
        _choice("dataset", self.dataset, DATASET_NAMES)
        _choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        if self.curvature is not None:
            _choice("curvature", self.curvature, CURVATURES)
        for key in ("width", "depth", "epochs", "batch_size", "eval_batch_size", "log_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("max_train", "max_test"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
        if self.optimizer == "sgd":
            if self.lr is None or not math.isfinite(self.lr) or self.lr <= 0:
                raise ValueError(
                    f"optimizer 'sgd' needs a positive learning rate (lr / --lr), got {self.lr!r}"
                )
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if self.adler_options and self.optimizer == "sgd":
            raise ValueError("adler_options are given but optimizer is 'sgd'")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.dataset in ("cifar10", "cifar100") and not self.data_dir:
            raise ValueError(
                f"dataset {self.dataset!r} needs data_dir (CLI: --data-dir) pointing at the "
                "folder that holds the unpacked CIFAR python-pickle files"
            )
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda[:i]' or 'mps', got {self.device!r}"
            )
        if not self.name:
            self.name = default_run_name(self)
        if not self.out_dir:
            self.out_dir = str(Path("runs") / self.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dictionary."""
        d = dataclasses.asdict(self)
        d["synthetic_shape"] = list(self.synthetic_shape)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dictionary; unknown keys raise ``ValueError`` listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown configuration key(s) {', '.join(unknown)}; valid keys are: "
                f"{', '.join(sorted(names))}"
            )
        values = dict(values)
        if "synthetic_shape" in values:
            values["synthetic_shape"] = tuple(values["synthetic_shape"])
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write the configuration as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a configuration written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def results_key(self) -> dict[str, Any]:
        """The fields that change results (all but naming, device, data location and logging)."""
        d = self.to_dict()
        # Where the data files lie does not change the results; moving them must not block resume.
        for key in ("name", "out_dir", "device", "eval_batch_size", "log_every", "download"):
            d.pop(key)
        d.pop("data_dir")
        return d


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {key} {value!r}; valid choices are: {', '.join(valid)}")


def default_run_name(config: TrainConfig) -> str:
    """A readable, unique-per-grid-point name such as ``cnn-relu-w32-d2-digits-adler-s0``."""
    opt = config.optimizer
    if opt == "sgd" and config.lr is not None:
        opt = f"sgd-lr{config.lr:.3g}"
    if config.curvature is not None:
        opt = f"{opt}-{config.curvature}"
    for key, value in sorted(config.adler_options.items()):
        opt = f"{opt}-{key}{value}"
    parts = [config.model, config.activation, f"w{config.width}", f"d{config.depth}"]
    parts += [f"{k}{v}" for k, v in sorted(config.model_options.items())]
    parts += [config.dataset, opt, f"s{config.seed}"]
    return "-".join(str(p) for p in parts)
