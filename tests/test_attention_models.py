"""Attention just works (issue 10, #1): MHA, Transformer layers and SDPA in eval mode.

The models below are used as a user would: float64, ``model.eval()``, default global settings
(MHA fast path on, every SDPA backend allowed), no wrapper. In torch 2.13 on CPU that routes them
through fused kernels without forward-mode AD (``_native_multi_head_attention``,
``_transformer_encoder_layer_fwd``, ``_nested_tensor_from_mask``,
``_scaled_dot_product_flash_attention_for_cpu``) and without double backward
(``_scaled_dot_product_flash_attention_for_cpu_backward``); the last tests here prove that, so that
the products passing is the library's doing. The references (tests/reference_models.py) force
the math backend and the fast path off themselves, and are checked against finite differences.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from operator_helpers import OPERATORS, make_operator, rel_err
from reference_models import (
    DecoderNet,
    EncoderLayerNet,
    EncoderNet,
    FlatModel,
    MHANet,
    SDPANet,
    assert_reference_valid,
    attention_settings,
    build_reference,
    differentiable_attention,
    eval64,
    raises,
    random_vectors,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessian_lab import ADLER

TOL = 1e-10
CURVATURES = ("ggn", "ef", "ef_batch", "hessian")
BATCH, SEQ, D_IN = 5, 5, 3
SPLIT = (2, 3)  # two batches of unequal size


@functools.cache
def _tensors():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(BATCH, SEQ, D_IN, generator=gen, dtype=torch.float64)
    memory = torch.randn(BATCH, SEQ + 1, D_IN, generator=gen, dtype=torch.float64)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)  # True = a padded position
    padding[0, -2:] = True
    padding[3, -1:] = True
    mask = torch.rand(SEQ, SEQ, generator=gen) > 0.4
    mask.fill_diagonal_(True)  # every query sees at least itself
    labels = torch.randint(0, 3, (BATCH,), generator=gen)
    regress = torch.randn(BATCH, 3, generator=gen, dtype=torch.float64)
    return x, memory, padding, mask, labels, regress


def _model(name):
    x, memory, padding, mask, labels, regress = _tensors()
    if name == "mha":
        return MHANet(), x, labels, nn.CrossEntropyLoss()
    if name == "encoder_padded":  # nn.TransformerEncoder (2 layers), model(x, padding_mask)
        return EncoderNet(), (x, padding), labels, nn.CrossEntropyLoss(reduction="sum")
    if name == "encoder_layer":  # one nn.TransformerEncoderLayer, norm_first
        return EncoderLayerNet(), x, regress, nn.MSELoss()
    if name == "decoder_layer":  # nn.TransformerDecoderLayer, model(tgt, memory), causal tgt_mask
        return DecoderNet(), (x, memory), labels, nn.CrossEntropyLoss()
    if name == "sdpa_causal":
        return SDPANet(), x, labels, nn.CrossEntropyLoss()
    if name == "sdpa_attn_mask":
        return SDPANet(mask=mask), x, regress, nn.MSELoss(reduction="sum")
    raise KeyError(name)


MODELS = (
    "mha",
    "encoder_padded",
    "encoder_layer",
    "decoder_layer",
    "sdpa_causal",
    "sdpa_attn_mask",
)
MULTI_BATCH = ("mha", "sdpa_causal")  # also on two batches of unequal size, streamed


def _split(inputs, targets):
    out, start = [], 0
    for size in SPLIT:
        part = slice(start, start + size)
        x = tuple(t[part] for t in inputs) if isinstance(inputs, tuple) else inputs[part]
        out.append((x, targets[part]))
        start += size
    return out


@functools.cache
def case(name, layout="one"):
    """(model float64 eval, data, loss_fn, reference) — the model is never modified by a test."""
    module, inputs, targets, loss_fn = _model(name)
    model = eval64(module, seed=sum(map(ord, name)))
    batches = [(inputs, targets)] if layout == "one" else _split(inputs, targets)
    data = batches[0] if layout == "one" else batches
    ref = build_reference(FlatModel(model), loss_fn, batches, loss_fn.reduction)
    return model, data, loss_fn, ref


CASES = [(m, "one") for m in MODELS] + [(m, "two_batches") for m in MULTI_BATCH]


def _ids(c):
    return "-".join(c)


# ------------------------------------------------------------------------------------------------
# The references themselves.


@pytest.mark.parametrize("name, layout", CASES, ids=[_ids(c) for c in CASES])
def test_reference_matches_finite_differences(name, layout):
    assert_reference_valid(case(name, layout)[3])


def test_batched_double_backward_is_the_column_by_column_hessian():
    """The references batch their double backward over columns; here, once, column by column."""
    model, data, loss_fn, ref = case("sdpa_causal")
    with torch.enable_grad(), differentiable_attention():
        theta = ref.theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(ref.risk(theta), theta, create_graph=True)
        cols = [
            torch.autograd.grad(g, theta, e, retain_graph=True)[0]
            for e in torch.eye(theta.numel(), dtype=theta.dtype)
        ]
    assert rel_err(torch.stack(cols, dim=1), ref.hessian) <= 1e-14


# ------------------------------------------------------------------------------------------------
# Products, quadratic forms, gradients, losses: exact against the references.


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("name, layout", CASES, ids=[_ids(c) for c in CASES])
def test_products_match_reference(name, layout, op_name):
    model, data, loss_fn, ref = case(name, layout)
    before = attention_settings()
    options = {} if layout == "one" else {"cache": False}  # cached (default) and streamed
    op = make_operator(op_name, model, loss_fn, data, **options)
    assert op.param_names == ref.flat.names
    R = ref.matrix(op_name)
    V = random_vectors(op.num_params, 3, seed=1)
    assert rel_err(op.matmat(V), R @ V) <= TOL
    assert rel_err(op @ V[:, 0], R @ V[:, 0]) <= TOL
    v = V[:, 1]
    assert rel_err(op.quadratic_form(v), v @ R @ v) <= TOL
    assert rel_err(op.gradient(), ref.gradient) <= TOL
    assert rel_err(op.loss(), ref.loss) <= TOL
    assert attention_settings() == before


@pytest.mark.parametrize("name", ["mha", "sdpa_causal"])
def test_dense_matrix_matches_reference(name):
    model, data, loss_fn, ref = case(name)
    for op_name in ("hessian", "ggn"):
        op = make_operator(op_name, model, loss_fn, data)
        assert rel_err(op.to_dense(), ref.matrix(op_name)) <= TOL


@pytest.mark.parametrize("op_name", ["hessian", "ggn", "fisher"])
def test_products_under_users_no_grad(op_name):
    """Under ``torch.no_grad`` the MHA fast path triggers even without transforms."""
    model, data, loss_fn, ref = case("mha")
    op = make_operator(op_name, model, loss_fn, data, cache=False)
    v = random_vectors(op.num_params, 1, seed=2)[:, 0]
    with torch.no_grad():
        got = op @ v
    assert rel_err(got, ref.matrix(op_name) @ v) <= TOL


# ------------------------------------------------------------------------------------------------
# ADLER steps.


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", MODELS)
def test_adler_step_matches_reference(name, curvature):
    model, (inputs, targets), loss_fn, ref = case(name)
    model = copy.deepcopy(model)
    eps = 1e-10
    G = ref.gradient
    denom = G @ ref.matrix({"ef": "fisher", "ef_batch": "fisher_batch"}.get(curvature, curvature))
    denom = denom @ G + eps * (G @ G)
    before = attention_settings()
    opt = ADLER(model, loss_fn, curvature=curvature, eps=eps)
    rec = opt.step(inputs, targets)
    assert attention_settings() == before
    assert rel_err(rec.loss, ref.loss) <= TOL
    theta1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if denom <= 0:  # the exact Hessian can be indefinite along G: a guarded, skipped step
        assert bool(rec.skipped) and torch.isnan(rec.eta)
        assert torch.equal(theta1, ref.theta)
        return
    eta = ref.eta(curvature, eps)
    assert not bool(rec.skipped)
    assert torch.isfinite(rec.eta) and rec.eta > 0
    assert rel_err(rec.eta, eta) <= TOL
    assert rel_err(theta1 - ref.theta, -eta * G) <= TOL  # η̂_0 = η_0, lr = 1


# ------------------------------------------------------------------------------------------------
# The user's global attention settings are restored, also after an exception.


class RaisingMHANet(MHANet):
    """MHANet whose forward raises once ``fail`` is set (an error inside the library's pass)."""

    fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("forward failed on purpose")
        return super().forward(x)


@pytest.fixture
def restore_fastpath():
    previous = torch.backends.mha.get_fastpath_enabled()
    yield
    torch.backends.mha.set_fastpath_enabled(previous)


@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath_on", "fastpath_off"])
@pytest.mark.parametrize("op_name", OPERATORS)
def test_settings_unchanged_after_products(op_name, fastpath, restore_fastpath):
    model, data, loss_fn, ref = case("mha")
    torch.backends.mha.set_fastpath_enabled(fastpath)
    before = attention_settings()
    op = make_operator(op_name, model, loss_fn, data, cache=False)
    assert attention_settings() == before
    v = random_vectors(op.num_params, 2, seed=3)
    assert rel_err(op @ v, ref.matrix(op_name) @ v) <= TOL
    op.quadratic_form(v[:, 0])
    op.gradient()
    assert attention_settings() == before
    assert torch.backends.mha.get_fastpath_enabled() is fastpath


@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath_on", "fastpath_off"])
@pytest.mark.parametrize("op_name", OPERATORS)
def test_settings_restored_after_an_exception(op_name, fastpath, restore_fastpath):
    torch.backends.mha.set_fastpath_enabled(fastpath)
    model = eval64(RaisingMHANet(), seed=4)
    x, _, _, _, labels, _ = _tensors()
    before = attention_settings()
    op = make_operator(op_name, model, nn.CrossEntropyLoss(), (x, labels), cache=False)
    v = random_vectors(op.num_params, 1, seed=4)[:, 0]
    with raises(ValueError, "shape"):  # a vector of the wrong shape
        op @ v[:-1]
    assert attention_settings() == before
    model.fail = True
    with raises(RuntimeError, "on purpose"):  # raised inside the library's own pass
        op @ v
    assert attention_settings() == before
    with raises(RuntimeError, "on purpose"):
        op.gradient()
    assert attention_settings() == before
    assert torch.backends.mha.get_fastpath_enabled() is fastpath


@pytest.mark.parametrize("curvature", CURVATURES)
def test_settings_restored_after_a_failed_adler_step(curvature, restore_fastpath):
    model = eval64(RaisingMHANet(), seed=5)
    x, _, _, _, labels, _ = _tensors()
    opt = ADLER(model, nn.CrossEntropyLoss(), curvature=curvature)
    before = attention_settings()
    opt.step(x, labels)
    assert attention_settings() == before
    model.fail = True
    with raises(RuntimeError, "on purpose"):
        opt.step(x, labels)
    assert attention_settings() == before


def _double_backward_through(model, inputs, targets):
    params = list(model.parameters())
    loss = F.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params])


