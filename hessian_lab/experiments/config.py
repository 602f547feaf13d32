"""The full configuration of one training run, validated up front and saved next to its logs.

:class:`TrainConfig` is the single description of a run: the command-line options of
``hessian-lab train`` and the keys of a sweep file are derived from its fields (each field's
``metadata`` holds its help text and option group), and a run's folder name is derived from its
values (:func:`default_run_name`: a readable prefix plus a short hash of every setting that
changes results), so two different configurations never share a folder.

Settings that do not apply to the chosen model, data set or optimizer are refused, not ignored
(:meth:`TrainConfig.inapplicable`): ``--optimizer sgd --beta 0.9`` or ``--optimizer adler --lr
0.1`` stop with a message that says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hessian_lab.experiments.adler_options import check_adler_options
from hessian_lab.experiments.datasets import CIFAR_LAYOUT, DATASET_NAMES
from hessian_lab.experiments.factories import (
    dataset_factory_kwargs,
    factory_label,
    is_factory_reference,
    model_factory_kwargs,
)
from hessian_lab.experiments.models import ACTIVATIONS, MODEL_NAMES, MODEL_OPTIONS

__all__ = [
    "BOOKKEEPING_FIELDS",
    "BUILTIN_MODEL_DEFAULTS",
    "CURVATURES",
    "OPTIMIZER_NAMES",
    "TrainConfig",
    "config_hash",
    "default_run_name",
]

#: Valid optimizers: ADLER with the paper's Q (GGN), ADLER with the GN (empirical Fisher)
#: curvature and its arithmetic averaging, plain SGD with a fixed learning rate.
OPTIMIZER_NAMES: tuple[str, ...] = ("adler", "gn", "sgd")

#: ADLER curvature matrices accepted by the ``curvature`` override.
CURVATURES: tuple[str, ...] = ("ggn", "ef", "ef_batch", "hessian")

#: What the built-in models use when ``activation``, ``width`` or ``depth`` is left unset.
BUILTIN_MODEL_DEFAULTS: dict[str, Any] = {"activation": "relu", "width": 32, "depth": 2}

#: Fields that do not change a run's results: naming, placement, data location, logging. They
#: are left out of :meth:`TrainConfig.results_key`, so changing them never blocks a resume.
BOOKKEEPING_FIELDS: tuple[str, ...] = (
    "name",
    "out_dir",
    "device",
    "data_dir",
    "download",
    "eval_batch_size",
    "log_every",
    "tensorboard",
)

#: Fields of ADLER and GN only.
_ADLER_FIELDS = ("beta", "eps", "curvature", "adler_options")


def _f(default: Any = dataclasses.MISSING, *, group: str, help: str, **kw: Any) -> Any:
    """A dataclass field with the command-line metadata (help text, option group)."""
    meta = {"group": group, "help": help, **kw.pop("metadata", {})}
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as ``config.json`` in the run folder).

    Each field's help text is in its ``metadata["help"]``; ``hessian-lab train --help`` shows
    them all. In short: the model (``model``, ``activation``, ``width``, ``depth``,
    ``model_options``), the data (``dataset``, ``dataset_options``, ``data_dir``, ``download``,
    ``split_seed``, ``max_train``, ``max_test``, ``synthetic_shape``, ``synthetic_classes``), the
    optimizer (``optimizer``, ``lr``, ``beta``, ``eps``, ``curvature``, ``adler_options``), the
    loop (``epochs``, ``batch_size``, ``eval_batch_size``, ``seed``, ``device``) and the
    bookkeeping (``name``, ``out_dir``, ``log_every``, ``tensorboard``).

    ``model`` and ``dataset`` are built-in names or factory references ``"module:function"``
    (see :mod:`hessian_lab.experiments.factories` for the factories' contract).
    """

    model: str = _f(
        "cnn",
        group="model",
        help="mlp, cnn (no skip connections), rescnn (with them), vit, or your own factory "
        "package.module:function (docs/experiments.md)",
    )
    activation: str | None = _f(
        None,
        group="model",
        help="relu, sigmoid or tanh (built-in models: default relu; a factory gets it only if set)",
        metadata={"choices": tuple(ACTIVATIONS)},
    )
    width: int | None = _f(
        None,
        group="model",
        help="hidden units (mlp), channels (cnn/rescnn) or embedding size (vit); built-in "
        "default 32; a factory gets it only if set",
    )
    depth: int | None = _f(
        None,
        group="model",
        help="hidden layers (mlp), conv blocks (cnn/rescnn) or transformer blocks (vit); "
        "built-in default 2; a factory gets it only if set",
    )
    model_options: dict[str, Any] = _f(
        group="model",
        help="keyword argument of the model (a factory's own options; built-in: the options "
        "below), repeatable",
        default_factory=dict,
        metadata={"flag": "--model-option"},
    )
    dataset: str = _f(
        "digits",
        group="data",
        help="digits (no files needed), cifar10, cifar100, synthetic, or your own factory "
        "package.module:function",
    )
    dataset_options: dict[str, Any] = _f(
        group="data",
        help="keyword argument of a data set factory, repeatable",
        default_factory=dict,
        metadata={"flag": "--dataset-option"},
    )
    data_dir: str | None = _f(
        None,
        group="data",
        help="folder with the unpacked CIFAR python-pickle files (cifar-10-batches-py/ or "
        "cifar-100-python/); required for cifar10/cifar100; given to a data set factory as "
        "data_dir",
    )
    download: bool = _f(
        False,
        group="data",
        help="download CIFAR into --data-dir if files are missing (off: nothing is downloaded)",
    )
    split_seed: int = _f(
        0,
        group="data",
        help="seed of the digits train/test split and of the synthetic data (and of a factory "
        "that has a split_seed parameter)",
    )
    max_train: int | None = _f(
        None, group="data", help="use only the first N training examples (default: all)"
    )
    max_test: int | None = _f(
        None, group="data", help="use only the first N test examples (default: all)"
    )
    synthetic_shape: tuple[int, int, int] = _f(
        (3, 32, 32), group="data", help="input shape C H W of the synthetic data"
    )
    synthetic_classes: int = _f(10, group="data", help="classes of the synthetic data")
    optimizer: str = _f(
        "adler",
        group="optimization",
        help="adler: step size from the paper's Q (GGN), log-averaged; gn: from the empirical "
        "Fisher, arithmetic average; sgd: fixed --lr, no momentum",
        metadata={"choices": OPTIMIZER_NAMES},
    )
    lr: float | None = _f(
        None,
        group="optimization",
        help="sgd: the learning rate (required); adler/gn: a multiplier of ADLER's rate η̂_k "
        "(torch.optim's lr; default 1, the paper's Algorithm 1)",
    )
    beta: float = _f(0.99, group="optimization", help="ADLER averaging factor β (adler/gn only)")
    eps: float = _f(
        1e-10, group="optimization", help="ADLER regularization ε, Q + εI (adler/gn only)"
    )
    curvature: str | None = _f(
        None,
        group="optimization",
        help="override ADLER's curvature matrix (default: ggn for adler, ef for gn)",
        metadata={"choices": CURVATURES},
    )
    adler_options: dict[str, Any] = _f(
        group="optimization",
        help="extra ADLER argument, repeatable: trust_region=1.0, max_lr=0.5, "
        "curvature_fraction=0.25, max_consecutive_skips=10, averaging=log, jvp_method=auto "
        "(default: none, the paper's algorithm)",
        default_factory=dict,
        metadata={"flag": "--adler-option"},
    )
    epochs: int = _f(5, group="optimization", help="passes over the training set")
    batch_size: int = _f(64, group="optimization", help="minibatch size |I|")
    eval_batch_size: int = _f(
        1024,
        group="optimization",
        help="batch size of the per-epoch evaluation (memory only, same results)",
    )
    seed: int = _f(0, group="optimization", help="seed of the initialization and data order")
    device: str = _f(
        "auto", group="optimization", help="'auto' (cuda when available), 'cpu', 'cuda:1', ..."
    )
    name: str = _f(
        "",
        group="run",
        help="run name (default: derived from the configuration, e.g. "
        "cnn-relu-w32-d2-digits-adler-s0-<hash>)",
    )
    out_dir: str = _f("", group="run", help="run folder (default: runs/<name>)")
    log_every: int = _f(1, group="run", help="write every k-th step record")
    tensorboard: bool = _f(
        False,
        group="run",
        help="also write TensorBoard event files to <run folder>/tensorboard "
        "(needs: pip install 'hessian-lab[tensorboard]')",
    )

    # ------------------------------------------------------------------------------------------

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{field: default value}``."""
        return TrainConfig().to_dict()

    def inapplicable(self) -> dict[str, str]:
        """Fields that do not apply to this model, data set and optimizer, with the reason.

        Such a field must keep its default value (:meth:`validate` refuses anything else).
        """
        out: dict[str, str] = {}
        if self.optimizer == "sgd":
            for key in _ADLER_FIELDS:
                out[key] = "it is a setting of ADLER (optimizer adler or gn), not of sgd"
        where = f"dataset {self.dataset!r}"
        if not is_factory_reference(self.dataset):
            out["dataset_options"] = f"{where} is built in and takes no options"
        if self.dataset in ("digits", "synthetic"):
            for key in ("data_dir", "download"):
                out[key] = f"{where} needs no files"
        if self.dataset in CIFAR_LAYOUT:
            out["split_seed"] = f"{where} has a fixed train/test split"
        if self.dataset != "synthetic":
            for key in ("synthetic_shape", "synthetic_classes"):
                out[key] = f"it shapes the synthetic data set only, not {where}"
        if is_factory_reference(self.dataset):
            _, _, takes_seed = dataset_factory_kwargs(
                self.dataset, self.dataset_options, None, False, self.split_seed
            )
            if not takes_seed:
                out["split_seed"] = f"{where} has no split_seed parameter"
        return out

    def validate(self) -> TrainConfig:
        """Check names, ranges and applicability; raise ``ValueError`` saying what to change.

        Returns:
            ``self``, normalized: the built-in models' defaults filled in for unset
            ``activation``/``width``/``depth``, numbers as floats where floats are meant,
            ``adler_options`` checked, and ``name``/``out_dir`` derived when empty.
        """
        _choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        if not is_factory_reference(self.model):
            _choice("model", self.model, MODEL_NAMES, factory=True)
            for key, value in BUILTIN_MODEL_DEFAULTS.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
            unknown = sorted(set(self.model_options) - set(MODEL_OPTIONS[self.model]))
            if unknown:
                raise ValueError(
                    f"model {self.model!r} does not take option(s) {', '.join(unknown)}; its "
                    f"options are: {', '.join(MODEL_OPTIONS[self.model])}"
                )
        if not is_factory_reference(self.dataset):
            _choice("dataset", self.dataset, DATASET_NAMES, factory=True)
        if self.activation is not None:
            _choice("activation", self.activation, tuple(ACTIVATIONS))
        if self.curvature is not None:
            _choice("curvature", self.curvature, CURVATURES)
        for key in ("epochs", "batch_size", "eval_batch_size", "log_every", "synthetic_classes"):
            _positive_int(key, getattr(self, key))
        for key in ("width", "depth", "max_train", "max_test"):
            if getattr(self, key) is not None:
                _positive_int(key, getattr(self, key), " or None")
        for key in ("split_seed", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        for key in ("lr", "beta", "eps"):  # 1 and 1.0 are the same setting (and the same hash)
            value = getattr(self, key)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, key, float(value))
            elif value is not None and not isinstance(value, float):
                raise ValueError(f"{key} must be a number, got {value!r}")
        if self.optimizer in ("adler", "gn") and self.lr == 1.0:
            self.lr = None  # ADLER's default multiplier: the same run as leaving lr out
        self.synthetic_shape = tuple(self.synthetic_shape)  # type: ignore[assignment]
        if len(self.synthetic_shape) != 3 or not all(
            isinstance(s, int) and s > 0 for s in self.synthetic_shape
        ):
            raise ValueError(
                f"synthetic_shape must be three positive integers C H W, got {self.synthetic_shape}"
            )
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        for key in ("model_options", "adler_options", "dataset_options"):
            if not isinstance(getattr(self, key), dict):
                value = getattr(self, key)
                raise ValueError(f"{key} must be a table of KEY = VALUE, got {value!r}")
        self.adler_options = check_adler_options(self.adler_options)
        defaults = self.defaults()
        for key, reason in self.inapplicable().items():
            value = getattr(self, key)
            default = defaults[key]
            if (list(value) if isinstance(value, tuple) else value) != default:
                raise ValueError(
                    f"{key} = {value!r} does not apply here: {reason}; remove it "
                    f"(--{key.replace('_', '-')})"
                )
        if self.optimizer == "sgd" or self.lr is not None:
            if self.lr is None or not math.isfinite(self.lr) or self.lr <= 0:
                raise ValueError(
                    f"optimizer {self.optimizer!r} needs a positive learning rate (lr / --lr), "
                    f"got {self.lr!r}"
                )
        if self.dataset in CIFAR_LAYOUT and not self.data_dir:
            raise ValueError(
                f"dataset {self.dataset!r} needs data_dir (CLI: --data-dir) pointing at the "
                "folder that holds the unpacked CIFAR python-pickle files"
            )
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda[:i]' or 'mps', got {self.device!r}"
            )
        if is_factory_reference(self.model):
            model_factory_kwargs(self.model, None, None, self.model_settings(), self.model_options)
        if not self.name:
            self.name = default_run_name(self)
        if not self.out_dir:
            self.out_dir = str(Path("runs") / self.name)
        return self

    def model_settings(self) -> dict[str, Any]:
        """``activation``, ``width`` and ``depth`` where set (what a model factory receives)."""
        return {
            key: getattr(self, key)
            for key in ("activation", "width", "depth")
            if getattr(self, key) is not None
        }

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
        """Every field that changes results: all but :data:`BOOKKEEPING_FIELDS`.

        Two runs with equal results keys compute the same thing (on the same machine and thread
        count, bit for bit); a finished run may be reused for a configuration with the same key
        (:func:`hessian_lab.experiments.protocol.config_differences`).
        """
        d = self.to_dict()
        for key in BOOKKEEPING_FIELDS:
            d.pop(key)
        return d


def _choice(key: str, value: Any, valid: tuple[str, ...], factory: bool = False) -> None:
    if value not in valid:
        extra = ", or a factory package.module:function (docs/experiments.md)" if factory else ""
        raise ValueError(f"unknown {key} {value!r}; valid choices are: {', '.join(valid)}{extra}")


def _positive_int(key: str, value: Any, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer{alternative}, got {value!r}")


def config_hash(config: TrainConfig, length: int = 8) -> str:
    """A short hash of every setting that changes results (:meth:`TrainConfig.results_key`).

    Only settings that differ from the defaults enter it, so adding a new setting (with a
    default) later does not rename existing runs.
    """
    defaults = TrainConfig.defaults()
    changed = {k: v for k, v in config.results_key().items() if v != defaults[k]}
    text = json.dumps(changed, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def default_run_name(config: TrainConfig, extra: Sequence[str] = ()) -> str:
    """A readable prefix plus a hash of the whole configuration.

    For example ``cnn-relu-w32-d2-digits-adler-s0-3f9c2a1b``: model, activation, width, depth,
    model options, data set, optimizer (with the SGD learning rate, a curvature override, ADLER
    options), seed, the ``extra`` parts (a sweep adds the other fields it varies, e.g.
    ``epochs3``), and :func:`config_hash`, which covers every setting that changes results
    (epochs, ``max_train``, batch size, β, ...), so two different configurations never share a
    name.
    """
    opt = config.optimizer
    if config.lr is not None:
        opt = f"{opt}-lr{config.lr:.3g}"
    if config.curvature is not None:
        opt = f"{opt}-{config.curvature}"
    for key, value in sorted(config.adler_options.items()):
        opt = f"{opt}-{key}{value}"
    model = factory_label(config.model) if is_factory_reference(config.model) else config.model
    parts: list[Any] = [model]
    if config.activation is not None:
        parts.append(config.activation)
    if config.width is not None:
        parts.append(f"w{config.width}")
    if config.depth is not None:
        parts.append(f"d{config.depth}")
    parts += [f"{k}{v}" for k, v in sorted(config.model_options.items())]
    dataset = config.dataset
    if is_factory_reference(dataset):
        dataset = factory_label(dataset)
    parts += [dataset, opt, f"s{config.seed}", *extra]
    prefix = _UNSAFE.sub("_", "-".join(str(p) for p in parts))[:120]
    return f"{prefix}-{config_hash(config)}"
