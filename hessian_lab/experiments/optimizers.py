"""One interface over the experiments' optimizers: ADLER (Q), its GN variant, and plain SGD.

Each wrapper exposes ``step(inputs, targets) -> dict[str, Tensor]`` (the loss on the minibatch
*before* the update, the step size η_k and the step actually taken η̂_k, plus optimizer-specific
fields), ``columns`` (the keys of that dict, for the logs), and ``state_dict`` /
``load_state_dict`` for checkpoints.

* ``adler`` — :class:`hessian_lab.optim.adler.ADLER` with ``curvature="ggn"`` (the paper's Q):
  ``η_k = GᵀG / (GᵀQG + ε GᵀG)``, log-averaged into η̂_k with factor β (Algorithm 1).
* ``gn`` — the same with ``curvature="ef"`` (the paper's GN baseline, footnote 8, per-example
  reading), arithmetically averaged (footnote 10).
* ``sgd`` — ``torch.optim.SGD`` without momentum: η_k = η̂_k = lr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from hessian_lab.experiments.config import TrainConfig

__all__ = ["ADLERStepper", "SGDStepper", "build_optimizer"]


class SGDStepper:
    """Plain SGD (no momentum, no weight decay): ``θ ← θ − lr · G``."""

    columns: tuple[str, ...] = ("loss", "eta", "eta_hat")

    def __init__(self, model: nn.Module, loss_fn: nn.Module, lr: float) -> None:
        self.model, self.loss_fn, self.lr = model, loss_fn, lr
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """One minibatch step; returns the minibatch loss before the update and η = η̂ = lr."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        lr = torch.full((), self.lr, device=loss.device)
        return {"loss": loss.detach(), "eta": lr, "eta_hat": lr}

    def state_dict(self) -> dict[str, Any]:
        """The wrapped ``torch.optim.SGD`` state."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.optimizer.load_state_dict(state)


#: The step record's columns for ADLER and GN (those of ``ADLERRecord``, in this order).
_ADLER_COLUMNS = ("loss", "eta", "eta_hat", "applied_lr", "grad_sq", "curvature", "skipped")


class ADLERStepper:
    """ADLER (or its GN variant): SGD with the step size of the local quadratic model."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        curvature: str,
        beta: float,
        eps: float,
        lr: float | None = None,
        **options: Any,
    ) -> None:
        from hessian_lab.optim.adler import ADLER  # layer 5, imported when an ADLER run starts

        if lr is not None:  # a multiplier of η̂ (torch.optim's lr); ADLER's default is 1
            options["lr"] = lr
        self.optimizer = ADLER(model, loss_fn, curvature=curvature, beta=beta, eps=eps, **options)
        # Log the rate that multiplied G (lr and caps applied) next to the average η̂_k.
        self.columns = _ADLER_COLUMNS

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """One ADLER step; its record (loss, η_k, η̂_k, applied rate, GᵀG, GᵀCG, skipped)."""
        rec = self.optimizer.step(inputs, targets)
        return {key: getattr(rec, key) for key in self.columns}

    def state_dict(self) -> dict[str, Any]:
        """ADLER's running averages (s_k, c_k, ...)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.optimizer.load_state_dict(state)


def build_optimizer(
    config: TrainConfig, model: nn.Module, loss_fn: nn.Module
) -> SGDStepper | ADLERStepper:
    """Create the optimizer named by ``config.optimizer`` (``adler``, ``gn`` or ``sgd``)."""
    if config.optimizer == "sgd":
        assert config.lr is not None  # checked by TrainConfig.validate
        return SGDStepper(model, loss_fn, config.lr)
    if config.optimizer in ("adler", "gn"):
        default = "ggn" if config.optimizer == "adler" else "ef"
        return ADLERStepper(
            model,
            loss_fn,
            config.curvature or default,
            beta=config.beta,
            eps=config.eps,
            lr=config.lr,
            **config.adler_options,
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}; valid: adler, gn, sgd")
