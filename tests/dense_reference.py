"""Dense float64 references for the curvature operators, built independently of hessian_lab.

Nothing here imports the library under test. For a model z = f(x; θ) written as a function of a
flat θ ∈ R^P, a loss kind ("ce", "mse", "bce") and a reduction ("mean", "sum"):

* risk h(θ) = w Σ_n ℓ_n(z_n), w = 1/N ("mean") or 1 ("sum"), where ℓ_n is the example's own loss
  (for MSE/BCE with "mean": averaged over the example's output elements, as PyTorch's mean does);
* H column by column by double backward (``torch.autograd.grad`` twice; not ``torch.func.hessian``,
  which is wrong through LayerNorm in torch 2.13, DESIGN.md §6);
* J from ``torch.func.jacrev``, Λ_n from explicit formulas, Q = w Σ_n J_nᵀ Λ_n J_n written out;
* GN = w Σ_n g_n g_nᵀ from per-example gradients g_n computed one example at a time, and
  GN_batch = G Gᵀ.

:func:`finite_difference_errors` checks each of these against central finite differences.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hessian_lab.experiments.models import build_model

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MODELS = ("mlp", "cnn", "rescnn", "vit")
ACTIVATIONS = ("relu", "sigmoid", "tanh")
LOSSES = ("ce", "mse", "bce")
REDUCTIONS = ("mean", "sum")
NUM_CLASSES = 3
# N = 9 examples: one batch, a list of batches [4, 3, 2], a DataLoader of batch size 4 -> [4, 4, 1].
NUM_EXAMPLES = 9
LIST_SPLIT = (4, 3, 2)
LOADER_BATCH = 4

# Tiny instances (P = 133 to 231) so that a dense P x P reference costs well under a second.
TINY = {
    "mlp": dict(in_shape=(1, 4, 4), width=5, depth=2),
    "cnn": dict(in_shape=(1, 6, 6), width=3, depth=1),
    "rescnn": dict(in_shape=(1, 6, 6), width=3, depth=1),
    "vit": dict(in_shape=(1, 4, 4), width=4, depth=1, patch_size=2, heads=2),
}


# ------------------------------------------------------------------------------------------------
# Losses, written per example.


def make_loss(kind: str, reduction: str) -> nn.Module:
    """The PyTorch loss module the operators are given."""
    cls = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[kind]
    return cls(reduction=reduction)


def make_targets(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Class indices for CE; real targets for MSE; soft labels in (0, 1) for BCE (float32)."""
    if kind == "ce":
        return torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    if kind == "mse":
        return torch.randn(n, NUM_CLASSES, generator=gen)
    return torch.rand(n, NUM_CLASSES, generator=gen)


