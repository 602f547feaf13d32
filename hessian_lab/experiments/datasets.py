"""Data sets for the experiments: CIFAR-10/100 from disk, scikit-learn's digits, synthetic data.

Every loader returns a :class:`ImageData`: whole train and test splits as in-memory tensors
``inputs [N, C, H, W]`` (float32, normalized) and ``targets [N]`` (int64). The training loop does
its own shuffling with a checkpointed ``torch.Generator``, so no ``DataLoader`` state is saved.

* ``cifar10`` / ``cifar100`` — the paper's data sets, read from the standard "python version"
  pickle layout (``cifar-10-batches-py/`` or ``cifar-100-python/``). Nothing is downloaded unless
  ``download=True`` is passed explicitly.
* ``digits`` — scikit-learn's 8×8 grayscale digits (1797 images, 10 classes), shipped with
  scikit-learn: the default that needs no files. Split into train/test by a fixed seed.
* ``synthetic`` — Gaussian inputs of any shape labelled by a random linear teacher, for benchmarks.
"""

from __future__ import annotations

import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR_LAYOUT",
    "DATASET_NAMES",
    "ImageData",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "make_synthetic",
]

#: Valid names for :func:`load_dataset`.
DATASET_NAMES: tuple[str, ...] = ("digits", "cifar10", "cifar100", "synthetic")

