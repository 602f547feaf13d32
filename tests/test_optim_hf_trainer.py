"""ADLER as the Hugging Face Trainer's optimizer (issue 11, item 2d).

``Trainer(optimizers=(ADLER(model, loss_fn), None))``: the Trainer runs ``model(**batch)`` (with
``labels`` and, for models that take loss kwargs, ``num_items_in_batch``), its own backward, clips
the gradient (``max_grad_norm=1.0`` by default), then accelerate's wrapper calls
``optimizer.step(None)`` and the Trainer's linear schedule steps ``lr`` (1 → 2/3 → 1/3 → 0 over
3 steps: it multiplies ADLER's lr = 1; ``TrainingArguments.learning_rate`` is not used when the
optimizer is given). ADLER takes G from ``.grad`` and the targets from the call's ``labels``.

Each step is checked against references at the same θ: the update is −applied_lr·G_Trainer (the
clipped gradient the Trainer left), η_k = GᵀG / (GᵀQG + εGᵀG) with Q of ``loss_fn`` on the step's
batch (``step_size`` along G), and applied_lr = lr_k·η̂_k. Tiny models from configs, no download.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_lab import ADLER
from hessian_lab.optim.step_size import step_size

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, SEQ, LABELS, N, STEPS, BATCH = 20, 6, 3, 12, 3, 4
EPS = 1e-10
REL = 1e-5  # float32


pytestmark = pytest.mark.usefixtures("one_thread")


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _dataset(kind):
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(N):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        label = torch.randint(0, LABELS, (), generator=g) if kind == "bert" else ids.clone()
        items.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long),
                      "labels": label})  # fmt: skip
    return items


def shifted_cross_entropy(logits, labels):
    """Next-token cross entropy averaged over the predicted tokens (GPT-2's loss from labels)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


CASES = {
    "bert": (_bert, nn.CrossEntropyLoss()),
    "gpt2": (_gpt2, shifted_cross_entropy),
}


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class _Probe(transformers.TrainerCallback):
    """Records, around each optimizer step: θ, the Trainer's G, the batch, lr, the record."""

    def __init__(self, model, opt, build):
        self.model, self.opt, self.build, self.steps, self.call = model, opt, build, [], None
        model.register_forward_pre_hook(self._forward, with_kwargs=True)

    def _forward(self, module, args, kwargs):
        if torch.is_grad_enabled() and self.call is None:
            self.call = {
                k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()
            }

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = list(self.model.parameters())
        self.steps.append(
            {
                "theta": _flat(params),
                "grad": _flat(p.grad for p in params),
                "model": self._copy(),
                "call": self.call,
                "lr": self.opt.param_groups[0]["lr"],
            }
        )

    def _copy(self):
        """The model at this θ, without the hooks (ADLER's and ours) of the trained one."""
        twin = self.build()
        twin.load_state_dict(self.model.state_dict())
        return twin

    def on_optimizer_step(self, args, state, control, **kwargs):
        step = self.steps[-1]
        step["after"] = _flat(self.model.parameters())
        step["record"] = self.opt.last_record
        self.call = None  # the next step's first grad-enabled forward is the Trainer's


def _train(kind, tmp_path):
    build, loss_fn = CASES[kind]
    model = build()
    opt = ADLER(model, loss_fn)
    probe = _Probe(model, opt, build)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(kind),
        optimizers=(opt, None),
        callbacks=[probe],
    )
    trainer.train()
    return model, opt, probe, loss_fn


@pytest.mark.parametrize("kind", sorted(CASES))
def test_trainer_steps_are_adler_steps_on_the_trainers_gradient(kind, tmp_path):
    model, opt, probe, loss_fn = _train(kind, tmp_path)
    assert len(probe.steps) == STEPS
    assert opt.num_steps == STEPS
    assert not torch.equal(probe.steps[-1]["after"], probe.steps[0]["theta"])
    # The Trainer's linear decay (no warmup) multiplies ADLER's lr = 1.
    lrs = [step["lr"] for step in probe.steps]
    assert lrs == pytest.approx([1.0, 2.0 / 3.0, 1.0 / 3.0], rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    for step in probe.steps:
        rec, grad = step["record"], step["grad"]
        assert rec is not None and not bool(rec.skipped)
        for name in ("loss", "eta", "eta_hat", "applied_lr", "grad_sq", "curvature"):
            assert math.isfinite(float(getattr(rec, name))), name
        assert float(rec.applied_lr) == pytest.approx(step["lr"] * float(rec.eta_hat), rel=1e-6)
        # The update is −applied_lr · G_Trainer (clipped to max_grad_norm = 1.0).
        delta, expected = step["after"] - step["theta"], -float(rec.applied_lr) * grad
        assert float((delta - expected).abs().max()) <= REL * float(expected.abs().max())
        gg = grad.double() @ grad.double()
        assert float(rec.grad_sq) == pytest.approx(float(gg), rel=REL)
        # η_k from Q of loss_fn on this step's batch, along the Trainer's G.
        call = step["call"]
        inputs = {k: call[k] for k in ("input_ids", "attention_mask")}
        ref = step_size(
            step["model"], loss_fn, inputs, call["labels"], "ggn", direction=grad, eps=EPS
        )
        assert float(rec.curvature) == pytest.approx(float(ref.curvature), rel=REL)
        eta = float(gg) / (float(ref.curvature) + EPS * float(gg))
        assert float(rec.eta) == pytest.approx(eta, rel=REL)
        # loss_fn is the model's loss (up to Trainer's normalization): G has its direction.
        own = torch.autograd.grad(
            loss_fn(step["model"](**inputs).logits, call["labels"]),
            list(step["model"].parameters()),
        )
        own = _flat(own)
        cosine = float(own @ grad / (own.norm() * grad.norm()))
        assert cosine == pytest.approx(1.0, abs=1e-5)
