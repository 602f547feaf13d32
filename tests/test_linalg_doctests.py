"""The examples in the linalg docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "hessian_lab.linalg.lanczos",
    "hessian_lab.linalg.eigsh",
    "hessian_lab.linalg.spectral_density",
    "hessian_lab.linalg.trace",
    "hessian_lab.linalg.diagonal",
    "hessian_lab.linalg.monte_carlo",
    "hessian_lab.linalg.cg",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
