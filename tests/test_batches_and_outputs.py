"""Any model output, any batch, progress bars (issue 10, #2, #3, #8).

One small two-input network is written so that the same parameters can be called as ``model(x)``
(one tensor), ``model(a, b)`` (a tuple or list) or ``model(a=a, b=b)`` (a dict), and can return
its prediction as a tensor, a dict or an object with ``logits``, a Hugging Face ``ModelOutput``,
or something only an ``output_fn`` can read. Every variant must give the products of the plain
tensor-in, tensor-out network, which the dense reference (tests/reference_models.py) computes.
With the "mean" reduction the risk over batches is (1/N) Σ_n ℓ_n however the N examples are
split, so one reference serves every data layout; a wrong weighting of the batches shows.
"""

import copy
import functools
import types

import pytest
import torch
import torch.nn.functional as F
from operator_helpers import OPERATORS, make_operator, rel_err
from reference_models import (
    FlatModel,
    assert_reference_valid,
    build_reference,
    raises,
    random_vectors,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import hessian_lab
from hessian_lab import ADLER, GGNOperator
from hessian_lab.optim import StepSizeEstimator
from hessian_lab.optim.step_size import step_size

TOL = 1e-10
N, DA, DB, C = 8, 4, 3, 3
SPLIT = (3, 5)
LOADER_BATCH = 3  # batches of 3, 3, 2


class Prediction:
    """An output object with a ``logits`` attribute (and something else)."""

    def __init__(self, logits, hidden):
        self.logits, self.hidden = logits, hidden


class Net(nn.Module):
    """z = head(tanh(A a + B b)); called as net(x), net(a, b) or net(a=a, b=b).

    ``output`` chooses what forward returns: "tensor", "dict" ({"logits", "hidden"}),
    "attribute" (an object with ``.logits``), "model_output" (transformers'
    ``SequenceClassifierOutput``), "tuple" ((z, h)), "dict_without_logits" ({"scores": z}),
    "object_without_logits" (a namespace with ``.scores``).
    """

    def __init__(self, output="tensor"):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(DA, 6)
        self.b = nn.Linear(DB, 6)
        self.head = nn.Linear(6, C)
        self.output = output
        self.double()

    def forward(self, *args, **kwargs):
        if kwargs:
            a, b = kwargs["a"], kwargs["b"]
        elif len(args) == 2:
            a, b = args
        else:
            (x,) = args
            a, b = x[:, :DA], x[:, DA:]
        h = torch.tanh(self.a(a) + self.b(b))
        z = self.head(h)
        kind = self.output
        if kind == "tensor":
            return z
        if kind == "dict":
            return {"logits": z, "hidden": h}
        if kind == "attribute":
            return Prediction(z, h)
        if kind == "model_output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=z, hidden_states=(h,))
        if kind == "tuple":
            return z, h
        if kind == "dict_without_logits":
            return {"scores": z}
        if kind == "object_without_logits":
            return types.SimpleNamespace(scores=z)
        raise KeyError(kind)


@functools.cache
def tensors():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(N, DA, generator=gen, dtype=torch.float64)
    b = torch.randn(N, DB, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    return a, b, y


@functools.cache
def reference():
    a, b, y = tensors()
    x = torch.cat([a, b], dim=1)
    return build_reference(FlatModel(Net()), nn.CrossEntropyLoss(), [(x, y)], "mean")


def test_reference_matches_finite_differences():
    assert_reference_valid(reference())


def check_operator(op, op_name, seed=0):
    ref = reference()
    assert op.param_names == ref.flat.names
    assert op.num_examples == N
    R = ref.matrix(op_name)
    V = random_vectors(op.num_params, 2, seed=seed)
    assert rel_err(op.matmat(V), R @ V) <= TOL
    assert rel_err(op.quadratic_form(V[:, 0]), V[:, 0] @ R @ V[:, 0]) <= TOL
    assert rel_err(op.gradient(), ref.gradient) <= TOL
    assert rel_err(op.loss(), ref.loss) <= TOL


# ------------------------------------------------------------------------------------------------
# Model outputs.

READABLE = ("tensor", "dict", "attribute", "model_output")
NEEDS_OUTPUT_FN = {
    "tuple": lambda out: out[0],
    "dict_without_logits": lambda out: out["scores"],
    "object_without_logits": lambda out: out.scores,
}


def _x():
    a, b, y = tensors()
    return torch.cat([a, b], dim=1), y


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("output", READABLE + tuple(NEEDS_OUTPUT_FN))
def test_any_output_matches_reference(output, op_name):
    if output == "model_output":
        pytest.importorskip("transformers")
    kwargs = {"output_fn": NEEDS_OUTPUT_FN[output]} if output in NEEDS_OUTPUT_FN else {}
    op = make_operator(op_name, Net(output), nn.CrossEntropyLoss(), _x(), **kwargs)
    check_operator(op, op_name)


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("output", list(NEEDS_OUTPUT_FN))
def test_unreadable_output_raises_naming_output_fn(output, op_name):
    x, y = _x()
    with raises(TypeError, "output_fn"):
        op = make_operator(op_name, Net(output), nn.CrossEntropyLoss(), (x, y))
        op @ torch.zeros(op.num_params, dtype=torch.float64)
        op.gradient()


@pytest.mark.parametrize("output", list(NEEDS_OUTPUT_FN))
def test_unreadable_output_raises_in_the_optimizer(output):
    x, y = _x()
    with raises(TypeError, "output_fn"):
        ADLER(Net(output), nn.CrossEntropyLoss()).step(x, y)
    with raises(TypeError, "output_fn"):
        StepSizeEstimator(Net(output), nn.CrossEntropyLoss())(x, y)


@pytest.mark.parametrize("curvature", ["ggn", "ef", "hessian"])
@pytest.mark.parametrize("output", ["dict", "attribute", "tuple"])
def test_output_fn_in_step_sizes_and_adler(output, curvature):
    ref = reference()
    x, y = _x()
    kwargs = {"output_fn": NEEDS_OUTPUT_FN[output]} if output in NEEDS_OUTPUT_FN else {}
    loss_fn = nn.CrossEntropyLoss()
    eta = ref.eta(curvature)
    est = StepSizeEstimator(Net(output), loss_fn, curvature, **kwargs)
    assert rel_err(est(x, y).eta, eta) <= TOL
    assert rel_err(step_size(Net(output), loss_fn, x, y, curvature, **kwargs).eta, eta) <= TOL
    model = Net(output)
    rec = ADLER(model, loss_fn, curvature=curvature, **kwargs).step(x, y)
    assert rel_err(rec.eta, eta) <= TOL
    theta1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert rel_err(theta1 - ref.theta, -eta * ref.gradient) <= TOL


# ------------------------------------------------------------------------------------------------
# Inputs: a tensor, a tuple or list (model(*x)), a dict (model(**x)), in every data layout.


def _inputs(kind, a, b):
    return {
        "tensor": torch.cat([a, b], dim=-1),
        "tuple": (a, b),
        "list": [a, b],
        "dict": {"a": a, "b": b},
    }[kind]


class PairDataset(Dataset):
    """Items (inputs, y) with inputs of one kind; the default collate stacks them."""

    def __init__(self, kind):
        self.kind = kind

    def __len__(self):
        return N

    def __getitem__(self, i):
        a, b, y = tensors()
        return _inputs(self.kind, a[i], b[i]), y[i]


def _data(kind, layout):
    """(data, extra kwargs) for an input kind in a layout."""
    a, b, y = tensors()
    if layout == "one":
        return (_inputs(kind, a, b), y), {}
    if layout == "one_as_list":  # [inputs, targets], as a DataLoader yields it
        return [_inputs(kind, a, b), y], {}
    if layout == "list":
        parts = zip(a.split(SPLIT), b.split(SPLIT), y.split(SPLIT), strict=True)
        return [(_inputs(kind, pa, pb), py) for pa, pb, py in parts], {}
    loader = DataLoader(PairDataset(kind), batch_size=LOADER_BATCH, shuffle=False)
    return loader, ({"cache": True} if layout == "loader_cached" else {})


INPUT_KINDS = ("tensor", "tuple", "list", "dict")
LAYOUTS = ("one", "one_as_list", "list", "loader", "loader_cached")


# Each (input kind, layout) with one operator, rotating so that every kind and every layout
# meets H, Q and GN (20 operators instead of 60: the 2-core CI budget).
INPUT_GRID = [
    (kind, layout, ("hessian", "ggn", "fisher")[i % 3])
    for i, (kind, layout) in enumerate((k, la) for k in INPUT_KINDS for la in LAYOUTS)
]


@pytest.mark.parametrize("kind, layout, op_name", INPUT_GRID, ids=["-".join(c) for c in INPUT_GRID])
def test_any_inputs_in_any_layout_match_reference(kind, layout, op_name):
    data, kwargs = _data(kind, layout)
    op = make_operator(op_name, Net(), nn.CrossEntropyLoss(), data, **kwargs)
    check_operator(op, op_name)


def test_two_tensor_inputs_are_one_batch_not_two():
    """((a, b), y) is one batch with a tuple input (it used to be read as a list of batches)."""
    a, b, y = tensors()
    op = GGNOperator(Net(), nn.CrossEntropyLoss(), ((a, b), y))
    assert op.num_examples == N
    check_operator(op, "ggn")


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_adler_and_step_size_take_any_inputs(kind):
    ref = reference()
    a, b, y = tensors()
    inputs = _inputs(kind, a, b)
    loss_fn = nn.CrossEntropyLoss()
    for curvature in ("ggn", "hessian"):
        eta = ref.eta(curvature)
        assert rel_err(StepSizeEstimator(Net(), loss_fn, curvature)(inputs, y).eta, eta) <= TOL
        assert rel_err(step_size(Net(), loss_fn, inputs, y, curvature).eta, eta) <= TOL
        model = Net()
        rec = ADLER(model, loss_fn, curvature=curvature).step(inputs, y)
        assert rel_err(rec.eta, eta) <= TOL
        theta1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert rel_err(theta1 - ref.theta, -eta * ref.gradient) <= TOL


# ------------------------------------------------------------------------------------------------
# batch_fn: items of any shape mapped to (inputs, targets).


def _to_pair(item):
    return {"a": item["a"], "b": item["b"]}, item["labels"]


class DictDataset(Dataset):
    """Hugging Face style items: one dict with the inputs and "labels"."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        a, b, y = tensors()
        return {"a": a[i], "b": b[i], "labels": y[i]}


def _batch_fn_data(layout):
    a, b, y = tensors()
    if layout == "one_dict":
        return {"a": a, "b": b, "labels": y}, _to_pair
    if layout == "list_of_dicts":
        parts = zip(a.split(SPLIT), b.split(SPLIT), y.split(SPLIT), strict=True)
        return [{"a": pa, "b": pb, "labels": py} for pa, pb, py in parts], _to_pair
    if layout == "loader_of_dicts":
        return DataLoader(DictDataset(), batch_size=LOADER_BATCH), _to_pair
    x = torch.cat([a, b], dim=1)
    if layout == "one_swapped_pair":  # (targets, inputs): a pair, so one batch
        return (y, x), lambda item: (item[1], item[0])
    if layout == "list_of_swapped_pairs":
        return [(py, px) for px, py in zip(x.split(SPLIT), y.split(SPLIT), strict=True)], (
            lambda item: (item[1], item[0])
        )
    raise KeyError(layout)


BATCH_FN_LAYOUTS = (
    "one_dict",
    "list_of_dicts",
    "loader_of_dicts",
    "one_swapped_pair",
    "list_of_swapped_pairs",
)


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("layout", BATCH_FN_LAYOUTS)
def test_batch_fn_matches_reference(layout, op_name):
    data, batch_fn = _batch_fn_data(layout)
    op = make_operator(op_name, Net(), nn.CrossEntropyLoss(), data, batch_fn=batch_fn)
    check_operator(op, op_name)


# ------------------------------------------------------------------------------------------------
# How examples are counted: the first dimension of the targets.


class TimeMajorNet(nn.Module):
    """Inputs [T, B, F] (time first, as nn.RNN's default), outputs [B, C]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.inp = nn.Linear(DA, 5)
        self.head = nn.Linear(5, C)
        self.double()

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x)).mean(0))