@pytest.mark.parametrize(
    "backends",
    [[SDPBackend.FLASH_ATTENTION], [SDPBackend.MATH]],
    ids=["user_flash_only", "user_math_only"],
)
def test_users_sdpa_kernel_context_still_applies_outside(backends):
    """Inside a user's ``sdpa_kernel`` the library still works, and leaves the user's choice."""
    model, data, loss_fn, ref = case("sdpa_causal")
    x, labels = data
    outside = attention_settings()
    with sdpa_kernel(backends):
        inside = attention_settings()
        for op_name in ("hessian", "ggn"):
            op = make_operator(op_name, model, loss_fn, data, cache=False)
            v = random_vectors(op.num_params, 1, seed=6)[:, 0]
            assert rel_err(op @ v, ref.matrix(op_name) @ v) <= TOL
            assert attention_settings() == inside
        opt = ADLER(copy.deepcopy(model), loss_fn, curvature="hessian")
        opt.step(x, labels)
        assert attention_settings() == inside
        # The user's own computation still runs under the user's choice of backend.
        user_model = copy.deepcopy(model)
        if backends == [SDPBackend.MATH]:
            _double_backward_through(user_model, x, labels)  # math: differentiable twice
        else:
            with raises(RuntimeError, "not implemented"):  # flash: no double backward
                _double_backward_through(user_model, x, labels)
    assert attention_settings() == outside


