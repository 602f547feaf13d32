r"""ADLER: SGD whose learning rate minimizes the local quadratic model (Balboni & Bacciu, Alg. 1).

Per batch k, with G_k = ∇h_I(θ_k) and the curvature C (the paper's Q by default):

.. math::

    \eta_k = \frac{G_k^\top G_k}{G_k^\top C G_k + \varepsilon\, G_k^\top G_k}, \qquad
    s_{k+1} = \beta s_k + \log \eta_k, \quad c_{k+1} = \beta c_k + 1, \quad
    \hat\eta_k = \exp(s_{k+1} / c_{k+1}), \qquad \theta_{k+1} = \theta_k - \hat\eta_k G_k,

with s_0 = c_0 = 0, β = 0.99, ε = 1e-10. ε is read as C + εI (our interpretation of the paper's
"Hessian regularization", DESIGN.md §3). The GN variants average η_k arithmetically (footnote 10).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from hessian_lab.core import ModelInputs, OutputFn, vector_to_params
from hessian_lab.optim.averaging import average_value, check_averaging, update_average
from hessian_lab.optim.distributed import weighted_all_reduce
from hessian_lab.optim.step_size import CURVATURES, StepSizeEstimator, quadratic_step

#: Averaging rule of each curvature when ``averaging=None`` (paper: log for Q, arithmetic for GN).
DEFAULT_AVERAGING = {"ggn": "log", "hessian": "log", "ef": "arithmetic", "ef_batch": "arithmetic"}

# Bit flags of why a step was skipped, and what the error message says about each.
_REASONS = (
    (1, "the loss was not finite"),
    (2, "the gradient G was not finite"),
    (4, "the curvature term GᵀCG was not finite"),
    (
        8,
        "GᵀCG + ε GᵀG ≤ 0, so the quadratic model has no minimizer along G (with "
        "curvature='hessian' the Hessian is indefinite there; curvature='ggn' is PSD)",
    ),
    (16, "η_k was not a finite positive number (e.g. G = 0)"),
)


class ADLERRecord(NamedTuple):
    """What one :meth:`ADLER.step` saw, as 0-dim tensors (read them only when you log them).

    Attributes:
        loss: h_I(θ_k), the batch loss before the update.
        eta: η_k = GᵀG / (GᵀCG + ε GᵀG), NaN when undefined.
        eta_hat: η̂_k, the learning rate applied to G (after ``max_lr``/``trust_region`` when
            set; on a skipped step the current average, which was not applied).
        grad_sq: GᵀG.
        curvature: GᵀCG.
        skipped: True when the parameters were left untouched.
    """

    loss: torch.Tensor
    eta: torch.Tensor
    eta_hat: torch.Tensor
    grad_sq: torch.Tensor
    curvature: torch.Tensor
    skipped: torch.Tensor


class ADLER(torch.optim.Optimizer):
    r"""ADaptive LEarning Rate SGD (Algorithm 1 of Balboni & Bacciu) as a ``torch.optim`` optimizer.

    Each :meth:`step` costs one forward + backward for G and, for ``"ggn"``/``"ef"``, one
    forward-mode JVP for u = J G (no extra backward); ``"ef_batch"`` costs nothing more than SGD;
    ``"hessian"`` one Hessian-vector product (double backward).

    Args:
        model: The network, or a ``DistributedDataParallel`` wrapper (then G and GᵀCG are
            all-reduced with the weights of one process on the concatenated batch, so η_k is
            identical on every rank; computation runs on ``model.module``).
        loss_fn: The loss ``(outputs, targets) -> scalar``, ``reduction`` ``"mean"`` or ``"sum"``.
        curvature: C: ``"ggn"`` (the paper's Q, ADLER), ``"ef"`` (the paper's GN, per example),
            ``"ef_batch"`` (GN = G Gᵀ, η_k = 1/(‖G‖² + ε)) or ``"hessian"`` (exact H).
        beta: β ∈ [0, 1], the discount of the running average.
        eps: ε ≥ 0 of C + εI.
        params: ``None`` for every trainable parameter, or a list of names; the others stay fixed.
        averaging: ``"log"`` or ``"arithmetic"``; ``None`` picks the paper's rule (log for
            ``"ggn"``/``"hessian"``, arithmetic for ``"ef"``/``"ef_batch"``).
        max_lr: Off by default. Cap the applied rate: min(η̂_k, max_lr).
        trust_region: Off by default. Bound the step length: ‖θ_{k+1} − θ_k‖ ≤ trust_region,
            i.e. the applied rate is min(η̂_k, Δ/‖G‖) (the paper's future work, DESIGN.md §3).
        curvature_fraction: Off by default. Estimate GᵀCG on the first ⌈f·N⌉ examples of the
            batch, cutting the JVP's cost by about f.
        beta_schedule: Off by default. A callable k -> β_k used instead of ``beta`` (the paper's
            footnote 11 wishes β_k → 1). Not saved in ``state_dict``: pass the same callable
            when resuming.
        max_consecutive_skips: Raise ``RuntimeError`` after this many consecutive skipped steps
            (``None``: never). On CPU the check is immediate; on CUDA it reads a flag copied
            asynchronously, so it may raise a few steps late but never synchronizes the step.
        allow_train_mode: Accept BatchNorm/Dropout in train mode.
        reduction: For a plain callable loss without a ``reduction`` attribute, ``"mean"`` or
            ``"sum"`` (required for ``"ef"``); see
            :class:`~hessian_lab.output_curvature.LossReduction`.
        output_fn: Maps the model's output to the tensor the loss takes (default: a tensor,
            else its ``logits``, as a Hugging Face ``ModelOutput`` has).
        jvp_method: ``"auto"`` (default), ``"forward"`` (``torch.func.jvp``) or
            ``"double_backward"`` (reuse the gradient pass's forward); see
            :class:`~hessian_lab.optim.step_size.StepSizeEstimator`. Same u = J G up to
            rounding; only the cost differs. ``"auto"`` is deterministic (chosen from the
            model's layers), so runs stay reproducible.

    A step whose loss, gradient, curvature or η_k is not finite (or whose GᵀCG + εGᵀG ≤ 0)
    leaves the parameters and the averages untouched and returns ``skipped=True``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessian_lab.optim import ADLER
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = ADLER(model, nn.CrossEntropyLoss())
        >>> rec = opt.step(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> bool(rec.skipped), bool(rec.eta_hat == rec.eta)  # η̂_0 = η_0
        (False, True)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        curvature: str = "ggn",
        beta: float = 0.99,
        eps: float = 1e-10,
        params: Sequence[str] | None = None,
        averaging: str | None = None,
        max_lr: float | None = None,
        trust_region: float | None = None,
        curvature_fraction: float | None = None,
        beta_schedule: Callable[[int], float] | None = None,
        max_consecutive_skips: int | None = 10,
        allow_train_mode: bool = False,
        jvp_method: str = "auto",
        *,
        reduction: str | None = None,
        output_fn: OutputFn | None = None,
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"curvature={curvature!r} is not one of {CURVATURES}.")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}.")
        averaging = check_averaging(
            DEFAULT_AVERAGING[curvature] if averaging is None else averaging
        )
        for name, value in (("max_lr", max_lr), ("trust_region", trust_region)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value}.")
        if max_consecutive_skips is not None and max_consecutive_skips < 1:
            raise ValueError(
                f"max_consecutive_skips must be >= 1 or None, got {max_consecutive_skips}."
            )
        self._estimator = StepSizeEstimator(
            model,
            loss_fn,
            curvature,
            params,
            eps,
            curvature_fraction,
            allow_train_mode,
            jvp_method,
            reduction=reduction,
            output_fn=output_fn,
        )
        self._process_group = None
        self._distributed = False
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self._process_group = model.process_group
            self._distributed = (
                dist.is_initialized() and dist.get_world_size(model.process_group) > 1
            )
        self.beta_schedule = beta_schedule
        defaults = {
            "curvature": curvature,
            "beta": float(beta),
            "eps": float(eps),
            "averaging": averaging,
            "max_lr": max_lr,
            "trust_region": trust_region,
            "curvature_fraction": curvature_fraction,
            "max_consecutive_skips": max_consecutive_skips,
            "has_beta_schedule": beta_schedule is not None,
            "jvp_method": jvp_method,
        }
        super().__init__(list(self._estimator.params.values()), defaults)
        first = next(iter(self._estimator.params.values()))
        # The averages in at least float32: log-averaging in bf16 would lose the rate.
        self._avg_dtype = torch.promote_types(first.dtype, torch.float32)
        zero = torch.zeros((), dtype=self._avg_dtype, device=first.device)
        self._s, self._c = zero.clone(), zero.clone()
        self._skips = torch.zeros((), dtype=torch.int64, device=first.device)
        self._reasons = torch.zeros((), dtype=torch.int64, device=first.device)
        self._num_steps = 0
        self._pending: tuple[Any, torch.Tensor] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refuse a second group: one η_k is computed for all of θ."""
        if self.param_groups:
            raise ValueError(
                "ADLER computes one learning rate for all selected parameters; choose them with "
                "the params argument instead of adding a parameter group."
            )
        super().add_param_group(param_group)

    @property
    def num_steps(self) -> int:
        """k, the number of steps taken so far (skipped ones included)."""
        return self._num_steps

    @property
    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_k, c_k) of the running average."""
        return self._s, self._c

    def step(self, inputs: ModelInputs, targets: torch.Tensor) -> ADLERRecord:  # type: ignore[override]
        """One ADLER update on the batch (inputs, targets); returns an :class:`ADLERRecord`.

        ``inputs`` is a tensor (``model(x)``), a tuple of tensors (``model(*x)``) or a dict of
        tensors (``model(**x)``).
        """
        group = self.param_groups[0]
        est = self._estimator
        # Options live in the param group so that load_state_dict restores them.
        est.curvature = group["curvature"]
        est.curvature_fraction = group["curvature_fraction"]
        est.jvp_method = group["jvp_method"]
        averaging = group["averaging"]

        gp = est.gradient_pass(inputs, targets)
        loss = gp.loss
        if self._distributed:
            # One collective for G and the loss; G's tensors become views of the reduced buffer.
            packed = torch.cat([g.reshape(-1) for g in gp.gradient.values()] + [loss.reshape(1)])
            weight = est.loss_reduction.denominator(targets)  # N_b, or summed class weights
            packed = weighted_all_reduce(packed, weight, est.reduction, self._process_group)
            loss = packed[-1]
            gp.gradient = vector_to_params(packed[:-1], gp.gradient)  # "ef_batch" needs global G
        grads = list(gp.gradient.values())
        # ‖G‖² from per-tensor norms: no P-sized temporary (those cost page faults on CPU).
        grad_sq = torch.stack(torch._foreach_norm(grads)).square().sum()
        curv = est.curvature_along(gp, gp.gradient)
        if self._distributed and group["curvature"] != "ef_batch":
            # GᵀG is global already; GᵀCG is a per-rank mean until reduced (DESIGN.md §6).
            sub_weight = est.loss_reduction.denominator(gp.targets)  # the curvature's examples
            curv = weighted_all_reduce(
                curv.reshape(1), sub_weight, est.reduction, self._process_group
            )[0]
        q = quadratic_step(grad_sq, curv, grad_sq, group["eps"])
        eta = q.eta

        bad_eta = ~(torch.isfinite(eta) & (eta > 0))
        flags = (
            (~torch.isfinite(loss)).long()
            + 2 * (~torch.isfinite(grad_sq)).long()
            + 4 * (~torch.isfinite(curv)).long()
            + 8 * (q.nonpositive_curvature & torch.isfinite(curv)).long()
            + 16 * bad_eta.long()
        )
        ok = flags == 0

        beta = self.beta_schedule(self._num_steps) if self.beta_schedule else group["beta"]
        safe_eta = torch.where(ok, eta, torch.ones_like(eta)).to(self._avg_dtype)
        s_new, c_new = update_average(self._s, self._c, safe_eta, beta, averaging)
        self._s = torch.where(ok, s_new, self._s)
        self._c = torch.where(ok, c_new, self._c)
        eta_hat = average_value(self._s, self._c, averaging)
        lr = eta_hat
        if group["max_lr"] is not None:
            lr = torch.clamp(lr, max=group["max_lr"])
        if group["trust_region"] is not None:
            lr = torch.minimum(lr, group["trust_region"] / torch.sqrt(grad_sq.to(lr.dtype)))

        with torch.no_grad():
            rate = torch.where(ok, -lr, torch.zeros_like(lr)).to(grads[0].dtype)
            if grads[0].device.type == "cpu":
                if bool(ok):  # free on CPU: no device to synchronize with
                    torch._foreach_addcmul_(group["params"], grads, [rate] * len(grads))
            else:
                # No branch on ok (a host sync): zero the non-finite entries so that a zero
                # rate gives an exactly zero update (0 · NaN would still poison θ).
                for g in grads:
                    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                torch._foreach_addcmul_(group["params"], grads, [rate] * len(grads))

        self._skips = torch.where(ok, torch.zeros_like(self._skips), self._skips + 1)
        self._reasons = torch.where(ok, torch.zeros_like(self._reasons), self._reasons | flags)
        self._num_steps += 1
        self._check_skips(group["max_consecutive_skips"])
        return ADLERRecord(loss, eta, lr, grad_sq, curv, ~ok)

    # ---------------------------------------------------------------------------------------

    def _check_skips(self, limit: int | None) -> None:
        if limit is None:
            return
        if self._skips.device.type != "cuda":
            self._raise_if_stuck(int(self._skips), int(self._reasons), limit)
            return
        # CUDA: read a copy made asynchronously at an earlier step, once it has landed.
        if self._pending is not None:
            event, host = self._pending
            if not event.query():
                return
            self._pending = None
            self._raise_if_stuck(int(host[0]), int(host[1]), limit)
        host = torch.stack([self._skips, self._reasons]).to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (event, host)

    def _raise_if_stuck(self, skips: int, reasons: int, limit: int) -> None:
        if skips < limit:
            return
        why = "; ".join(text for bit, text in _REASONS if reasons & bit) or "unknown"
        raise RuntimeError(
            f"ADLER skipped {skips} consecutive steps (max_consecutive_skips={limit}) and left "
            f"the parameters untouched: {why}. Check the inputs and the model for NaN/inf, "
            "consider max_lr or trust_region if the loss diverged, or raise "
            "max_consecutive_skips."
        )

    # ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state: options (in ``param_groups``), s_k, c_k, k and the skip count."""
        state = super().state_dict()
        state["adler"] = {
            "num_steps": self._num_steps,
            "s": self._s.clone(),
            "c": self._c.clone(),
            "consecutive_skips": self._skips.clone(),
            "skip_reasons": self._reasons.clone(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: a resumed run continues exactly where it stopped."""
        state_dict = dict(state_dict)
        if "adler" not in state_dict:
            raise ValueError("This is not an ADLER state dict (it has no 'adler' entry).")
        adler = state_dict.pop("adler")
        saved = state_dict["param_groups"][0]
        if saved.get("has_beta_schedule", False) != (self.beta_schedule is not None):
            raise ValueError(
                "The checkpoint was made with a beta_schedule and this optimizer has none (or "
                "the reverse); pass the same beta_schedule callable to ADLER when resuming."
            )
        if saved.get("curvature") not in CURVATURES:
            raise ValueError(f"Unknown curvature {saved.get('curvature')!r} in the state dict.")
        check_averaging(saved.get("averaging"))
        super().load_state_dict(state_dict)
        device = self._s.device
        self._s = adler["s"].to(device=device, dtype=self._avg_dtype).clone()
        self._c = adler["c"].to(device=device, dtype=self._avg_dtype).clone()
        self._skips = adler["consecutive_skips"].to(device).clone()
        self._reasons = adler["skip_reasons"].to(device).clone()
        self._num_steps = int(adler["num_steps"])
        self._pending = None
