"""Bad input gets a clear error naming the problem, never a silent wrong number (issue 2, #4)."""

import numpy as np
import pytest
import torch
from operator_helpers import OPERATORS, make_operator, needs_cuda
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessian_lab import EmpiricalFisherOperator, GGNOperator, HessianOperator

CLASSES = [HessianOperator, GGNOperator, EmpiricalFisherOperator]


def _net(*middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), *middle, nn.Tanh(), nn.Linear(5, 3)).double()


def _data(n: int = 6):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,))


P = 4 * 5 + 5 + 5 * 3 + 3


@pytest.fixture(params=OPERATORS)
def op(request):
    return make_operator(request.param, _net(), nn.CrossEntropyLoss(), _data())


def _raises(exc, *words):
    """pytest.raises that also checks each word appears in the message."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(exc)
            self._info = self._ctx.__enter__()
            return self._info

        def __exit__(self, *args):
            handled = self._ctx.__exit__(*args)  # fails if nothing was raised
            if handled:  # the expected type: the message must name the problem
                message = str(self._info.value)
                for word in words:
                    assert word in message, f"{word!r} not in error message {message!r}"
            return handled

    return _Check()


# ------------------------------------------------------------------------------------------------
# Vectors.


def test_operator_size(op):
    assert op.num_params == P


@pytest.mark.parametrize("bad", [P - 1, P + 1])
def test_vector_of_wrong_length(op, bad):
    with _raises(ValueError, "shape", f"P={P}", f"({bad},)"):
        op.matvec(torch.zeros(bad, dtype=torch.float64))
    with _raises(ValueError, f"P={P}"):
        op.quadratic_form(torch.zeros(bad, dtype=torch.float64))
    with _raises(ValueError, "[P, k]", f"P={P}"):
        op.matmat(torch.zeros(bad, 2, dtype=torch.float64))
    with _raises(ValueError, f"P={P}"):
        op @ torch.zeros(bad, dtype=torch.float64)


def test_matrix_where_a_vector_belongs_and_back(op):
    with _raises(ValueError, "[P, k]"):
        op.matmat(torch.zeros(P, dtype=torch.float64))
    with _raises(ValueError, "[P]"):
        op.matvec(torch.zeros(P, 2, dtype=torch.float64))
    with _raises(ValueError, "[P]"):
        op.quadratic_form(torch.zeros(P, 1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.complex128])
def test_vector_of_wrong_dtype(op, dtype):
    with _raises(ValueError, "dtype", str(dtype), "torch.float64"):
        op.matvec(torch.zeros(P, dtype=dtype))
    with _raises(ValueError, "dtype", str(dtype)):
        op.matmat(torch.zeros(P, 2, dtype=dtype))
    with _raises(ValueError, "dtype", str(dtype)):
        op.quadratic_form(torch.zeros(P, dtype=dtype))


@needs_cuda
def test_vector_on_wrong_device(op):
    with _raises(ValueError, "cuda", "cpu"):
        op.matvec(torch.zeros(P, dtype=torch.float64, device="cuda"))
    with _raises(ValueError, "cuda", "cpu"):
        op.quadratic_form(torch.zeros(P, dtype=torch.float64, device="cuda"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_vector(op, value):
    v = torch.ones(P, dtype=torch.float64)
    v[3] = value
    with _raises(ValueError, "NaN or infinite"):
        op.matvec(v)
    with _raises(ValueError, "NaN or infinite"):
        op.quadratic_form(v)
    V = torch.ones(P, 2, dtype=torch.float64)
    V[5, 1] = value
    with _raises(ValueError, "NaN or infinite"):
        op.matmat(V)


def test_numpy_vector_is_refused_with_a_pointer_to_to_scipy(op):
    with _raises(TypeError, "torch.Tensor", "to_scipy"):
        op.matvec(np.zeros(P))


# ------------------------------------------------------------------------------------------------
# Models.


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "layer, word",
    [
        (nn.BatchNorm1d(5), "BatchNorm1d"),
        (nn.Dropout(0.5), "Dropout"),
        (nn.AlphaDropout(0.2), "AlphaDropout"),
    ],
)
def test_train_mode_layers_raise_and_suggest_eval(cls, layer, word):
    model = _net(layer).train()
    with _raises(ValueError, "model.eval()", "train mode", word, "allow_train_mode=True"):
        cls(model, nn.CrossEntropyLoss(), _data())
    # The opt-in accepts the model (and gives finite products of the train-mode function).
    op = cls(model, nn.CrossEntropyLoss(), _data(), allow_train_mode=True)
    assert torch.isfinite(op.matvec(torch.ones(op.num_params, dtype=torch.float64))).all()
    # In eval mode the same model is accepted without the opt-in.
    cls(model.eval(), nn.CrossEntropyLoss(), _data())


class _SelfAttention(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


def test_attention_dropout_in_train_mode_raises():
    # nn.MultiheadAttention's dropout is a float, not a Dropout module: it must be seen too.
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    model = _SelfAttention(dropout=0.1).double().train()
    with _raises(ValueError, "model.eval()", "train mode", "MultiheadAttention", "dropout"):
        GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    GGNOperator(model.eval(), nn.CrossEntropyLoss(), (x, y))
    GGNOperator(_SelfAttention(dropout=0.0).double().train(), nn.CrossEntropyLoss(), (x, y))


def test_train_mode_without_coupling_or_randomness_is_accepted():
    model = _net(nn.Dropout(0.0)).train()  # p = 0: deterministic
    op = GGNOperator(model, nn.CrossEntropyLoss(), _data())
    assert op.num_params == P


@pytest.mark.parametrize("model", [lambda z: z, "net"])
def test_model_must_be_a_module(model):
    with _raises(TypeError, "nn.Module"):
        GGNOperator(model, nn.CrossEntropyLoss(), _data())


# ------------------------------------------------------------------------------------------------
# Data.


def _empty_cases():
    x, y = _data()
    return {
        "empty list": [],
        "zero-example batch": (x[:0], y[:0]),
        "list of zero-example batches": [(x[:0], y[:0]), (x[:0], y[:0])],
        "empty DataLoader": DataLoader(TensorDataset(x[:0], y[:0]), batch_size=2),
    }


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("which", list(_empty_cases()))
def test_empty_data(cls, which):
    with _raises(ValueError, "empty"):
        cls(_net(), nn.CrossEntropyLoss(), _empty_cases()[which])


@pytest.mark.parametrize("data", [5, None, torch.zeros(3)], ids=["int", "None", "tensor"])
def test_data_that_is_not_batches(data):
    with _raises(TypeError, "(inputs, targets)"):
        GGNOperator(_net(), nn.CrossEntropyLoss(), data)


def test_list_with_a_malformed_batch():
    x, y = _data()
    with _raises(TypeError, "Batch 1", "(inputs, targets)"):
        GGNOperator(_net(), nn.CrossEntropyLoss(), [(x, y), (x, y, y)])


@needs_cuda
def test_data_on_another_device_is_moved_to_the_parameters():
    x, y = _data()
    on_gpu = GGNOperator(_net(), nn.CrossEntropyLoss(), (x.cuda(), y.cuda()))
    on_cpu = GGNOperator(_net(), nn.CrossEntropyLoss(), (x, y))
    v = torch.ones(P, dtype=torch.float64)
    assert torch.allclose(on_gpu.matvec(v), on_cpu.matvec(v), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# Losses.


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("loss_cls", [nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss])
def test_reduction_none(cls, loss_cls):
    with _raises(ValueError, "reduction='none'", "'mean'", "'sum'"):
        cls(_net(), loss_cls(reduction="none"), _data())


@pytest.mark.parametrize("cls", CLASSES)
def test_callable_returning_per_example_losses(cls):
    def loss(z, y):
        return nn.functional.cross_entropy(z, y, reduction="none")

    with _raises(ValueError, "scalar", "(6,)"):
        # reduction declared, so that GN's "declare the reduction" error does not come first
        op = cls(_net(), loss, _data(), reduction="mean")
        op.matvec(torch.ones(P, dtype=torch.float64))


def test_loss_that_is_not_callable():
    with _raises(TypeError, "loss_fn", "callable"):
        GGNOperator(_net(), "cross_entropy", _data())


def test_unknown_fisher_mode():
    with _raises(ValueError, "mode='full'", "per_sample", "batch"):
        EmpiricalFisherOperator(_net(), nn.CrossEntropyLoss(), _data(), mode="full")


# ------------------------------------------------------------------------------------------------
# Parameters.


@pytest.mark.parametrize("cls", CLASSES)
def test_unknown_parameter_name(cls):
    with _raises(ValueError, "Unknown parameter", "'0.wieght'", "'0.weight'"):
        cls(_net(), nn.CrossEntropyLoss(), _data(), params=["0.wieght", "2.bias"])


def test_parameter_names_as_one_string():
    with _raises(TypeError, "list of parameter names", "'0.weight'"):
        GGNOperator(_net(), nn.CrossEntropyLoss(), _data(), params="0.weight")


def test_repeated_parameter_name():
    with _raises(ValueError, "more than once"):
        GGNOperator(_net(), nn.CrossEntropyLoss(), _data(), params=["0.bias", "0.bias"])


def test_empty_selection():
    with _raises(ValueError, "No parameters"):
        GGNOperator(_net(), nn.CrossEntropyLoss(), _data(), params=[])
    model = _net()
    model.requires_grad_(False)
    with _raises(ValueError, "No parameters", "requires_grad"):
        GGNOperator(model, nn.CrossEntropyLoss(), _data())


def test_parameters_of_different_dtypes():
    model = _net()
    model[2].float()
    with _raises(ValueError, "dtypes", "torch.float32", "torch.float64"):
        GGNOperator(model, nn.CrossEntropyLoss(), _data())


@needs_cuda
def test_parameters_on_different_devices():
    model = _net()
    model[2].cuda()
    with _raises(ValueError, "different devices", "cuda", "cpu"):
        GGNOperator(model, nn.CrossEntropyLoss(), _data())