@functools.cache
def time_major_case():
    gen = torch.Generator().manual_seed(3)
    steps = 4  # T = 4 for every batch; B = 2 and 5
    batches = [
        (torch.randn(steps, n, DA, generator=gen, dtype=torch.float64), torch.randint(0, C, (n,)))
        for n in (2, 5)
    ]
    model = TimeMajorNet()
    ref = build_reference(
        FlatModel(model),
        nn.CrossEntropyLoss(),
        batches,
        "mean",
        slice_fn=lambda x, i: x[:, i : i + 1],  # example i is column i of a [T, B, F] batch
    )
    return model, batches, ref


def test_time_major_reference_matches_finite_differences():
    assert_reference_valid(time_major_case()[2])


@pytest.mark.parametrize("op_name", OPERATORS)
def test_examples_are_counted_from_the_targets(op_name):
    """Weights 2/7 and 5/7 (the targets' first dimension), not 4/8 (the inputs')."""
    model, batches, ref = time_major_case()
    op = make_operator(op_name, model, nn.CrossEntropyLoss(), batches)
    assert op.num_examples == 7
    V = random_vectors(op.num_params, 2, seed=4)
    assert rel_err(op.matmat(V), ref.matrix(op_name) @ V) <= TOL
    assert rel_err(op.gradient(), ref.gradient) <= TOL


