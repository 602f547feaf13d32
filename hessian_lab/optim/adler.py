r"""ADLER: SGD whose learning rate minimizes the local quadratic model (Balboni & Bacciu, Alg. 1).

Per batch k, with G_k = ∇h_I(θ_k) and the curvature C (the paper's Q by default):

.. math::

    \eta_k = \frac{G_k^\top G_k}{G_k^\top C G_k + \varepsilon\, G_k^\top G_k}, \qquad
    s_{k+1} = \beta s_k + \log \eta_k, \quad c_{k+1} = \beta c_k + 1, \quad
    \hat\eta_k = \exp(s_{k+1} / c_{k+1}), \qquad \theta_{k+1} = \theta_k - \mathrm{lr}\,
    \hat\eta_k G_k,

with s_0 = c_0 = 0, β = 0.99, ε = 1e-10 and lr = 1 (the paper's Algorithm 1; ``lr`` is the
param group's multiplier that ``torch.optim.lr_scheduler`` shapes). ε is read as C + εI (our
interpretation of the paper's "Hessian regularization", DESIGN.md §3). The GN variants average
η_k arithmetically (footnote 10).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from hessian_lab.core import (
    CallArguments,
    ModelInputs,
    OutputFn,
    batch_examples,
    vector_to_params,
)
from hessian_lab.optim.averaging import average_value, check_averaging, update_average
from hessian_lab.optim.distributed import weighted_all_reduce
from hessian_lab.optim.step_size import (
    CURVATURES,
    StepSizeEstimator,
    curvature_examples,
    quadratic_step,
)

#: Averaging rule of each curvature when ``averaging=None`` (paper: log for Q, arithmetic for GN).
DEFAULT_AVERAGING = {"ggn": "log", "hessian": "log", "ef": "arithmetic", "ef_batch": "arithmetic"}

#: The keys of ADLER's running state, kept in ``optimizer.state[first parameter]``.
STATE_KEYS = (
    "step",
    "average_numerator",
    "average_denominator",
    "consecutive_skips",
    "skip_reasons",
)

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
        loss: h_I(θ_k), the batch loss before the update (after the user's own backward: the
            loss of the curvature pass's batch; NaN for ``"ef_batch"``, which makes none).
        eta: η_k = GᵀG / (GᵀCG + ε GᵀG), NaN when undefined.
        eta_hat: η̂_k, the running average of η_k (on a skipped step the current average).
        applied_lr: The rate that multiplied G: lr · min(η̂_k, max_lr, Δ/‖G‖) (caps only when
            set); not applied on a skipped step.
        grad_sq: GᵀG.
        curvature: GᵀCG.
        skipped: True when the parameters were left untouched.
    """

    loss: torch.Tensor
    eta: torch.Tensor
    eta_hat: torch.Tensor
    applied_lr: torch.Tensor
    grad_sq: torch.Tensor
    curvature: torch.Tensor
    skipped: torch.Tensor