#: Per data set: folder name inside ``root``, training files, test file, label key, classes, URL.
CIFAR_LAYOUT: dict[str, dict[str, object]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": "test_batch",
        "label_key": "labels",
        "num_classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": "test",
        "label_key": "fine_labels",
        "num_classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


@dataclass
class ImageData:
    """Train and test splits held in memory.

    Attributes:
        name: Data set name.
        train_inputs: ``[N_train, C, H, W]`` float32.
        train_targets: ``[N_train]`` int64 class indices.
        test_inputs: ``[N_test, C, H, W]`` float32.
        test_targets: ``[N_test]`` int64 class indices.
        num_classes: Number of classes C.
    """

    name: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """Shape of one input, ``(channels, height, width)``."""
        return tuple(self.train_inputs.shape[1:])  # type: ignore[return-value]

    def subset(self, max_train: int | None = None, max_test: int | None = None) -> ImageData:
        """Keep the first ``max_train`` training and ``max_test`` test examples (None: all)."""
        return ImageData(
            self.name,
            self.train_inputs[:max_train],
            self.train_targets[:max_train],
            self.test_inputs[:max_test],
            self.test_targets[:max_test],
            self.num_classes,
        )


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale to zero mean, unit variance per channel with the *training* statistics."""
    axes = (0, 2, 3)
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True) + 1e-8
    return tuple(  # type: ignore[return-value]
        torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (train, test)
    )


def _expected_layout(name: str, root: Path) -> str:
    layout = CIFAR_LAYOUT[name]
    files = [*layout["train"], layout["test"]]  # type: ignore[misc]
    return (
        f"expected the CIFAR 'python version' layout: {root}/{layout['folder']}/"
        f"{{{', '.join(files)}}} (the unpacked {Path(str(layout['url'])).name}; "
        "the folder itself may also be given as the root)"
    )


def _find_cifar_folder(name: str, root: Path) -> Path:
    """Accept either the parent directory or the unpacked folder itself."""
    layout = CIFAR_LAYOUT[name]
    inner = root / str(layout["folder"])
    return inner if inner.is_dir() else root


def _download_cifar(name: str, root: Path) -> None:
    """Download and unpack the official archive into ``root`` (only on explicit request)."""
    url = str(CIFAR_LAYOUT[name]["url"])
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / Path(url).name
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as err:
            raise RuntimeError(
                f"could not download {url} ({err}); download it manually and unpack it into {root}"
            ) from err
        with tarfile.open(archive, "r:gz") as tar:
            try:
                tar.extractall(root, filter="data")  # refuses paths escaping root
            except TypeError:  # Python without extraction filters (< 3.10.12)
                tar.extractall(root)


def _read_pickle(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    # The official files use bytes keys; files written by Python 3 tools may use str keys.
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(
            f"{path} is not a CIFAR batch: it needs the keys 'data' and {label_key!r}, "
            f"found {sorted(batch)}"
        )
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if len(data) != len(labels):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar(name: str, root: str | Path, *, download: bool = False) -> ImageData:
    """Read CIFAR-10 or CIFAR-100 from the standard python-pickle layout.

    Images are 3×32×32, standardized per channel with the training set's mean and standard
    deviation. CIFAR-100 uses the 100 fine labels.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: Directory containing ``cifar-10-batches-py/`` (or ``cifar-100-python/``), or that
            folder itself.
        download: Fetch the official archive from the University of Toronto if files are
            missing. Off by default: nothing is downloaded unless asked for.

    Raises:
        FileNotFoundError: A file is missing; the message names it and the expected layout.
    """
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR variant {name!r}; valid: {', '.join(CIFAR_LAYOUT)}")
    layout = CIFAR_LAYOUT[name]
    root = Path(root).expanduser()
    files = [*layout["train"], layout["test"]]  # type: ignore[misc]
    folder = _find_cifar_folder(name, root)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        _download_cifar(name, root)
        folder = _find_cifar_folder(name, root)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        where = "does not exist" if not root.exists() else f"lacks {folder / missing[0]}"
        raise FileNotFoundError(
            f"{name}: data directory {root} {where}; {_expected_layout(name, root)}. "
            "Pass download=True (CLI: --download) to fetch it, or download it manually."
        )
    label_key = str(layout["label_key"])
    train = [_read_pickle(folder / f, label_key) for f in layout["train"]]  # type: ignore[union-attr]
    test_x, test_y = _read_pickle(folder / str(layout["test"]), label_key)
    train_x = np.concatenate([x for x, _ in train]).astype(np.float32) / 255.0
    train_y = np.concatenate([y for _, y in train])
    tr, te = _standardize(train_x, test_x.astype(np.float32) / 255.0)
    return ImageData(
        name,
        tr,
        torch.from_numpy(train_y),
        te,
        torch.from_numpy(test_y),
        int(layout["num_classes"]),
    )


def load_digits(*, split_seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """Scikit-learn's 8×8 digits, split into train/test by a fixed random permutation.

    Pixel values (0..16) are standardized with the training split's mean and standard deviation.
    The split depends only on ``split_seed``, so runs with different training seeds share one
    test set.

    Args:
        split_seed: Seed of the permutation that decides the split.
        test_fraction: Fraction of the 1797 images held out for testing.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sk_load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8).astype(np.float64)
    y = bunch.target.astype(np.int64)
    perm = np.random.RandomState(split_seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    tr, te = _standardize(x[train_idx], x[test_idx])
    return ImageData(
        "digits", tr, torch.from_numpy(y[train_idx]), te, torch.from_numpy(y[test_idx]), 10
    )


def make_synthetic(
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    *,
    n_train: int = 1024,
    n_test: int = 256,
    seed: int = 0,
) -> ImageData:
    """Gaussian inputs ``x ~ N(0, I)`` labelled by a random linear teacher ``y = argmax(W x)``.

    Learnable (so accuracies move) and of any shape, for benchmarks and tests.

    Args:
        in_shape: ``(channels, height, width)``.
        num_classes: Number of classes C.
        n_train: Training examples.
        n_test: Test examples.
        seed: Seed of inputs and teacher.
    """
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape!r}")
    if n_train < 1 or n_test < 1 or num_classes < 2:
        raise ValueError("synthetic data needs n_train >= 1, n_test >= 1 and num_classes >= 2")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, *shape, generator=g)
    teacher = torch.randn(int(np.prod(shape)), num_classes, generator=g)
    y = (x.flatten(1) @ teacher).argmax(dim=1)
    return ImageData("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    split_seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
) -> ImageData:
    """Load a data set by name.

    Args:
        name: ``"digits"``, ``"cifar10"``, ``"cifar100"`` or ``"synthetic"``.
        data_dir: Directory of the CIFAR files (required for CIFAR).
        download: Allow downloading CIFAR if missing.
        split_seed: Seed of the digits train/test split and of the synthetic data.
        max_train: Keep only the first ``max_train`` training examples (None: all).
        max_test: Keep only the first ``max_test`` test examples (None: all).
        in_shape: Input shape of the synthetic data.
        num_classes: Classes of the synthetic data.

    Raises:
        ValueError: Unknown name (the message lists the valid ones) or bad sizes.
        FileNotFoundError: CIFAR files missing.
    """
    for key, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise ValueError(f"{key} must be a positive integer or None, got {value}")
    if name == "digits":
        data = load_digits(split_seed=split_seed)
    elif name in CIFAR_LAYOUT:
        if data_dir is None:
            raise ValueError(
                f"{name} needs a data directory (CLI: --data-dir); "
                f"{_expected_layout(name, Path('<data-dir>'))}"
            )
        data = load_cifar(name, data_dir, download=download)
    elif name == "synthetic":
        data = make_synthetic(
            in_shape,
            num_classes,
            n_train=max_train or 1024,
            n_test=max_test or 256,
            seed=split_seed,
        )
    else:
        raise ValueError(
            f"unknown dataset {name!r}; valid datasets are: {', '.join(DATASET_NAMES)}"
        )
    return data.subset(max_train, max_test)