# ------------------------------------------------------------------------------------------------
# Without the library's handling, torch takes the fused paths and they fail: the handling is needed.


def _jvp_plain(model, inputs):
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.ones_like(p) for n, p in params.items()}
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return torch.func.jvp(
        lambda p: torch.func.functional_call(model, p, args), (params,), (tangents,)
    )


FUSED = {
    "mha": "_native_multi_head_attention",
    "encoder_padded": "_nested_tensor_from_mask",
    "encoder_layer": "_transformer_encoder_layer_fwd",
    "decoder_layer": "flash_attention",
    "sdpa_causal": "flash_attention",
    "sdpa_attn_mask": "flash_attention",
}


@pytest.mark.parametrize("name", MODELS)
def test_without_the_library_forward_ad_hits_a_fused_kernel(name, restore_fastpath):
    torch.backends.mha.set_fastpath_enabled(True)
    model, data, _, _ = case(name)
    try:
        _jvp_plain(model, data[0])
    except NotImplementedError as err:
        assert "forward AD" in str(err) and FUSED[name] in str(err), str(err)
    else:
        pytest.skip(
            f"torch {torch.__version__} ran forward AD through {name} without a fused kernel "
            "here, so this configuration cannot show that the library's handling is needed."
        )


@pytest.mark.parametrize("name", ["mha", "encoder_layer", "sdpa_causal"])
def test_without_the_library_double_backward_hits_a_fused_kernel(name, restore_fastpath):
    torch.backends.mha.set_fastpath_enabled(True)
    model, (inputs, _), _, _ = case(name)
    model = copy.deepcopy(model)  # its parameters require grad: no MHA fast path, but flash SDPA
    labels = _tensors()[4]
    try:
        _double_backward_through(model, inputs, labels)
    except RuntimeError as err:
        assert "flash_attention" in str(err) and "not implemented" in str(err), str(err)
    else:
        pytest.skip(
            f"torch {torch.__version__} differentiated {name} twice without a fused kernel here."
        )