class ADLER(torch.optim.Optimizer):
    r"""ADaptive LEarning Rate SGD (Algorithm 1 of Balboni & Bacciu) as a ``torch.optim`` optimizer.

    Each step costs one forward + backward for G and, for ``"ggn"``/``"ef"``, one curvature
    pass for u = J G (no extra backward); ``"ef_batch"`` costs nothing more than SGD;
    ``"hessian"`` one Hessian-vector product (double backward).

    **The loops people write** (docs/optimizer.md has the recipes):

    * ``opt.step(inputs, targets)``: ADLER computes G itself on the batch (one forward +
      backward) and the curvature along it, then updates; ``.grad`` is neither read nor written.
    * ``loss.backward(); opt.step()``: G is the parameters' ``.grad`` as the user's backward left
      it (after clipping, AMP unscaling, accumulation, DDP's all-reduce); ADLER adds only the
      curvature pass, on the batch of the model's most recent forward with grad enabled (recorded
      by a forward pre-hook), with targets from ``step(targets=...)``, else from the latest call
      of ``loss_fn`` when it is an ``nn.Module`` (ADLER watches it), else from the ``labels``
      keyword of the recorded model call (Hugging Face). ``step(inputs=..., targets=...)`` names
      the curvature batch explicitly. With gradient accumulation the curvature is estimated on
      the last micro-batch. Returns the :class:`ADLERRecord`.
    * ``opt.step(closure)``: ``torch.optim``'s meaning: ``closure()`` zeroes the gradients, runs
      forward + backward and returns the loss; ADLER calls it, then proceeds as above, and
      returns the closure's loss (the record is :attr:`last_record`). PyTorch Lightning and the
      Hugging Face ``Trainer`` drive ADLER through these two forms.

    Args:
        model: The network, or a ``DistributedDataParallel`` wrapper (then GᵀCG is all-reduced
            with the weights of one process on the concatenated batch, and so is G when ADLER
            computes it, so η_k is identical on every rank; computation runs on
            ``model.module``).
        loss_fn: The loss ``(outputs, targets) -> scalar``, ``reduction`` ``"mean"`` or ``"sum"``.
        curvature: C: ``"ggn"`` (the paper's Q, ADLER), ``"ef"`` (the paper's GN, per example),
            ``"ef_batch"`` (GN = G Gᵀ, η_k = 1/(‖G‖² + ε)) or ``"hessian"`` (exact H).
        beta: β ∈ [0, 1], the discount of the running average.
        eps: ε ≥ 0 of C + εI.
        params: ``None`` for every trainable parameter, or a list of names; the others stay fixed.
        averaging: ``"log"`` or ``"arithmetic"``; ``None`` picks the paper's rule (log for
            ``"ggn"``/``"hessian"``, arithmetic for ``"ef"``/``"ef_batch"``).
        max_lr: Off by default. Cap the rate: min(η̂_k, max_lr) (kept in the param group as
            ``"rate_cap"``: schedulers such as ``OneCycleLR`` write their own ``"max_lr"``).
        trust_region: Off by default. Bound the step length: ‖θ_{k+1} − θ_k‖ ≤ trust_region
            (before ``lr``), i.e. the rate is min(η̂_k, Δ/‖G‖) (the paper's future work).
        curvature_fraction: Off by default. Estimate GᵀCG on the first ⌈f·N⌉ examples of the
            batch, cutting the curvature pass's cost by about f.
        beta_schedule: Off by default. A callable k -> β_k used instead of ``beta`` (the paper's
            footnote 11 wishes β_k → 1). Not saved in ``state_dict``: pass the same callable
            when resuming.
        max_consecutive_skips: Raise ``RuntimeError`` after this many consecutive skipped steps
            (``None``: never). On CPU the check is immediate; on CUDA it reads a flag copied
            asynchronously, so it may raise a few steps late but never synchronizes the step.
        allow_train_mode: Accept BatchNorm/Dropout in train mode.
        jvp_method: ``"auto"`` (default), ``"forward"`` (forward-mode AD) or
            ``"double_backward"`` (reuse the gradient pass's forward); see
            :class:`~hessian_lab.optim.step_size.StepSizeEstimator`. Same u = J G up to
            rounding; only the cost differs. After the user's own backward, forward mode is used
            (that backward's graph is gone).
        lr: The param group's multiplier of the rate, default 1.0 (the paper). Schedulers from
            ``torch.optim.lr_scheduler`` change it; η_k and η̂_k do not depend on it.
        reduction: For a plain callable loss without a ``reduction`` attribute, ``"mean"`` or
            ``"sum"`` (required for ``"ef"``); see
            :class:`~hessian_lab.output_curvature.LossReduction`.
        output_fn: Maps the model's output to the tensor the loss takes (default: a tensor,
            else its ``logits``, as a Hugging Face ``ModelOutput`` has).

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
        lr: float = 1.0,
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
        _check_lr(lr)
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
            "lr": float(lr),
            "curvature": curvature,
            "beta": float(beta),
            "eps": float(eps),
            "averaging": averaging,
            # Not "max_lr": OneCycleLR and CyclicLR write that key into the param group.
            "rate_cap": max_lr,
            "trust_region": trust_region,
            "curvature_fraction": curvature_fraction,
            "max_consecutive_skips": max_consecutive_skips,
            "has_beta_schedule": beta_schedule is not None,
            "jvp_method": jvp_method,
        }
        super().__init__(list(self._estimator.params.values()), defaults)
        self._first = next(iter(self._estimator.params.values()))
        # The averages in at least float32: log-averaging in bf16 would lose the rate.
        self._avg_dtype = torch.promote_types(self._first.dtype, torch.float32)
        self._reset_state()
        self._pending: tuple[Any, torch.Tensor] | None = None
        #: The :class:`ADLERRecord` of the latest step.
        self.last_record: ADLERRecord | None = None
        self._recorded_call: tuple[tuple, dict] | None = None
        self._recorded_targets: torch.Tensor | None = None
        self._own_pass = False
        for handle in self._watch(model, loss_fn):
            weakref.finalize(self, handle.remove)  # no hook outlives its optimizer

    # ---------------------------------------------------------------------------------------
    # State: everything that a resumed run needs lives in self.state / the param group.

    def _reset_state(self) -> None:
        device = self._first.device
        zero = torch.zeros((), dtype=self._avg_dtype, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        self.state[self._first] = {
            "step": 0,
            "average_numerator": zero.clone(),  # s_k
            "average_denominator": zero.clone(),  # c_k
            "consecutive_skips": count.clone(),
            "skip_reasons": count.clone(),
        }

    @property
    def _adler_state(self) -> dict[str, Any]:
        return self.state[self._first]

    @property
    def num_steps(self) -> int:
        """k, the number of steps taken so far (skipped ones included)."""
        return int(self._adler_state["step"])

    @property
    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_k, c_k) of the running average."""
        st = self._adler_state
        return st["average_numerator"], st["average_denominator"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refuse a second group: one η_k is computed for all of θ."""
        if self.param_groups:
            raise ValueError(
                "ADLER computes one learning rate for all selected parameters; choose them with "
                "the params argument instead of adding a parameter group."
            )
        super().add_param_group(param_group)

    # ---------------------------------------------------------------------------------------
    # Watching the user's own forward and loss, for steps after the user's backward.

    def _watch(self, model: nn.Module, loss_fn: Any) -> list[Any]:
        """Forward pre-hooks on the model and an ``nn.Module`` loss (class docstring)."""
        module = self._estimator.module
        me = weakref.ref(self)  # the model must not keep the optimizer alive

        def record_forward(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            opt = me()
            # A deep copy of the model carries this hook: only the watched module counts.
            if opt is None or opt._own_pass or mod is not module or not torch.is_grad_enabled():
                return
            opt._recorded_call = (tuple(args), dict(kwargs))
            opt._recorded_targets = None

        hooks = [module.register_forward_pre_hook(record_forward, with_kwargs=True)]
        if isinstance(loss_fn, nn.Module):

            def record_loss(mod: nn.Module, args: tuple) -> None:
                opt = me()
                if opt is None or opt._own_pass or len(args) < 2:
                    return
                if isinstance(args[1], torch.Tensor):
                    opt._recorded_targets = args[1]

            hooks.append(loss_fn.register_forward_pre_hook(record_loss))
        return hooks

    def _recorded_batch(
        self, inputs: ModelInputs | None, targets: torch.Tensor | None
    ) -> tuple[ModelInputs, torch.Tensor]:
        """The curvature pass's batch after the user's backward (class docstring)."""
        labels = None
        if inputs is None:
            if self._recorded_call is None:
                raise RuntimeError(
                    "ADLER.step() without a batch computes the curvature on the batch of the "
                    "model's most recent forward, but it saw none (a forward with grad enabled, "
                    "after this optimizer was built). Call opt.step(inputs, targets), or pass "
                    "the curvature batch: opt.step(inputs=x, targets=y)."
                )
            args, kwargs = self._recorded_call
            labels = kwargs.get("labels")
            kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
            if args and kwargs:  # e.g. model(input_ids, attention_mask=mask, labels=y)
                inputs = CallArguments(args, kwargs)
            elif kwargs:
                inputs = kwargs
            else:
                inputs = args[0] if len(args) == 1 else args
        if targets is None:
            targets = self._recorded_targets if self._recorded_targets is not None else labels
        if not isinstance(targets, torch.Tensor):
            raise RuntimeError(
                "ADLER.step() without a batch needs the targets of the model's last batch for "
                "its curvature pass, and saw none: loss_fn is not an nn.Module ADLER can watch "
                "and the model was not called with labels=. Pass them: opt.step(targets=y), "
                "or call opt.step(inputs, targets)."
            )
        return inputs, targets

    # ---------------------------------------------------------------------------------------

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | ModelInputs | None = None,
        targets: torch.Tensor | None = None,
        *,
        inputs: ModelInputs | None = None,
    ) -> Any:
        """One ADLER update; the three forms of the class docstring.

        Args:
            closure: A ``torch.optim`` closure (zero_grad, forward, backward, return the loss),
                or, with ``targets``, the batch's model inputs (tensor, tuple or dict).
            targets: With model inputs in ``closure``: the batch ADLER computes G on. Alone (or
                with ``inputs``): the targets of the curvature pass after the user's backward.
            inputs: The curvature pass's inputs after the user's backward (default: those of
                the model's most recent forward).

        Returns:
            The :class:`ADLERRecord`, or for a closure the closure's return value (the record
            is then :attr:`last_record`).
        """
        group = self.param_groups[0]
        est = self._estimator
        # Options live in the param group so that load_state_dict restores them.
        est.curvature = group["curvature"]
        est.curvature_fraction = group["curvature_fraction"]
        est.jvp_method = group["jvp_method"]
        _check_lr(group["lr"])

        closure_result, called_closure = None, False
        if callable(closure) and not isinstance(closure, (torch.Tensor, Mapping)):
            with torch.enable_grad():
                closure_result = closure()
            closure, called_closure = None, True
        self._own_pass = True
        try:
            if closure is not None:
                if targets is None or inputs is not None:
                    raise TypeError(
                        "opt.step(inputs, targets) needs both the inputs and the targets; after "
                        "your own backward call opt.step() (or opt.step(targets=y))."
                    )
                record = self._step_on_batch(group, closure, targets)
            else:
                record = self._step_after_backward(group, inputs, targets)
        finally:
            self._own_pass = False
        self.last_record = record
        return closure_result if called_closure else record

    def _step_on_batch(
        self, group: dict[str, Any], inputs: ModelInputs, targets: torch.Tensor
    ) -> ADLERRecord:
        """G and GᵀCG from ADLER's own passes on the batch."""
        est = self._estimator
        gp = est.gradient_pass(inputs, targets)
        loss = gp.loss
        if self._distributed:
            # One collective for G and the loss; G's tensors become views of the reduced buffer.
            packed = torch.cat([g.reshape(-1) for g in gp.gradient.values()] + [loss.reshape(1)])
            # This rank's weight: N_r, or its summed class weights (the whole batch's targets).
            weight = est.loss_reduction.denominator(targets.to(self._first.device))
            packed = weighted_all_reduce(packed, weight, est.reduction, self._process_group)
            loss = packed[-1]
            gp.gradient = vector_to_params(packed[:-1], gp.gradient)  # "ef_batch" needs global G
        grads = list(gp.gradient.values())
        grad_sq = _squared_norm(grads)
        curv = est.curvature_along(gp, gp.gradient)
        curv = self._reduce_curvature(group, curv, gp.targets)
        return self._update(group, loss, grads, grad_sq, curv, loss_known=True)

    def _step_after_backward(
        self,
        group: dict[str, Any],
        inputs: ModelInputs | None,
        targets: torch.Tensor | None,
    ) -> ADLERRecord:
        """G from ``.grad`` (the user's backward), GᵀCG from one curvature pass."""
        est = self._estimator
        params = group["params"]
        if all(p.grad is None for p in params):
            raise RuntimeError(
                "ADLER.step() found no gradient in the parameters' .grad: call loss.backward() "
                "before opt.step(), or let ADLER compute G: opt.step(inputs, targets)."
            )
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        gradient = dict(zip(est.param_names, grads, strict=True))
        grad_sq = _squared_norm(grads)
        if group["curvature"] == "ef_batch":  # GN = G Gᵀ: (GᵀG)², no pass needed
            loss = torch.full_like(grad_sq, math.nan)
            curv = grad_sq * grad_sq
            return self._update(group, loss, grads, grad_sq, curv, loss_known=False)
        batch_inputs, batch_targets = self._recorded_batch(inputs, targets)
        with torch.no_grad():
            loss, curv = est.curvature_pass(batch_inputs, batch_targets, gradient)
        batch_targets = batch_targets.to(self._first.device)
        m = curvature_examples(batch_examples(batch_targets), est.curvature_fraction)
        curv = self._reduce_curvature(group, curv, batch_targets[:m])
        return self._update(group, loss, grads, grad_sq, curv, loss_known=True)

    def _reduce_curvature(
        self, group: dict[str, Any], curv: torch.Tensor, curvature_targets: torch.Tensor
    ) -> torch.Tensor:
        """GᵀCG over the ranks: it is a per-rank mean until reduced (DESIGN.md §6)."""
        if not self._distributed or group["curvature"] == "ef_batch":
            return curv
        est = self._estimator
        weight = est.loss_reduction.denominator(curvature_targets)
        return weighted_all_reduce(curv.reshape(1), weight, est.reduction, self._process_group)[0]

    def _update(
        self,
        group: dict[str, Any],
        loss: torch.Tensor,
        grads: list[torch.Tensor],
        grad_sq: torch.Tensor,
        curv: torch.Tensor,
        *,
        loss_known: bool,
    ) -> ADLERRecord:
        """η_k, the running average, the caps, lr, and θ ← θ − lr·r_k·G; skips on bad values."""
        st = self._adler_state
        q = quadratic_step(grad_sq, curv, grad_sq, group["eps"])
        eta = q.eta
        bad_eta = ~(torch.isfinite(eta) & (eta > 0))
        flags = (
            (~torch.isfinite(loss)).long() * int(loss_known)
            + 2 * (~torch.isfinite(grad_sq)).long()
            + 4 * (~torch.isfinite(curv)).long()
            + 8 * (q.nonpositive_curvature & torch.isfinite(curv)).long()
            + 16 * bad_eta.long()
        )
        ok = flags == 0

        k = int(st["step"])
        averaging = group["averaging"]
        beta = self.beta_schedule(k) if self.beta_schedule else group["beta"]
        s, c = st["average_numerator"], st["average_denominator"]
        safe_eta = torch.where(ok, eta, torch.ones_like(eta)).to(self._avg_dtype)
        s_new, c_new = update_average(s, c, safe_eta, beta, averaging)
        s, c = torch.where(ok, s_new, s), torch.where(ok, c_new, c)
        st["average_numerator"], st["average_denominator"] = s, c
        eta_hat = average_value(s, c, averaging)
        rate = eta_hat
        if group["rate_cap"] is not None:
            rate = torch.clamp(rate, max=group["rate_cap"])
        if group["trust_region"] is not None:
            rate = torch.minimum(rate, group["trust_region"] / torch.sqrt(grad_sq.to(rate.dtype)))
        applied = rate * group["lr"]

        with torch.no_grad():
            step = torch.where(ok, -applied, torch.zeros_like(applied)).to(grads[0].dtype)
            if grads[0].device.type == "cpu":
                if bool(ok):  # free on CPU: no device to synchronize with
                    torch._foreach_addcmul_(group["params"], grads, [step] * len(grads))
            else:
                # No branch on ok (a host sync): add G with non-finite entries zeroed, so that
                # a zero rate gives an exactly zero update (0 · NaN would still poison θ). The
                # user's .grad is not modified.
                clean = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
                torch._foreach_addcmul_(group["params"], clean, [step] * len(clean))

        skips = st["consecutive_skips"]
        st["consecutive_skips"] = torch.where(ok, torch.zeros_like(skips), skips + 1)
        st["skip_reasons"] = torch.where(
            ok, torch.zeros_like(st["skip_reasons"]), st["skip_reasons"] | flags
        )
        st["step"] = k + 1
        self._check_skips(group["max_consecutive_skips"])
        return ADLERRecord(loss, eta, eta_hat, applied, grad_sq, curv, ~ok)

    # ---------------------------------------------------------------------------------------

    def _check_skips(self, limit: int | None) -> None:
        if limit is None:
            return
        st = self._adler_state
        skips, reasons = st["consecutive_skips"], st["skip_reasons"]
        if skips.device.type != "cuda":
            self._raise_if_stuck(int(skips), int(reasons), limit)
            return
        # CUDA: read a copy made asynchronously at an earlier step, once it has landed.
        if self._pending is not None:
            event, host = self._pending
            if not event.query():
                return
            self._pending = None
            self._raise_if_stuck(int(host[0]), int(host[1]), limit)
        host = torch.stack([skips, reasons]).to("cpu", non_blocking=True)
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: a resumed run continues exactly where it stopped.

        Checkpoints of the earlier layout (an ``"adler"`` entry beside ``state``) load too.
        """
        state_dict = _upgrade(state_dict)
        saved = state_dict["param_groups"][0]
        if saved.get("has_beta_schedule", False) != (self.beta_schedule is not None):
            raise ValueError(
                "The checkpoint was made with a beta_schedule and this optimizer has none (or "
                "the reverse); pass the same beta_schedule callable to ADLER when resuming."
            )
        if saved.get("curvature") not in CURVATURES:
            raise ValueError(f"Unknown curvature {saved.get('curvature')!r} in the state dict.")
        check_averaging(saved.get("averaging"))
        raw = dict(state_dict["state"][0])
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; the averages stay in theirs.
        device = self._first.device
        st = self._adler_state
        for key in ("average_numerator", "average_denominator"):
            st[key] = raw[key].to(device=device, dtype=self._avg_dtype).clone()
        for key in ("consecutive_skips", "skip_reasons"):
            st[key] = raw[key].to(device=device, dtype=torch.int64).clone()
        st["step"] = int(raw["step"])
        self._pending = None


def _check_lr(lr: Any) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(
            f"lr must be a number >= 0 (a multiplier of ADLER's rate η̂_k; 1.0 is the paper's "
            f"Algorithm 1), got {lr!r}."
        )


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖G‖² from per-tensor norms: no P-sized temporary (those cost page faults on CPU)."""
    return torch.stack(torch._foreach_norm(grads)).square().sum()


def _upgrade(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict in the current layout; refuses what is not an ADLER state dict."""
    state_dict = dict(state_dict)
    if "adler" in state_dict:  # the earlier layout
        old = state_dict.pop("adler")
        state_dict["state"] = {
            0: {
                "step": int(old["num_steps"]),
                "average_numerator": old["s"],
                "average_denominator": old["c"],
                "consecutive_skips": old["consecutive_skips"],
                "skip_reasons": old["skip_reasons"],
            }
        }
        groups = [dict(g) for g in state_dict["param_groups"]]
        for g in groups:
            g.setdefault("lr", 1.0)
            g.setdefault("rate_cap", g.pop("max_lr", None))
        state_dict["param_groups"] = groups
    first = state_dict.get("state", {}).get(0)
    if not isinstance(first, Mapping) or not all(key in first for key in STATE_KEYS):
        raise ValueError(
            "This is not an ADLER state dict (its state has no running average: "
            f"{', '.join(STATE_KEYS)})."
        )
    return state_dict
