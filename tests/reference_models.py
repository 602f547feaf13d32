"""Dense float64 references for models with any inputs and outputs (issue 10), and test models.

Nothing here imports hessian_lab: every quantity is built from torch alone, so a test compares the
library with an independent computation. For a model written as a function of a flat θ ∈ R^P
(:class:`FlatModel`, through ``torch.func.functional_call``; inputs a tensor, a tuple/list or a
dict; outputs a tensor, a ``logits`` attribute or key, or whatever ``output_fn`` returns), a loss
``loss_fn(z, targets)`` with reduction r and batches b of N_b examples (N_b = the first dimension
of the targets):

* risk h(θ) = Σ_b w_b L_b(θ), w_b = N_b / N for r = "mean", 1 for "sum" (``weights=`` overrides);
* H column block by column block by double backward: ``torch.autograd.grad`` of the gradient
  (built with ``create_graph=True``) with ``is_grads_batched=True`` (each column is one double
  backward; vmapped so that P ≈ 1000 takes a fraction of a second, and checked against finite
  differences in every test module);
* Q = Σ_b w_b J_bᵀ Λ_b J_b, J_b from ``torch.func.jacrev`` (reverse mode) and Λ_b = ∇²_z L_b, the
  whole batch's output-space Hessian from ``torch.autograd.functional.hessian``;
* GN = (1/N) Σ_n g_n g_nᵀ ("mean"; no 1/N for "sum") with g_n the gradient of the example's own
  loss ℓ_n = ``loss_fn`` evaluated on example n alone (the model run on that example only), and
  GN_batch = G Gᵀ. For a loss that averages over the examples of a batch with the same number of
  elements per example (class-index cross entropy without ignored targets, MSE, a token mean over
  sequences of one length), L_b = (1/N_b) Σ_n ℓ_n exactly, so g_n = N_b J_nᵀ ∂L_b/∂z_n;
  :func:`finite_difference_errors` checks Σ_n g_n against G, which also proves the examples of a
  batch independent (no padding leak, no batch statistics).

Attention: fused kernels have neither forward-mode AD nor double backward in torch 2.13 on CPU, so
every reference computation runs inside :func:`differentiable_attention` (the math SDPA backend and
the MHA fast path off), which restores the caller's settings afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# ------------------------------------------------------------------------------------------------
# Attention settings.


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """The math SDPA backend and the MHA fast path off, the caller's settings restored after."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def attention_settings() -> tuple:
    """A snapshot of every global the attention kernels read (to test that it is restored)."""
    cuda = torch.backends.cuda
    return (
        torch.backends.mha.get_fastpath_enabled(),
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
        torch._C._get_overrideable_sdp_enabled(),
        tuple(torch._C._get_sdp_priority_order()),
    )


# ------------------------------------------------------------------------------------------------
# Calling a model on any kind of inputs; reading its prediction.


def split_inputs(inputs: Any) -> tuple[tuple, dict]:
    """(args, kwargs) for ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    raise TypeError(f"test inputs of type {type(inputs).__name__}")


def prediction(output: Any) -> torch.Tensor:
    """The tests' own default output_fn: a tensor, else ``.logits`` or ``["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output["logits"]
    return output.logits


def example_slice(inputs: Any, i: int) -> Any:
    """Example i of a batch whose inputs have the batch along their first dimension."""
    if isinstance(inputs, torch.Tensor):
        return inputs[i : i + 1]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(t[i : i + 1] for t in inputs)
    return {k: v[i : i + 1] for k, v in inputs.items()}


