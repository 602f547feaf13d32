"""Data that changes between passes is detected, never silently averaged (issue 10, #5).

An operator over a DataLoader that it streams (``cache=False``, or the default for a loader) reads
the loader once at construction (to count N) and again for every product. A loader whose batches
differ from one pass to the next (``shuffle=True``, ``drop_last=True`` with shuffling, a data set
with random augmentation) makes the products of one operator inconsistent (two products with the
same vector differ; Lanczos then blames its step count). The product that sees the change must
raise a ValueError that names the cause and the fix (``shuffle=False`` or ``cache=True``). A
deterministic loader must never raise; with ``cache=True`` the loader is read once and the
products agree exactly.
"""

import functools

import pytest
import torch
from operator_helpers import OPERATORS, make_operator, rel_err
from reference_models import (
    FlatModel,
    assert_reference_valid,
    build_reference,
    raises,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import hessian_lab
from hessian_lab import GGNOperator, HessianOperator

TOL = 1e-10
N, D, C = 12, 4, 3


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double().eval()


@functools.cache
def tensors():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, C, (N,), generator=gen)


@functools.cache
def reference():
    x, y = tensors()
    return build_reference(FlatModel(model()), nn.CrossEntropyLoss(), [(x, y)], "mean")


def test_reference_matches_finite_differences():
    assert_reference_valid(reference())


class CountingDataset(Dataset):
    """The examples, counting how often they are read; ``noise`` > 0 is a random augmentation."""

    def __init__(self, noise=0.0):
        self.noise, self.reads = noise, 0

    def __len__(self):
        return N

    def __getitem__(self, i):
        self.reads += 1
        x, y = tensors()
        if self.noise:
            return x[i] + self.noise * torch.randn(D, dtype=torch.float64), y[i]
        return x[i], y[i]


def loader(cause, dataset=None):
    ds = dataset if dataset is not None else CountingDataset(0.1 if cause == "augmentation" else 0)
    gen = torch.Generator().manual_seed(2)
    if cause == "shuffle":
        return DataLoader(ds, batch_size=4, shuffle=True, generator=gen)
    if cause == "drop_last":  # shuffled, and a different 2 of the 12 examples dropped each pass
        return DataLoader(ds, batch_size=5, shuffle=True, drop_last=True, generator=gen)
    if cause == "augmentation":
        return DataLoader(ds, batch_size=4, shuffle=False)
    raise KeyError(cause)


CAUSE_WORDS = {
    "shuffle": ("shuffle", "shuffle=False", "cache=True"),
    "drop_last": ("drop_last", "cache=True"),
    "augmentation": ("random augmentation", "cache=True"),
}
# A shuffle that only reorders the same examples leaves the operator unchanged up to rounding:
# the library warns (naming the shuffle and the fix) and keeps computing; real changes raise.
CHANGING = [cause for cause in CAUSE_WORDS if cause != "shuffle"]
STREAMED = [{"cache": False}, {}]  # explicitly, and the default for a DataLoader
STREAMED_IDS = ["cache_false", "cache_default"]


def _products_until_error(op, count=3):
    v = torch.ones(op.num_params, dtype=torch.float64)
    for _ in range(count):
        op @ v


@pytest.mark.parametrize("options", STREAMED, ids=STREAMED_IDS)
@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("cause", CHANGING)
def test_streamed_loader_that_changes_raises(cause, op_name, options):
    op = make_operator(op_name, model(), nn.CrossEntropyLoss(), loader(cause), **options)
    with raises(ValueError, *CAUSE_WORDS[cause]):
        _products_until_error(op)


@pytest.mark.parametrize("options", STREAMED, ids=STREAMED_IDS)
@pytest.mark.parametrize("op_name", OPERATORS)
def test_streamed_loader_that_only_reorders_warns_and_is_exact(op_name, options):
    op = make_operator(op_name, model(), nn.CrossEntropyLoss(), loader("shuffle"), **options)
    v = torch.ones(op.num_params, dtype=torch.float64)
    with pytest.warns(UserWarning) as record:
        products = [op @ v for _ in range(3)]
    for word in CAUSE_WORDS["shuffle"]:
        assert any(word in str(w.message) for w in record), word
    for p in products:
        assert rel_err(p, reference().matrix(op_name) @ v) <= TOL


