import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

from hessian_lab.experiments.models import CNN, MLP, MODEL_NAMES, ViT, build_model

TINY = {
    "mlp": dict(in_shape=(1, 4, 4), width=5, depth=2),
    "cnn": dict(in_shape=(1, 6, 6), width=3, depth=1),
    "rescnn": dict(in_shape=(1, 6, 6), width=3, depth=1),
    "vit": dict(in_shape=(1, 4, 4), width=4, depth=1, patch_size=2, heads=2),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_tiny_shapes_and_size(name, activation):
    torch.manual_seed(0)
    model = build_model(name, activation=activation, num_classes=3, **TINY[name]).double()
    x = torch.randn(5, *TINY[name]["in_shape"], dtype=torch.float64)
    out = model(x)
    assert out.shape == (5, 3)
    assert out.dtype == torch.float64
    assert 20 <= n_params(model) <= 400
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in model.modules())


def test_paper_sized_models_forward():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for name in MODEL_NAMES:
        model = build_model(name, in_shape=(3, 32, 32), num_classes=100, width=16, depth=2)
        assert model(x).shape == (2, 100)


def test_cnn_residual_changes_function_not_size():
    torch.manual_seed(0)
    plain = CNN(in_shape=(1, 6, 6), width=3, depth=1, residual=False)
    torch.manual_seed(0)
    res = CNN(in_shape=(1, 6, 6), width=3, depth=1, residual=True)
    assert n_params(plain) == n_params(res)
    x = torch.randn(4, 1, 6, 6)
    assert not torch.allclose(plain(x), res(x))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_last_layer_zero_mean(name):
    torch.manual_seed(1)
    kwargs = dict(TINY[name])
    kwargs["width"] = 64 if name != "vit" else 64
    if name == "vit":
        kwargs["heads"] = 4
    model = build_model(name, num_classes=50, **kwargs)
    w, b = model.head.weight, model.head.bias
    assert torch.all(b == 0)
    std = 1 / model.head.in_features**0.5  # LeCun normal: N(0, 1/fan_in)
    assert abs(w.mean().item()) < 4 * std / w.numel() ** 0.5
    assert w.std().item() == pytest.approx(std, rel=0.1)


def test_last_layer_std_option():
    model = build_model("mlp", in_shape=(1, 2, 2), width=8, depth=1, last_layer_std=0.0)
    assert torch.all(model.head.weight == 0)


def test_vit_forward_mode_ad_matches_finite_differences():
    torch.manual_seed(0)
    model = build_model("vit", activation="tanh", num_classes=3, **TINY["vit"]).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)

    def f(p):
        return functional_call(model, p, (x,))

    _, jv = jvp(f, (params,), (tangent,))
    h = 1e-6
    plus = f({k: v + h * tangent[k] for k, v in params.items()})
    minus = f({k: v - h * tangent[k] for k, v in params.items()})
    fd = (plus - minus) / (2 * h)
    torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-8)


def test_vit_has_no_fused_attention():
    import inspect

    from hessian_lab.experiments import models

    assert "scaled_dot_product_attention(" not in inspect.getsource(models._Attention)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(name="resnet50"), ValueError, ["unknown model", "mlp", "cnn", "rescnn", "vit"]),
        (dict(name="cnn", activation="gelu"), ValueError, ["unknown activation", "relu", "tanh"]),
        (dict(name="cnn", heads=2), TypeError, ["heads", "last_layer_std"]),
        (dict(name="vit", in_shape=(1, 5, 5), patch_size=2), ValueError, ["divisible"]),
        (dict(name="vit", width=6, heads=4), ValueError, ["heads"]),
        (dict(name="mlp", width=0), ValueError, ["width"]),
        (dict(name="cnn", in_shape=(6, 6)), ValueError, ["in_shape"]),
    ],
)
def test_errors(kwargs, exc, words):
    name = kwargs.pop("name")
    with pytest.raises(exc) as info:
        build_model(name, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_classes_direct():
    assert MLP()(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert ViT(in_shape=(1, 8, 8), width=8, heads=2, patch_size=2)(
        torch.zeros(1, 1, 8, 8)
    ).shape == (1, 10)


def test_explicit_attention_matches_torch_reference():
    import torch.nn.functional as F

    from hessian_lab.experiments.models import _Attention

    torch.manual_seed(0)
    attn = _Attention(width=8, heads=2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    q, k, v = attn.qkv(x).split(8, dim=-1)

    def heads(t):
        return t.reshape(3, 5, 2, 4).transpose(1, 2)

    ref = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    ref = attn.proj(ref.transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x), ref, rtol=1e-12, atol=1e-12)
