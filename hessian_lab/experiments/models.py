"""The paper's model families: MLP, CNN (with and without residual connections) and ViT.

All models follow the paper's setting (ADLER, §3 "Experiments"; ``DESIGN.md`` §3):

* no batch normalization and no dropout, so the network is a deterministic function of a single
  example and every curvature operator (H, Q, GN) is well defined in train mode;
* the **last layer is drawn zero-mean and independently of the others**: weights
  ``W ~ N(0, σ²)`` with ``σ = last_layer_std`` (default ``1/sqrt(fan_in)``, LeCun-normal) and a zero
  bias. This is the assumption under which the paper drops the second-order term of the Hessian
  (``E[∂ℓ/∂ŷ] = 0`` at initialization) to obtain the PSD approximation Q;
* hidden Linear/Conv layers of the MLP and CNN are drawn ``N(0, gain²/fan_in)`` with zero bias
  (variance preserving; PyTorch's default shrinks the signal layer after layer, which without
  batch norm stalls training); the ViT keeps PyTorch's defaults (its LayerNorms fix the scale);
* activation ∈ {relu, sigmoid, tanh}; width and depth configurable; input shape
  ``(channels, height, width)`` and number of classes configurable so that tiny instances
  (a few hundred parameters) can serve as float64 dense references in tests.

The ViT writes attention explicitly (``softmax(q kᵀ/√d) v`` with ``matmul``) instead of
``F.scaled_dot_product_attention``: the fused kernels have no forward-mode AD, and ADLER needs one
JVP per step (``DESIGN.md`` §6).
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "MLP",
    "MODEL_NAMES",
    "MODEL_OPTIONS",
    "ModelOption",
    "ViT",
    "build_model",
    "make_activation",
    "model_option_specs",
]

#: Activation name -> module class.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module.

    Args:
        name: One of ``"relu"``, ``"sigmoid"``, ``"tanh"``.

    Raises:
        ValueError: If ``name`` is not a known activation; the message lists the valid ones.
    """
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; valid activations are: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def _zero_mean_last_layer(layer: nn.Linear, std: float | None) -> None:
    """Draw the classifier ``W ~ N(0, std²)`` (std default ``1/sqrt(fan_in)``) with zero bias."""
    if std is None:
        std = 1.0 / math.sqrt(layer.in_features)
    if std < 0:
        raise ValueError(f"last_layer_std must be >= 0, got {std}")
    with torch.no_grad():
        layer.weight.normal_(0.0, std)
        if layer.bias is not None:
            layer.bias.zero_()


def _variance_preserving_init(module: nn.Module, activation: str) -> None:
    """He/Xavier-style init ``W ~ N(0, gain² / fan_in)``, zero bias, for every Linear/Conv2d.

    PyTorch's default init shrinks the signal by about ``1/√3`` per layer; without batch norm a
    few such layers leave the logits, and the gradients of the lower layers, near zero. The gain is
    ``torch.nn.init.calculate_gain(activation)`` (√2 for relu, 5/3 for tanh, 1 for sigmoid).
    """
    gain = nn.init.calculate_gain(activation)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, a=0.0, nonlinearity="linear")  # std 1/sqrt(fan_in)
            with torch.no_grad():
                m.weight.mul_(gain)
                if m.bias is not None:
                    m.bias.zero_()


def _check_in_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ValueError(
            f"in_shape must be (channels, height, width) with positive entries, got {in_shape!r}"
        )
    return shape  # type: ignore[return-value]


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


class MLP(nn.Module):
    """Fully connected network: flatten, ``depth`` hidden layers of ``width`` units, classifier.

    ``z = W_L σ(... σ(W_1 x + b_1) ...) + b_L`` with ``W_L`` drawn zero-mean.

    Args:
        in_shape: Input shape ``(channels, height, width)`` (flattened internally).
        num_classes: Output dimension C.
        width: Hidden units per layer.
        depth: Number of hidden layers (>= 1).
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
        last_layer_std: Standard deviation of the zero-mean classifier weights
            (default ``1/sqrt(width)``).
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        width: int = 64,
        depth: int = 2,
        activation: str = "relu",
        last_layer_std: float | None = None,
    ) -> None:
        super().__init__()
        c, h, w = _check_in_shape(in_shape)
        _check_positive(num_classes=num_classes, width=width, depth=depth)
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = c * h * w
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), make_activation(activation)]
            fan_in = width
        self.features = nn.Sequential(*layers)
        _variance_preserving_init(self.features, activation)
        self.head = nn.Linear(fan_in, num_classes)
        _zero_mean_last_layer(self.head, last_layer_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` of shape ``[N, C_in, H, W]`` to logits ``[N, num_classes]``."""
        return self.head(self.features(x))