class FlatModel:
    """θ ↦ the model's prediction tensor, θ the flat concatenation of the named parameters.

    Args:
        model: The module (float64, eval mode); it is not modified.
        names: Parameter names spanning θ (``None``: all with ``requires_grad``), laid out in the
            order of ``model.named_parameters()`` (which lists a tied parameter once).
        output_fn: Output -> prediction tensor (default :func:`prediction`).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str] | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        named = dict(model.named_parameters())
        if names is None:
            self.names = [n for n, p in named.items() if p.requires_grad]
        else:
            missing = set(names) - set(named)
            assert not missing, f"not parameters of the model: {missing}"
            self.names = [n for n in named if n in set(names)]
        self.model = model
        self.shapes = [named[n].shape for n in self.names]
        self.theta0 = torch.cat([named[n].detach().reshape(-1) for n in self.names]).clone()
        self.output_fn = output_fn or prediction

    @property
    def num_params(self) -> int:
        return self.theta0.numel()

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes, strict=True):
            k = s.numel()
            out[n] = theta[i : i + k].view(s)
            i += k
        return out

    def __call__(self, theta: torch.Tensor, inputs: Any) -> torch.Tensor:
        args, kwargs = split_inputs(inputs)
        with differentiable_attention():
            out = torch.func.functional_call(self.model, self.params(theta), args, kwargs)
        return self.output_fn(out)


# ------------------------------------------------------------------------------------------------
# The dense reference.

Batch = tuple[Any, torch.Tensor]


def batch_weights(batches: Sequence[Batch], reduction: str) -> list[float]:
    """w_b = N_b / N ("mean", N_b the first dimension of the targets) or 1 ("sum")."""
    sizes = [int(y.shape[0]) for _, y in batches]
    if reduction == "sum":
        return [1.0] * len(sizes)
    assert reduction == "mean", reduction
    return [n / sum(sizes) for n in sizes]


def dense_hessian(
    risk: Callable[[torch.Tensor], torch.Tensor], theta0: torch.Tensor, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, ∇h, ∇²h) at θ₀ by double backward, ``chunk`` columns per batched backward."""
    with torch.enable_grad(), differentiable_attention():
        theta = theta0.detach().clone().requires_grad_(True)
        h = risk(theta)
        (g,) = torch.autograd.grad(h, theta, create_graph=True)
        eye = torch.eye(theta.numel(), dtype=theta.dtype)
        blocks = []
        for i in range(0, theta.numel(), chunk):
            (block,) = torch.autograd.grad(
                g, theta, eye[i : i + chunk], retain_graph=True, is_grads_batched=True
            )
            blocks.append(block)
    return h.detach(), g.detach(), torch.cat(blocks).detach()


