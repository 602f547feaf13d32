"""A user's own model and data set, as the runner's factories receive them (tests only).

Importable as ``user_factories`` from the tests (pytest puts ``tests/`` on ``sys.path``); child
processes get it through ``PYTHONPATH``.
"""

import numpy as np
import torch
from torch import nn


def small_mlp(in_shape, num_classes, hidden: int = 8, activation: str = "tanh") -> nn.Module:
    """A two-layer perceptron with its own options (``hidden``) and no ``width``/``depth``."""
    features = int(np.prod(in_shape))
    act = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]()
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, hidden), act, nn.Linear(hidden, num_classes)
    )


def fixed_net(hidden: int = 4) -> nn.Module:
    """A factory that takes neither in_shape nor num_classes (they are not forced on it)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def not_a_model(in_shape, num_classes):
    """Returns something that is not a module."""
    return "a string"


def blobs(n_train: int = 96, n_test: int = 32, classes: int = 3, split_seed: int = 0):
    """Gaussian blobs in 6 dimensions, as a tuple of NumPy arrays (the short form)."""
    rng = np.random.RandomState(split_seed)
    centres = rng.normal(0, 3, size=(classes, 6))
    y = rng.randint(0, classes, size=n_train + n_test)
    x = (centres[y] + rng.normal(size=(len(y), 6))).astype(np.float32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def bad_data():
    """Returns neither ImageData nor a 4-tuple."""
    return {"x": torch.zeros(3)}
