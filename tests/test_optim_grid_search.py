"""The paper's SGD baseline: the ten learning rates and picking the best run by a named metric."""

import math

import numpy as np
import pytest

from hessian_lab.optim import SGD_LEARNING_RATES, best_run, grid_search, sgd_learning_rates


def test_the_papers_grid():
    assert len(SGD_LEARNING_RATES) == 10
    np.testing.assert_allclose(SGD_LEARNING_RATES, np.geomspace(1e-5, 3e-1, 10), rtol=0)
    assert SGD_LEARNING_RATES[0] == pytest.approx(1e-5) and SGD_LEARNING_RATES[-1] == pytest.approx(
        0.3
    )
    assert sgd_learning_rates(num=3, low=1e-2, high=1.0) == pytest.approx([1e-2, 1e-1, 1.0])


def test_best_run_direction_is_explicit_and_nan_never_wins():
    runs = {
        0.1: {"acc": 0.5, "loss": 1.0},
        0.01: {"acc": 0.7, "loss": 0.8},
        0.3: {"acc": math.nan, "loss": math.inf},
    }
    assert best_run(runs, "acc", "max")[0] == 0.01
    assert best_run(runs, "loss", "min")[0] == 0.01
    assert best_run({1: {"loss": 2.0}, 2: {"loss": 1.0}}, "loss", "max")[0] == 1
    with pytest.raises(ValueError, match="higher is better"):
        best_run(runs, "acc", "maximize")
    with pytest.raises(KeyError, match="accuracy"):
        best_run(runs, "accuracy", "max")
    with pytest.raises(ValueError, match="diverged"):
        best_run({0.3: {"loss": math.nan}}, "loss", "min")


def test_grid_search_trains_every_rate():
    seen = []

    def train(lr):
        seen.append(lr)
        return {"final_loss": abs(math.log10(lr) + 2.5)}

    result = grid_search(train, "final_loss", "min")
    assert seen == list(SGD_LEARNING_RATES)
    assert result.best_lr == pytest.approx(SGD_LEARNING_RATES[5])  # 3.07e-3, nearest to 10^-2.5
    assert set(result.runs) == set(SGD_LEARNING_RATES)
    with pytest.raises(ValueError):
        grid_search(train, "final_loss", "lowest")
