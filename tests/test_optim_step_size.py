"""η = ∇hᵀd / dᵀ(C + εI)d against the dense operators (float64)."""

import pytest
import torch
from torch import nn

from hessian_lab import EmpiricalFisherOperator, GGNOperator, HessianOperator
from hessian_lab.experiments.models import build_model
from hessian_lab.optim.step_size import StepSizeEstimator, step_size

EPS = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp_ln":
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)
        )
    elif name == "cnn":
        model = build_model(
            "cnn", in_shape=(1, 4, 4), num_classes=3, width=2, depth=1, activation="tanh"
        )
    else:
        model = build_model(
            "vit",
            in_shape=(1, 4, 4),
            num_classes=3,
            width=4,
            depth=1,
            patch_size=2,
            heads=2,
            mlp_ratio=1,
        )
    model = model.double()
    with torch.no_grad():  # move away from the zero-mean/zero-bias init so nothing is special
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _data(n: int = 10, reg: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    y = (
        torch.randn(n, 3, generator=g, dtype=torch.float64)
        if reg
        else torch.randint(0, 3, (n,), generator=g)
    )
    return x, y


def _operator(curvature, model, loss_fn, data):
    if curvature == "ggn":
        return GGNOperator(model, loss_fn, data)
    if curvature == "ef":
        return EmpiricalFisherOperator(model, loss_fn, data)
    if curvature == "ef_batch":
        return EmpiricalFisherOperator(model, loss_fn, data, mode="batch")
    return HessianOperator(model, loss_fn, data)


@pytest.mark.parametrize("curvature", ["ggn", "ef", "ef_batch", "hessian"])
@pytest.mark.parametrize("name", ["mlp_ln", "cnn", "vit"])
def test_eta_matches_dense_operator(name, curvature):
    model, (x, y), loss_fn = _model(name), _data(), nn.CrossEntropyLoss()
    op = _operator(curvature, model, loss_fn, (x, y))
    C, G = op.to_dense(), op.gradient()
    curv = G @ C @ G
    ref = (G @ G) / (curv + EPS * (G @ G))
    out = step_size(model, loss_fn, x, y, curvature, eps=EPS)
    assert out.eta.dtype == torch.float64
    torch.testing.assert_close(out.numerator, G @ G, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.curvature, curv, rtol=1e-10, atol=1e-14)
    if curv + EPS * (G @ G) > 0:
        torch.testing.assert_close(out.eta, ref, rtol=1e-10, atol=0)
        assert not bool(out.nonpositive_curvature)
    else:  # H can be indefinite along G (it is for this ViT): flagged, never a negative η
        assert curvature == "hessian"
        assert bool(out.nonpositive_curvature) and torch.isnan(out.eta)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("curvature", ["ggn", "ef", "hessian"])
def test_direction_and_mse(curvature, reduction):
    model, (x, y) = _model("mlp_ln"), _data(reg=True)
    loss_fn = nn.MSELoss(reduction=reduction)
    op = _operator(curvature, model, loss_fn, (x, y))
    C, G = op.to_dense(), op.gradient()
    d = torch.randn(G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = (G @ d) / (d @ C @ d + EPS * (d @ d))
    out = step_size(model, loss_fn, x, y, curvature, direction=d, eps=EPS)
    torch.testing.assert_close(out.eta, ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("curvature", ["ggn", "ef", "hessian"])
def test_curvature_fraction_uses_the_sub_batch(curvature, reduction):
    model, (x, y) = _model("mlp_ln"), _data(n=12)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    G = GGNOperator(model, loss_fn, (x, y)).gradient()
    m = 3  # ⌈0.25 · 12⌉
    C = _operator(curvature, model, loss_fn, (x[:m], y[:m])).to_dense()
    scale = 12 / m if reduction == "sum" else 1.0  # a sub-batch sum estimates the batch sum
    out = step_size(model, loss_fn, x, y, curvature, eps=EPS, curvature_fraction=0.25)
    torch.testing.assert_close(out.curvature, scale * (G @ C @ G), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out.numerator, G @ G, rtol=1e-10, atol=0)


def test_ef_batch_is_inverse_gradient_norm():
    model, (x, y) = _model("cnn"), _data()
    out = step_size(model, nn.CrossEntropyLoss(), x, y, "ef_batch", eps=EPS)
    torch.testing.assert_close(out.eta, 1.0 / (out.numerator + EPS), rtol=1e-12, atol=0)
    out0 = step_size(model, nn.CrossEntropyLoss(), x, y, "ef_batch", eps=0.0)
    torch.testing.assert_close(out0.eta, 1.0 / out0.numerator, rtol=1e-12, atol=0)


def test_nonpositive_hessian_curvature_is_flagged():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)

    def concave(z, _):  # H = −2 JᵀJ ≤ 0 along every direction
        return -(z**2).mean()

    out = step_size(model, concave, x, y, "hessian")
    assert bool(out.nonpositive_curvature)
    assert bool(out.curvature < 0)
    assert torch.isnan(out.eta)


def test_estimator_validates_arguments():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="curvature"):
        StepSizeEstimator(model, nn.MSELoss(), curvature="fisher")
    with pytest.raises(ValueError, match="curvature_fraction"):
        StepSizeEstimator(model, nn.MSELoss(), curvature_fraction=0.0)
    with pytest.raises(ValueError, match="reduction"):
        StepSizeEstimator(model, nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="eval"):
        StepSizeEstimator(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)), nn.MSELoss())


def test_float32_cnn_and_vit_run_forward_mode():
    # The ViT's attention is explicit, so forward-mode AD never meets a fused kernel.
    for name in ("cnn", "vit"):
        model = _model(name).float()
        x, y = _data()
        for curvature in ("ggn", "ef"):
            out = step_size(model, nn.CrossEntropyLoss(), x.float(), y, curvature)
            assert out.eta.dtype == torch.float32 and bool(torch.isfinite(out.eta))


@pytest.mark.parametrize("method", ["forward", "double_backward"])
@pytest.mark.parametrize("fraction", [None, 0.5])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("name", ["mlp_ln", "cnn", "vit"])
def test_both_jvp_methods_match_dense(name, curvature, fraction, method):
    model, (x, y), loss_fn = _model(name), _data(), nn.CrossEntropyLoss()
    m = 5 if fraction else 10
    G = GGNOperator(model, loss_fn, (x, y)).gradient()
    C = _operator(curvature, model, loss_fn, (x[:m], y[:m])).to_dense()
    out = step_size(
        model,
        loss_fn,
        x,
        y,
        curvature,
        eps=EPS,
        curvature_fraction=fraction,
        jvp_method=method,
    )
    torch.testing.assert_close(out.numerator, G @ G, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.curvature, G @ C @ G, rtol=1e-10, atol=1e-14)


def test_auto_jvp_method_follows_the_layers():
    from hessian_lab.core import auto_jvp_method

    assert auto_jvp_method(_model("mlp_ln")) == "double_backward"
    assert auto_jvp_method(_model("vit")) == "double_backward"  # patch conv: kernel == stride
    # Convolutions run under convolutions_for_jvp: double backward costs their tangent only.
    assert auto_jvp_method(_model("cnn")) == "double_backward"
    # Convolutions that keep PyTorch's own double backward: forward mode.
    assert auto_jvp_method(nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"))) == "forward"
    assert auto_jvp_method(nn.Sequential(nn.ConvTranspose2d(1, 2, 3))) == "forward"