@pytest.mark.parametrize("cause", CHANGING)
def test_quadratic_forms_and_gradients_see_the_change_too(cause):
    op = GGNOperator(model(), nn.CrossEntropyLoss(), loader(cause), cache=False)
    v = torch.ones(op.num_params, dtype=torch.float64)
    with raises(ValueError, *CAUSE_WORDS[cause]):
        for _ in range(3):
            op.quadratic_form(v)
    op = HessianOperator(model(), nn.CrossEntropyLoss(), loader(cause), cache=False)
    with raises(ValueError, *CAUSE_WORDS[cause]):
        for _ in range(3):
            op.gradient()


@pytest.mark.parametrize("cause", CHANGING)
def test_eigsh_on_a_changing_loader_names_the_cause_not_num_steps(cause):
    op = GGNOperator(model(), nn.CrossEntropyLoss(), loader(cause), cache=False)
    with raises(ValueError, *CAUSE_WORDS[cause]):
        hessian_lab.eigsh(op, k=2)


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("cause", list(CAUSE_WORDS))
def test_cached_loader_is_read_once_and_products_agree_exactly(cause, op_name):
    ds = CountingDataset(0.1 if cause == "augmentation" else 0.0)
    op = make_operator(op_name, model(), nn.CrossEntropyLoss(), loader(cause, ds), cache=True)
    reads = ds.reads
    assert reads == (10 if cause == "drop_last" else N)  # one pass (drop_last: 2 batches of 5)
    V = torch.randn(op.num_params, 2, generator=torch.Generator().manual_seed(3)).double()
    first = op.matmat(V)
    for _ in range(2):
        assert torch.equal(op.matmat(V), first)
    assert torch.equal(op.quadratic_form(V[:, 0]), op.quadratic_form(V[:, 0]))
    assert torch.equal(op.gradient(), op.gradient())
    assert ds.reads == reads
    if cause == "shuffle":  # every example once: the data set's operator, whatever the order
        ref = reference()
        assert rel_err(first, ref.matrix(op_name) @ V) <= TOL


DETERMINISTIC = {
    "plain": dict(batch_size=5),  # batches of 5, 5, 2
    "drop_last_no_shuffle": dict(batch_size=5, drop_last=True),  # the same 10 every pass
    "one_batch": dict(batch_size=N),
}


@pytest.mark.parametrize("options", STREAMED, ids=STREAMED_IDS)
@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("layout", list(DETERMINISTIC))
def test_deterministic_loader_never_raises(layout, op_name, options):
    x, y = tensors()
    dl = DataLoader(TensorDataset(x, y), shuffle=False, **DETERMINISTIC[layout])
    op = make_operator(op_name, model(), nn.CrossEntropyLoss(), dl, **options)
    V = torch.randn(op.num_params, 2, generator=torch.Generator().manual_seed(4)).double()
    first = op.matmat(V)
    for _ in range(3):
        assert rel_err(op.matmat(V), first) <= 1e-15
        op.quadratic_form(V[:, 0])
        op.gradient()
    if layout == "drop_last_no_shuffle":
        ref = build_reference(FlatModel(model()), nn.CrossEntropyLoss(), [(x[:10], y[:10])], "mean")
    else:
        ref = reference()
    assert rel_err(first, ref.matrix(op_name) @ V) <= TOL


def test_eigsh_on_a_deterministic_streamed_loader_matches_reference():
    x, y = tensors()
    dl = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=False)
    op = GGNOperator(model(), nn.CrossEntropyLoss(), dl, cache=False)
    res = hessian_lab.eigsh(op, k=2)
    want = torch.linalg.eigvalsh(reference().ggn)[-2:]
    assert bool(res.converged.all()) and rel_err(res.eigenvalues, want) <= 1e-8