class _ConvBlock(nn.Module):
    """Two 3×3 convolutions; with ``residual`` the input is added before the last activation.

    plain:    ``y = σ(conv2(σ(conv1(x))))``
    residual: ``y = σ(x + conv2(σ(conv1(x))))``

    Both variants have the same parameters, so "with vs. without residual connections" compares
    architectures of equal size.
    """

    def __init__(self, width: int, activation: str, residual: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act2 = make_activation(activation)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act1(self.conv1(x)))
        if self.residual:
            y = x + y
        return self.act2(y)


class CNN(nn.Module):
    """Convolutional network with optional residual connections (no batch norm, no dropout).

    Layout: a 3×3 stem convolution ``C_in → width`` and activation; ``depth`` blocks of two 3×3
    convolutions (see ``residual``); after each block a 2×2 average pooling while the feature map
    stays at least 2×2 (``32 → 16 → 8`` on CIFAR with depth 2, ``8 → 4 → 2`` on digits); the final
    map is flattened into a zero-mean linear classifier ``width·h·w → num_classes``.

    Why flatten rather than global average pooling: without batch norm, ReLU features carry a
    large example-independent mean, and averaging over space leaves logits that hardly depend on
    the input at initialization; on digits a plain ReLU CNN with global pooling did not train
    with ADLER or SGD, the flattened one does.

    Args:
        in_shape: Input shape ``(channels, height, width)``.
        num_classes: Output dimension C.
        width: Channels of every convolution.
        depth: Number of two-convolution blocks (>= 1).
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
        residual: Add identity skip connections around each block.
        last_layer_std: Standard deviation of the zero-mean classifier weights
            (default ``1/sqrt(width)``).
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        width: int = 32,
        depth: int = 2,
        activation: str = "relu",
        residual: bool = False,
        last_layer_std: float | None = None,
    ) -> None:
        super().__init__()
        c, h, w = _check_in_shape(in_shape)
        _check_positive(num_classes=num_classes, width=width, depth=depth)
        self.residual = residual
        layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), make_activation(activation)]
        for _ in range(depth):
            layers.append(_ConvBlock(width, activation, residual))
            # Pool only while the result stays >= 2x2: tiny test inputs keep some spatial extent.
            if h >= 4 and w >= 4:
                layers.append(nn.AvgPool2d(2))
                h, w = h // 2, w // 2
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        _variance_preserving_init(self.features, activation)
        self.head = nn.Linear(width * h * w, num_classes)
        _zero_mean_last_layer(self.head, last_layer_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` of shape ``[N, C_in, H, W]`` to logits ``[N, num_classes]``."""
        return self.head(self.features(x))