@dataclass
class DenseReference:
    """Every reference quantity at θ₀ for one model, loss, reduction and list of batches."""

    flat: FlatModel
    loss_fn: Callable
    batches: list[Batch]
    reduction: str
    weights: list[float]
    per_example: bool
    slice_fn: Callable[[Any, int], Any]
    loss: torch.Tensor = None
    gradient: torch.Tensor = None
    hessian: torch.Tensor = None
    ggn: torch.Tensor = None
    jacobians: list[torch.Tensor] = field(default_factory=list)  # [Z_b, P] per batch
    lambdas: list[torch.Tensor] = field(default_factory=list)  # [Z_b, Z_b] per batch
    per_example_grads: torch.Tensor | None = None  # [N, P]
    fisher: torch.Tensor | None = None
    fisher_batch: torch.Tensor = None

    @property
    def theta(self) -> torch.Tensor:
        return self.flat.theta0

    def risk(self, theta: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=theta.dtype)
        for w, (x, y) in zip(self.weights, self.batches, strict=True):
            total = total + w * self.loss_fn(self.flat(theta, x), y)
        return total

    def grad_at(self, theta: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            t = theta.detach().clone().requires_grad_(True)
            return torch.autograd.grad(self.risk(t), t)[0]

    def example_losses(self, theta: torch.Tensor) -> torch.Tensor:
        """[ℓ_n(θ)] over all examples, each from the model run on that example alone."""
        out = []
        for x, y in self.batches:
            for i in range(int(y.shape[0])):
                out.append(self.loss_fn(self.flat(theta, self.slice_fn(x, i)), y[i : i + 1]))
        return torch.stack(out)

    def matrix(self, name: str) -> torch.Tensor:
        """The reference for an operator name: hessian, ggn, fisher, fisher_batch."""
        return {
            "hessian": self.hessian,
            "ggn": self.ggn,
            "fisher": self.fisher,
            "fisher_batch": self.fisher_batch,
        }[name]

    def eta(self, curvature: str, eps: float = 1e-10) -> torch.Tensor:
        """ADLER's η = GᵀG / (GᵀCG + ε GᵀG) for a curvature name of the optimizer."""
        C = {"ggn": "ggn", "ef": "fisher", "ef_batch": "fisher_batch", "hessian": "hessian"}
        G = self.gradient
        gg = G @ G
        return gg / (G @ self.matrix(C[curvature]) @ G + eps * gg)


def build_reference(
    flat: FlatModel,
    loss_fn: Callable,
    batches: Sequence[Batch],
    reduction: str,
    *,
    weights: Sequence[float] | None = None,
    per_example: bool = True,
    slice_fn: Callable[[Any, int], Any] = example_slice,
) -> DenseReference:
    """Compute H, Q, GN, GN_batch, the loss and the gradient at ``flat.theta0`` (float64)."""
    assert flat.theta0.dtype == torch.float64
    batches = list(batches)
    w = list(weights) if weights is not None else batch_weights(batches, reduction)
    ref = DenseReference(flat, loss_fn, batches, reduction, w, per_example, slice_fn)
    theta0 = flat.theta0
    ref.loss, ref.gradient, ref.hessian = dense_hessian(ref.risk, theta0)

    ggn = torch.zeros_like(ref.hessian)
    with differentiable_attention():
        for wb, (x, y) in zip(w, batches, strict=True):
            z = flat(theta0, x).detach()
            J = torch.func.jacrev(lambda t, x=x: flat(t, x).reshape(-1))(theta0)
            lam = torch.autograd.functional.hessian(
                lambda zz, y=y, shape=z.shape: loss_fn(zz.view(shape), y), z.reshape(-1)
            )
            J, lam = J.detach(), lam.detach()
            ref.jacobians.append(J)
            ref.lambdas.append(lam)
            ggn += wb * J.T @ lam @ J
    ref.ggn = ggn

    if per_example:
        rows = []
        with torch.enable_grad():
            for x, y in batches:
                for i in range(int(y.shape[0])):
                    t = theta0.detach().clone().requires_grad_(True)
                    loss_i = loss_fn(flat(t, slice_fn(x, i)), y[i : i + 1])
                    rows.append(torch.autograd.grad(loss_i, t)[0].detach())
        ref.per_example_grads = torch.stack(rows)
        n_total = sum(int(y.shape[0]) for _, y in batches)
        scale = 1.0 / n_total if reduction == "mean" else 1.0
        ref.fisher = scale * ref.per_example_grads.T @ ref.per_example_grads
    ref.fisher_batch = torch.outer(ref.gradient, ref.gradient)
    return ref


# ------------------------------------------------------------------------------------------------
# Finite-difference checks of a reference (see tests/dense_reference.py for the step choice).

FD_STEP = 1e-5
FD_TOL = 1e-7


def _central(fn: Callable, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (fn(theta + FD_STEP * v) - fn(theta - FD_STEP * v)) / (2 * FD_STEP)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def finite_difference_errors(ref: DenseReference, num_dirs: int = 2, seed: int = 0) -> dict:
    """Relative errors of every reference quantity against central differences (worst of dirs).

    gradient (FD of h), hessian (FD of ∇h), jacobian (FD of f on each batch), ggn (FD of the
    linearized model's gradient Σ_b w_b J_bᵀ ∇L_b(z_b + J_b δ) at δ = 0), per_example_grads (FD of
    every ℓ_n), and, without FD, the symmetry of H and Q and Σ_n g_n against G.
    """
    gen = torch.Generator().manual_seed(seed)
    theta = ref.theta
    errs: dict[str, float] = {}

    def bump(key: str, value: float) -> None:
        errs[key] = max(errs.get(key, 0.0), value)

    z0 = [ref.flat(theta, x).detach() for x, _ in ref.batches]

    def linearized_grad(delta: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(theta)
        for wb, z, J, (_, y) in zip(ref.weights, z0, ref.jacobians, ref.batches, strict=True):
            zl = (z.reshape(-1) + J @ delta).requires_grad_(True)
            with torch.enable_grad():
                (dz,) = torch.autograd.grad(ref.loss_fn(zl.view(z.shape), y), zl)
            total += wb * J.T @ dz
        return total

    with torch.no_grad():
        for _ in range(num_dirs):
            v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
            v /= v.norm()
            fd = _central(ref.risk, theta, v)
            bump("gradient", float((fd - ref.gradient @ v).abs() / ref.gradient.norm()))
            bump("hessian", _rel(_central(ref.grad_at, theta, v), ref.hessian @ v))
            for (x, _), J in zip(ref.batches, ref.jacobians, strict=True):
                fd_f = _central(lambda t, x=x: ref.flat(t, x).reshape(-1), theta, v)
                bump("jacobian", _rel(fd_f, J @ v))
            zero = torch.zeros_like(theta)
            bump("ggn", _rel(_central(linearized_grad, zero, v), ref.ggn @ v))
            if ref.per_example:
                fd_l = _central(ref.example_losses, theta, v)
                bump("per_example_grads", _rel(fd_l, ref.per_example_grads @ v))
    bump("hessian_symmetry", _rel(ref.hessian, ref.hessian.T))
    bump("ggn_symmetry", _rel(ref.ggn, ref.ggn.T))
    if ref.per_example:
        # Σ_n g_n weighted as the risk: equal to G when the examples of a batch are independent.
        sizes = [int(y.shape[0]) for _, y in ref.batches]
        per_w = torch.cat(
            [
                torch.full((n,), wb / (n if ref.reduction == "mean" else 1), dtype=theta.dtype)
                for wb, n in zip(ref.weights, sizes, strict=True)
            ]
        )
        bump("examples_sum_to_gradient", _rel(per_w @ ref.per_example_grads, ref.gradient))
    return errs


def assert_reference_valid(ref: DenseReference, tol: float = FD_TOL) -> dict:
    errs = finite_difference_errors(ref)
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"reference disagrees with finite differences / itself: {bad} (all: {errs})"
    # Λ of a convex loss is PSD, so Q is PSD up to rounding.
    eig = torch.linalg.eigvalsh(ref.ggn)
    assert eig.min() >= -1e-10 * eig.abs().max(), "Q is not PSD"
    return errs


# ------------------------------------------------------------------------------------------------
# Comparisons and errors.


def random_vectors(p: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p, k, generator=gen, dtype=torch.float64)


@contextlib.contextmanager
def raises(exc: type[BaseException], *words: str) -> Iterator[Any]:
    """``pytest.raises(exc)`` that also checks that every word appears in the message."""
    with pytest.raises(exc) as info:
        yield info
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in error message {message!r}"


def perturb_(model: nn.Module, scale: float, seed: int) -> nn.Module:
    """Add scale·N(0, 1) to every parameter: nonzero biases, norms away from 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


# ------------------------------------------------------------------------------------------------
# Small models.

EMBED = 8
HEADS = 2
CLASSES = 3


class MHANet(nn.Module):
    """Linear → nn.MultiheadAttention (self-attention, batch_first) → tanh → mean → Linear."""

    def __init__(self, d_in: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, EMBED)
        self.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
        self.head = nn.Linear(EMBED, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(a).mean(1))


class EncoderNet(nn.Module):
    """Linear → nn.TransformerEncoder (2 layers) → masked mean → Linear; ``model(x, mask)``."""

    def __init__(self, d_in: int = 3, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, EMBED)
        layer = nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=12, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)
        self.head = nn.Linear(EMBED, CLASSES)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(self.embed(x), src_key_padding_mask=padding)
        if padding is None:
            return self.head(h.mean(1))
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class EncoderLayerNet(nn.Module):
    """Linear → one nn.TransformerEncoderLayer (norm_first) → mean → Linear."""

    def __init__(self, d_in: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, EMBED)
        self.layer = nn.TransformerEncoderLayer(
            EMBED, HEADS, dim_feedforward=12, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(EMBED, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x)).mean(1))


class DecoderNet(nn.Module):
    """nn.TransformerDecoderLayer, causal target mask, over a memory: ``model(tgt, memory)``."""

    def __init__(self, d_in: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, EMBED)
        self.memory = nn.Linear(d_in, EMBED)
        self.decoder = nn.TransformerDecoderLayer(
            EMBED, HEADS, dim_feedforward=12, batch_first=True
        )
        self.head = nn.Linear(EMBED, CLASSES)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        t = tgt.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=tgt.dtype)
        h = self.decoder(self.embed(tgt), self.memory(memory), tgt_mask=mask, tgt_is_causal=True)
        return self.head(h.mean(1))


class SDPANet(nn.Module):
    """Multi-head attention written with ``F.scaled_dot_product_attention`` (dropout_p=0).

    ``mask=None``: causal (``is_causal=True``); else ``attn_mask=mask`` (a buffer).
    """

    def __init__(self, d_in: int = 3, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qkv = nn.Linear(d_in, 3 * EMBED)
        self.head = nn.Linear(EMBED, CLASSES)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, EMBED // HEADS).permute(2, 0, 3, 1, 4)
        if self.mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.0)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=0.0)
        return self.head(torch.tanh(a.transpose(1, 2).reshape(b, t, EMBED)).mean(1))


def eval64(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """The model in float64 and eval mode, its parameters perturbed (reproducibly)."""
    return perturb_(model.double().eval(), scale, seed)


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