@pytest.mark.parametrize("counting", ["ignored_targets", "class_weights"])
def test_cross_entropy_mean_counts_non_ignored_targets_with_batch_fn(counting):
    """Over batches, a class-index CE "mean" equals the CE of all the data as one batch.

    Its denominators are the non-ignored targets (2 + 4 of 3 + 5 here) or the summed class
    weights of the targets, not the batch sizes.
    """
    a, b, y = tensors()
    if counting == "ignored_targets":
        loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
        y = y.clone()
        y[[1, 6]] = -100  # one ignored target in each batch
    else:
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.5, 0.5], dtype=torch.float64))
    x = torch.cat([a, b], dim=1)
    ref = build_reference(FlatModel(Net()), loss_fn, [(x, y)], "mean", per_example=False)
    items = [
        {"a": pa, "b": pb, "labels": py}
        for pa, pb, py in zip(a.split(SPLIT), b.split(SPLIT), y.split(SPLIT), strict=True)
    ]
    for op_name in ("hessian", "ggn"):
        op = make_operator(op_name, Net(), loss_fn, items, batch_fn=_to_pair)
        V = random_vectors(op.num_params, 2, seed=5)
        assert rel_err(op.matmat(V), ref.matrix(op_name) @ V) <= TOL
        assert rel_err(op.loss(), ref.loss) <= TOL