class _Attention(nn.Module):
    """Multi-head self-attention written with ``matmul`` + ``softmax`` (forward-mode AD safe).

    ``Attn(X) = softmax(Q Kᵀ / √d_h) V`` per head, ``Q, K, V = X W_q, X W_k, X W_v``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [N, heads, T, d_h]
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [N, heads, T, d_h]
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class _TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, activation: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            make_activation(activation),
            nn.Linear(mlp_ratio * width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2020) without dropout.

    Layout: non-overlapping ``patch_size × patch_size`` patches embedded linearly (a strided
    convolution) plus a learned position embedding; ``depth`` pre-LN transformer blocks whose MLP
    uses the chosen activation; final LayerNorm; mean over tokens (no class token); zero-mean
    linear classifier.

    Args:
        in_shape: Input shape ``(channels, height, width)``; height and width divisible by
            ``patch_size``.
        num_classes: Output dimension C.
        width: Embedding dimension (divisible by ``heads``).
        depth: Number of transformer blocks (>= 1).
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"`` (in the blocks' MLPs).
        patch_size: Side of the square patches.
        heads: Attention heads.
        mlp_ratio: Hidden size of the blocks' MLP as a multiple of ``width``.
        last_layer_std: Standard deviation of the zero-mean classifier weights
            (default ``1/sqrt(width)``).
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        width: int = 64,
        depth: int = 2,
        activation: str = "relu",
        patch_size: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        last_layer_std: float | None = None,
    ) -> None:
        super().__init__()
        c, h, w = _check_in_shape(in_shape)
        _check_positive(
            num_classes=num_classes,
            width=width,
            depth=depth,
            patch_size=patch_size,
            heads=heads,
            mlp_ratio=mlp_ratio,
        )
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"ViT: image size {h}x{w} is not divisible by patch_size={patch_size}; "
                "choose a patch size that divides both height and width"
            )
        if width % heads:
            raise ValueError(
                f"ViT: width={width} is not divisible by heads={heads}; "
                "choose width as a multiple of heads"
            )
        make_activation(activation)  # validate early, before building blocks
        tokens = (h // patch_size) * (w // patch_size)
        self.patch_embed = nn.Conv2d(c, width, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.Sequential(
            *[_TransformerBlock(width, heads, mlp_ratio, activation) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        _zero_mean_last_layer(self.head, last_layer_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` of shape ``[N, C_in, H, W]`` to logits ``[N, num_classes]``."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, T, width]
        tokens = self.blocks(tokens + self.pos_embed)
        return self.head(self.norm(tokens).mean(dim=1))


#: Model name -> (constructor, fixed keyword arguments, names of model-specific options).
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, object], tuple[str, ...]]] = {
    "mlp": (MLP, {}, ("last_layer_std",)),
    "cnn": (CNN, {"residual": False}, ("last_layer_std",)),
    "rescnn": (CNN, {"residual": True}, ("last_layer_std",)),
    "vit": (ViT, {}, ("patch_size", "heads", "mlp_ratio", "last_layer_std")),
}

#: Valid names for :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

#: Model name -> the model-specific options :func:`build_model` accepts for it.
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {name: entry[2] for name, entry in _REGISTRY.items()}


def build_model(
    name: str,
    *,
    activation: str = "relu",
    in_shape: Sequence[int] = (1, 8, 8),
    num_classes: int = 10,
    width: int = 16,
    depth: int = 2,
    **options: object,
) -> nn.Module:
    """Build one of the paper's model families by name.

    Args:
        name: ``"mlp"``, ``"cnn"`` (no skip connections), ``"rescnn"`` (CNN with residual
            connections) or ``"vit"``.
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
        in_shape: Input shape ``(channels, height, width)``.
        num_classes: Number of classes C (output dimension).
        width: Hidden units (MLP), channels (CNN) or embedding dimension (ViT).
        depth: Hidden layers (MLP), two-convolution blocks (CNN) or transformer blocks (ViT).
        **options: Model-specific options: ``last_layer_std`` for all models; ``patch_size``,
            ``heads``, ``mlp_ratio`` for ``"vit"``.

    Returns:
        The model in float32 on the CPU, in train mode (there is no BN/dropout, so train and eval
        mode compute the same function).

    Raises:
        ValueError: Unknown model name or activation, or inconsistent sizes.
        TypeError: An option that the chosen model does not take.

    Example:
        >>> model = build_model("cnn", activation="tanh", in_shape=(1, 6, 6), width=3, depth=1)
        >>> model(torch.zeros(2, 1, 6, 6)).shape
        torch.Size([2, 10])
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(MODEL_NAMES)}")
    make_activation(activation)  # clear error before any construction
    cls, fixed, allowed = _REGISTRY[key]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"model {key!r} does not take option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(allowed)}"
        )
    return cls(
        in_shape=in_shape,
        num_classes=num_classes,
        width=width,
        depth=depth,
        activation=activation,
        **fixed,
        **options,
    )


@dataclass(frozen=True)
class ModelOption:
    """A model-specific option of the built-in models, read from the constructors.

    Attributes:
        name: Keyword argument of the constructor, e.g. ``"patch_size"``.
        type: ``int`` or ``float`` (what a command-line value is converted to).
        default: The constructor's default (``None``: computed by the model).
        help: The constructor's docstring entry for it.
        models: The model names that take it.
    """

    name: str
    type: type
    default: object
    help: str
    models: tuple[str, ...]


def _docstring_args(obj: object) -> dict[str, str]:
    """``{name: text}`` of the ``Args:`` section of a Google-style docstring."""
    doc = inspect.getdoc(obj) or ""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    entries: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        if line and not line.startswith(" "):
            break  # the next section ("Returns:", ...) or the end of Args
        match = re.match(r"^    (\w+)(?: \(.*?\))?: (.*)$", line)
        if match:
            name = match.group(1)
            entries[name] = match.group(2).strip()
        elif name is not None and line.strip():
            entries[name] += " " + line.strip()
    return entries


def model_option_specs() -> dict[str, ModelOption]:
    """Every model-specific option of the built-in models, with type, default and help.

    Derived from the constructors' signatures and docstrings (the single place they are
    written), so the command line and the sweep files cannot drift from the models.
    """
    specs: dict[str, ModelOption] = {}
    for model, (cls, _fixed, options) in _REGISTRY.items():
        hints = typing.get_type_hints(cls.__init__)
        signature = inspect.signature(cls.__init__)
        docs = _docstring_args(cls)
        for option in options:
            hint = hints[option]
            kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
            value_type = float if float in kinds else int
            if option in specs:
                old = specs[option]
                specs[option] = ModelOption(
                    option, old.type, old.default, old.help, (*old.models, model)
                )
            else:
                default = signature.parameters[option].default
                specs[option] = ModelOption(
                    option, value_type, default, docs.get(option, ""), (model,)
                )
    return specs