def per_example_losses(kind: str, reduction: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ_n for each example, ``[N]``; MSE/BCE "mean" averages over the outputs of one example."""
    if kind == "ce":
        logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
        return -logp.gather(-1, y.view(-1, 1)).squeeze(-1)
    if kind == "mse":
        elems = (z - y) ** 2
    else:  # log(1 + e^z) - y z, written stably
        elems = torch.clamp(z, min=0) - y * z + torch.log1p(torch.exp(-z.abs()))
    return elems.mean(dim=-1) if reduction == "mean" else elems.sum(dim=-1)


def risk_weight(reduction: str, n: int) -> float:
    """w in h = w Σ_n ℓ_n."""
    return 1.0 / n if reduction == "mean" else 1.0


def output_hessians(kind: str, reduction: str, z: torch.Tensor) -> torch.Tensor:
    """Λ_n = ∇²_z ℓ_n from the closed formulas, ``[N, C, C]`` (CE: diag(p) − ppᵀ, ...)."""
    n, c = z.shape
    if kind == "ce":
        p = torch.softmax(z, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    scale = 1.0 / c if reduction == "mean" else 1.0
    if kind == "mse":
        return 2.0 * scale * torch.eye(c, dtype=z.dtype).expand(n, c, c).clone()
    s = torch.sigmoid(z)
    return scale * torch.diag_embed(s * (1 - s))


# ------------------------------------------------------------------------------------------------
# Models as functions of a flat θ.


def unflatten(theta: torch.Tensor, shapes: list[tuple[str, torch.Size]]) -> dict:
    out, offset = {}, 0
    for name, shape in shapes:
        numel = shape.numel()
        out[name] = theta[offset : offset + numel].view(shape)
        offset += numel
    return out


def module_forward(model: nn.Module) -> tuple[Forward, torch.Tensor, list[str]]:
    """(f(θ, x), θ₀, names) for all parameters of ``model``, in ``named_parameters`` order.

    Buffers enter as fresh copies, so a train-mode BatchNorm neither changes the model nor
    mutates a tensor captured by ``jacrev``.
    """
    named = list(model.named_parameters())
    shapes = [(n, p.shape) for n, p in named]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def forward(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return torch.func.functional_call(model, {**buffers, **unflatten(theta, shapes)}, (x,))

    return forward, theta0, [n for n, _ in named]


def offsets(model: nn.Module) -> dict[str, slice]:
    """Slice of each parameter inside the flat θ of :func:`module_forward`."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


# ------------------------------------------------------------------------------------------------
# The reference.


@dataclass
class DenseReference:
    """All float64 reference quantities at θ₀ on the whole data (x, y)."""

    kind: str
    reduction: str
    forward: Forward
    theta: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    gradient: torch.Tensor
    hessian: torch.Tensor
    jacobian: torch.Tensor  # [N, C, P]
    lambdas: torch.Tensor  # [N, C, C]
    ggn: torch.Tensor
    per_example_grads: torch.Tensor  # [N, P]
    fisher: torch.Tensor
    fisher_batch: torch.Tensor
    # Signs of every ReLU input at θ (None for smooth models): FD is valid only off the kinks.
    pattern: Callable[[torch.Tensor], torch.Tensor] | None = None

    def risk(self, theta: torch.Tensor) -> torch.Tensor:
        z = self.forward(theta, self.x)
        per = per_example_losses(self.kind, self.reduction, z, self.y)
        return risk_weight(self.reduction, len(per)) * per.sum()

    def grad_at(self, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(self.risk(theta), theta)[0]

    def matrix(self, name: str) -> torch.Tensor:
        return {
            "hessian": self.hessian,
            "ggn": self.ggn,
            "fisher": self.fisher,
            "fisher_batch": self.fisher_batch,
        }[name]


def dense_hessian(
    risk_fn: Callable[[torch.Tensor], torch.Tensor], theta0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, ∇h, ∇²h) at θ₀: the Hessian row by row, one double backward per row."""
    with torch.enable_grad():
        theta = theta0.detach().clone().requires_grad_(True)
        risk = risk_fn(theta)
        (g,) = torch.autograd.grad(risk, theta, create_graph=True)
        rows = []
        for i in range(theta.numel()):
            (row,) = torch.autograd.grad(g[i], theta, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(theta) if row is None else row)
    return risk.detach(), g.detach(), torch.stack(rows).detach()


def build_reference(
    forward: Forward,
    theta0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    kind: str,
    reduction: str,
    *,
    jacobian: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    pattern: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DenseReference:
    """Compute every reference quantity in float64 (inputs must already be float64).

    ``jacobian`` and ``hessian`` may be passed in when already known (J does not depend on the
    loss; see :func:`get_case`); both are checked against finite differences in the tests.
    """
    assert theta0.dtype == torch.float64 and x.dtype == torch.float64
    n = x.shape[0]
    w = risk_weight(reduction, n)
    ref = DenseReference(kind, reduction, forward, theta0.detach(), x, y, *([None] * 9))
    ref.pattern = pattern

    if hessian is None:
        risk, g, hessian = dense_hessian(ref.risk, theta0)
    else:
        risk, g = ref.risk(theta0), ref.grad_at(theta0)
    ref.loss = risk.detach()
    ref.gradient = g.detach()
    ref.hessian = hessian.detach()

    if jacobian is None:
        jacobian = torch.func.jacrev(lambda t: forward(t, x))(theta0.detach())
    ref.jacobian = jacobian
    z = forward(theta0, x).detach()
    ref.lambdas = output_hessians(kind, reduction, z)
    ref.ggn = w * torch.einsum("nap,nab,nbq->pq", ref.jacobian, ref.lambdas, ref.jacobian)

    per_grads = []
    for i in range(n):
        with torch.enable_grad():
            theta = theta0.detach().clone().requires_grad_(True)
            loss_i = per_example_losses(kind, reduction, forward(theta, x[i : i + 1]), y[i : i + 1])
            per_grads.append(torch.autograd.grad(loss_i.sum(), theta)[0])
    ref.per_example_grads = torch.stack(per_grads)
    ref.fisher = w * ref.per_example_grads.T @ ref.per_example_grads
    ref.fisher_batch = torch.outer(ref.gradient, ref.gradient)
    return ref


# ------------------------------------------------------------------------------------------------
# Finite-difference checks of a reference.

# Central differences along a unit direction with step ε: truncation error ≈ ε²/6 · |third
# derivative| and rounding error ≈ u · |value| / ε with u = 2.2e-16. The sum is smallest near
# ε = (3u)^(1/3) ≈ 1e-5, where both are ~1e-10 relative for these O(1)-scaled tiny models
# (observed: at most 2e-9 over all 72 cases, worst for the ViT's Hessian); FD_TOL = 1e-7 leaves
# a factor 50 for larger third derivatives. Crossing a ReLU kink gives ~1e3 (see _direction).
FD_STEP = 1e-5
FD_TOL = 1e-7


def _central(fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, v: torch.Tensor):
    return (fn(theta + FD_STEP * v) - fn(theta - FD_STEP * v)) / (2 * FD_STEP)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _direction(ref: DenseReference, gen: torch.Generator) -> torch.Tensor:
    """A random unit direction v such that no ReLU input changes sign on [θ − εv, θ + εv].

    A ReLU network is piecewise smooth: a central difference across a kink measures a jump, not
    a derivative (seen here: relative error ~1e3 for one direction on the residual CNN).
    """
    for _ in range(50):
        v = torch.randn(ref.theta.shape, generator=gen, dtype=ref.theta.dtype)
        v /= v.norm()
        if ref.pattern is None:
            return v
        ends = [ref.pattern(ref.theta + s * FD_STEP * v) for s in (-1.0, 0.0, 1.0)]
        if all(torch.equal(ends[0], e) for e in ends[1:]):
            return v
    raise AssertionError("no direction avoids the ReLU kinks; use another seed")


def finite_difference_errors(ref: DenseReference, num_dirs: int = 2, seed: int = 0) -> dict:
    """Relative errors of the reference against central finite differences, worst over directions.

    * gradient: FD of h along v vs G·v (relative to ‖G‖, as G·v may be near 0);
    * hessian: FD of ∇h along v vs H v;
    * jacobian: FD of f along v vs J v;
    * ggn: FD along v of the linearized model's gradient w Σ J_nᵀ ∇ℓ_n(z_n + J_n δ) vs Q v;
    * per_example_grads: FD of every ℓ_n along v vs g_n·v;
    * lambdas: Λ_n from the formulas vs ``torch.autograd.functional.hessian`` of ℓ_n in z.
    """
    gen = torch.Generator().manual_seed(seed)
    theta, x, y = ref.theta, ref.x, ref.y
    w = risk_weight(ref.reduction, x.shape[0])
    z0 = ref.forward(theta, x).detach()
    errs = dict.fromkeys(
        ["gradient", "hessian", "jacobian", "ggn", "per_example_grads", "lambdas"], 0.0
    )

    def per_losses(t: torch.Tensor) -> torch.Tensor:
        return per_example_losses(ref.kind, ref.reduction, ref.forward(t, x), y)

    def linearized_grad(delta: torch.Tensor) -> torch.Tensor:
        zl = (z0 + torch.einsum("nap,p->na", ref.jacobian, delta)).requires_grad_(True)
        with torch.enable_grad():
            per = per_example_losses(ref.kind, ref.reduction, zl, y)
            (dz,) = torch.autograd.grad(per.sum(), zl)
        return w * torch.einsum("nap,na->p", ref.jacobian, dz)

    with torch.no_grad():
        for _ in range(num_dirs):
            v = _direction(ref, gen)
            fd = _central(ref.risk, theta, v)
            errs["gradient"] = max(
                errs["gradient"], float((fd - ref.gradient @ v).abs() / ref.gradient.norm())
            )
            errs["hessian"] = max(
                errs["hessian"], _rel(_central(ref.grad_at, theta, v), ref.hessian @ v)
            )
            jv = torch.einsum("nap,p->na", ref.jacobian, v)
            errs["jacobian"] = max(
                errs["jacobian"], _rel(_central(lambda t: ref.forward(t, x), theta, v), jv)
            )
            zero = torch.zeros_like(theta)
            errs["ggn"] = max(errs["ggn"], _rel(_central(linearized_grad, zero, v), ref.ggn @ v))
            errs["per_example_grads"] = max(
                errs["per_example_grads"],
                _rel(_central(per_losses, theta, v), ref.per_example_grads @ v),
            )
    for i in range(x.shape[0]):

        def loss_i(zi: torch.Tensor, i: int = i) -> torch.Tensor:
            return per_example_losses(ref.kind, ref.reduction, zi.unsqueeze(0), y[i : i + 1])[0]

        auto = torch.autograd.functional.hessian(loss_i, z0[i])
        errs["lambdas"] = max(errs["lambdas"], _rel(ref.lambdas[i], auto))
    return errs


# ------------------------------------------------------------------------------------------------
# The shared test problems.


@dataclass
class Case:
    """A tiny model (float32, eval mode) with its data and the float64 reference at its θ."""

    name: str
    activation: str
    model: nn.Module
    x: torch.Tensor  # float32
    y: torch.Tensor  # long (CE) or float32
    kind: str
    reduction: str
    ref: DenseReference

    def loss_fn(self) -> nn.Module:
        return make_loss(self.kind, self.reduction)

    def model_as(self, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
        """A copy of the model in ``dtype`` (float64 holds exactly the float32 values)."""
        return copy.deepcopy(self.model).to(device=device, dtype=dtype)

    def data_as(self, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        y = self.y if self.kind == "ce" else self.y.to(dtype)
        return self.x.to(device=device, dtype=dtype), y.to(device)


def seed_of(*key: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate("/".join(key)))


def relu_pattern(model: nn.Module, forward: Forward, x: torch.Tensor):
    """θ -> signs of the inputs of every ``nn.ReLU`` of ``model`` on x (None without ReLU)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        return None

    def pattern(theta: torch.Tensor) -> torch.Tensor:
        masks: list[torch.Tensor] = []
        hooks = [
            m.register_forward_hook(lambda mod, inp, out: masks.append(inp[0].reshape(-1) > 0))
            for m in relus
        ]
        try:
            with torch.no_grad():
                forward(theta, x)
        finally:
            for h in hooks:
                h.remove()
        return torch.cat(masks)

    return pattern


@dataclass
class _Base:
    model: nn.Module  # float32
    model64: nn.Module
    x: torch.Tensor  # float32
    forward: Forward
    theta0: torch.Tensor
    jacobian: torch.Tensor
    pattern: Callable[[torch.Tensor], torch.Tensor] | None


@functools.cache
def _base(name: str, activation: str) -> _Base:
    """Model, inputs, θ₀ and J for one (model, activation): J does not depend on the loss."""
    torch.manual_seed(seed_of(name, activation))
    model = build_model(name, activation=activation, num_classes=NUM_CLASSES, **TINY[name])
    with torch.no_grad():
        for p in model.parameters():
            # Nonzero biases, LayerNorm scales away from 1: no accidentally vanishing term.
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    x = torch.randn(NUM_EXAMPLES, *TINY[name]["in_shape"])
    model64 = copy.deepcopy(model).double()
    forward, theta0, _ = module_forward(model64)
    x64 = x.double()
    jacobian = torch.func.jacrev(lambda t: forward(t, x64))(theta0)
    return _Base(model, model64, x, forward, theta0, jacobian, relu_pattern(model64, forward, x64))


@functools.cache
def get_case(name: str, activation: str, kind: str, reduction: str) -> Case:
    """The case for one (model, activation, loss, reduction); its reference is computed once.

    The Hessian of the "sum" risk is the "mean" one times N·s (s = C for MSE/BCE, whose per-example
    "mean" loss is the sum over outputs divided by C; s = 1 for CE), so the double-backward loop
    runs once per (model, activation, loss). The finite-difference test checks both independently.
    """
    base = _base(name, activation)
    gen = torch.Generator().manual_seed(seed_of(name, activation, kind))
    y = make_targets(kind, NUM_EXAMPLES, gen)
    y64 = y if kind == "ce" else y.double()
    x64 = base.x.double()
    hessian = None
    if reduction == "sum":
        mean = get_case(name, activation, kind, "mean").ref.hessian
        hessian = NUM_EXAMPLES * (1 if kind == "ce" else NUM_CLASSES) * mean
    ref = build_reference(
        base.forward,
        base.theta0,
        x64,
        y64,
        kind,
        reduction,
        jacobian=base.jacobian,
        hessian=hessian,
        pattern=base.pattern,
    )
    return Case(name, activation, base.model, base.x, y, kind, reduction, ref)


def all_cases() -> list[tuple[str, str, str, str]]:
    """Every (model, activation, loss, reduction): 4 x 3 x 3 x 2 = 72."""
    return [(m, a, k, r) for m in MODELS for a in ACTIVATIONS for k in LOSSES for r in REDUCTIONS]


def rotated_cases() -> list[tuple[str, str, str, str]]:
    """One activation per (model, loss, reduction), rotating so that each appears 8 times (24)."""
    out = []
    for i, (m, k, r) in enumerate((m, k, r) for m in MODELS for k in LOSSES for r in REDUCTIONS):
        out.append((m, ACTIVATIONS[(i + i // 6) % 3], k, r))
    return out


def case_id(case: tuple[str, ...]) -> str:
    return "-".join(case)