# ------------------------------------------------------------------------------------------------
# Batches that are not understood.


def _bad_data():
    a, b, y = tensors()
    x = torch.cat([a, b], dim=1)
    return {
        "list_of_tensors": ([x, x, x], None),
        "triple": ([(x, y, y)], None),
        "dict_without_batch_fn": ({"a": a, "b": b, "labels": y}, None),
        "string_inputs": (("not a tensor", y), None),
        "batch_fn_returns_a_tensor": ({"a": a, "b": b, "labels": y}, lambda item: item["a"]),
        "batch_fn_returns_a_triple": ([(x, y)], lambda item: (item[0], item[1], item[1])),
    }


@pytest.mark.parametrize("op_name", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("bad", list(_bad_data()))
def test_batch_not_understood_raises_naming_batch_fn(bad, op_name):
    data, batch_fn = _bad_data()[bad]
    kwargs = {} if batch_fn is None else {"batch_fn": batch_fn}
    with raises(TypeError, "batch_fn"):
        op = make_operator(op_name, Net(), nn.CrossEntropyLoss(), data, **kwargs)
        op @ torch.zeros(op.num_params, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Batches on another device are moved to the parameters' device.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("layout", ["one", "list", "loader"])
@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
def test_cpu_batches_are_moved_to_a_cuda_model(kind, layout):
    data, kwargs = _data(kind, layout)
    ref = reference()
    for op_name in ("hessian", "ggn", "fisher"):
        op = make_operator(op_name, Net().cuda(), nn.CrossEntropyLoss(), data, **kwargs)
        assert op.device.type == "cuda"
        V = random_vectors(op.num_params, 2, seed=6).cuda()
        assert rel_err(op.matmat(V), ref.matrix(op_name) @ V.cpu()) <= TOL
    a, b, y = tensors()
    model = Net().cuda()
    rec = ADLER(model, nn.CrossEntropyLoss()).step(_inputs(kind, a, b), y)
    assert rel_err(rec.eta, ref.eta("ggn")) <= TOL


# ------------------------------------------------------------------------------------------------
# progress=: a pass of an operator over a DataLoader, and the long linear-algebra routines.


def _loader():
    a, b, y = tensors()
    return DataLoader(TensorDataset(torch.cat([a, b], dim=1), y), batch_size=LOADER_BATCH)


@pytest.mark.parametrize("op_name", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("progress", [True, False], ids=["progress", "quiet"])
def test_operator_progress_over_a_dataloader(op_name, progress, capsys):
    capsys.readouterr()
    op = make_operator(op_name, Net(), nn.CrossEntropyLoss(), _loader(), progress=progress)
    op @ torch.ones(op.num_params, dtype=torch.float64)
    err = capsys.readouterr().err
    assert bool(err.strip()) is progress, repr(err)


def test_operator_progress_is_off_by_default(capsys):
    capsys.readouterr()
    op = GGNOperator(Net(), nn.CrossEntropyLoss(), _loader())
    op @ torch.ones(op.num_params, dtype=torch.float64)
    assert capsys.readouterr().err == ""


def _spd(n=30):
    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(1.0, 10.0, n, dtype=torch.float64)) @ q.T


ROUTINES = {
    "eigsh": lambda A, **kw: hessian_lab.eigsh(A, k=2, **kw),
    "spectral_density": lambda A, **kw: hessian_lab.spectral_density(
        A, num_probes=3, num_steps=8, **kw
    ),
    "hutchinson_trace": lambda A, **kw: hessian_lab.hutchinson_trace(A, num_probes=8, **kw),
    "hutchpp_trace": lambda A, **kw: hessian_lab.hutchpp_trace(A, num_matvecs=9, **kw),
    "hutchinson_diagonal": lambda A, **kw: hessian_lab.hutchinson_diagonal(A, num_probes=4, **kw),
    "cg": lambda A, **kw: hessian_lab.cg(A, torch.ones(A.shape[0], dtype=A.dtype), **kw),
}


@pytest.mark.parametrize("progress", [True, False, None], ids=["progress", "quiet", "default"])
@pytest.mark.parametrize("routine", list(ROUTINES))
def test_linear_algebra_progress(routine, progress, capsys):
    A = _spd()
    kwargs = {} if progress is None else {"progress": progress}
    capsys.readouterr()
    ROUTINES[routine](A, **kwargs)
    err = capsys.readouterr().err
    assert bool(err.strip()) is bool(progress), repr(err)


def test_linear_algebra_progress_on_an_operator(capsys):
    op = GGNOperator(copy.deepcopy(Net()), nn.CrossEntropyLoss(), _x())
    capsys.readouterr()
    hessian_lab.eigsh(op, k=1, progress=True)
    assert capsys.readouterr().err.strip()
    hessian_lab.eigsh(op, k=1)
    assert capsys.readouterr().err == ""


def test_functional_loss_reads_prediction_not_output():
    """A loss written for tensors gets the tensor: the output object never reaches it."""
    seen = []

    def loss_fn(z, t):
        seen.append(type(z))
        return F.cross_entropy(z, t)

    op = GGNOperator(Net("dict"), loss_fn, _x(), reduction="mean")
    op @ torch.ones(op.num_params, dtype=torch.float64)
    assert seen and all(issubclass(t, torch.Tensor) for t in seen)
