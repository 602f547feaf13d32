"""Hugging Face transformers (issue 10, #4): GPT-2, BERT and ViT built from small configs.

No download: each model is built from a tiny config, with its default attention implementation
("sdpa"), in float64 and eval mode; its parameters are perturbed so that no term vanishes.
Outputs are ``ModelOutput`` objects, read through the operators' default ``output_fn`` (the
``logits``). The references (tests/reference_models.py, checked against finite differences here)
run the models through ``torch.func.functional_call`` under the math SDPA backend.

GPT-2 is causal with tied embeddings (``lm_head.weight`` is ``transformer.wte.weight``, listed once
by ``named_parameters``) and is trained on a shifted-label token mean. What "per example" means for
GN there: L_b = (1/(N_b (T−1))) Σ_{n,t} CE(z_{n,t}, y_{n,t+1}); every sequence has the same length,
so with ℓ_n = the token mean of sequence n alone, L_b = (1/N_b) Σ_n ℓ_n, N_b = the batch size (the
first dimension of the targets), and g_n = ∇ℓ_n = N_b J_nᵀ ∂L_b/∂z_n: the GN the library defines
for a ``reduction="mean"`` loss. :func:`test_gpt2_per_example_loss_is_the_token_mean` checks that
identity; the reference builds g_n by running the model on sequence n alone.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from operator_helpers import OPERATORS, make_operator, rel_err
from reference_models import (
    FlatModel,
    assert_reference_valid,
    attention_settings,
    build_reference,
    perturb_,
    random_vectors,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessian_lab
from hessian_lab import ADLER, GGNOperator

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-10
CURVATURES = ("ggn", "ef", "ef_batch", "hessian")
VOCAB, SEQ, LABELS = 20, 6, 3
GPT2_BATCH, GPT2_SPLIT = 4, (1, 3)

BERT_PARAMS = [  # listed out of the model's order: θ still follows named_parameters()
    "classifier.weight",
    "bert.encoder.layer.1.attention.output.LayerNorm.weight",
    "bert.embeddings.word_embeddings.weight",
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.0.attention.self.key.weight",
    "bert.pooler.dense.weight",
]


def shifted_cross_entropy(logits, labels):
    """Next-token cross entropy, averaged over all predicted tokens of the batch."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


def without_labels(batch):
    """The batch_fn of a Hugging Face dict batch: everything but "labels" is the model's input."""
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


# ------------------------------------------------------------------------------------------------
# The models.


def _finish(model, seed):
    model = perturb_(model.double().eval(), 0.3, seed)
    assert model.config._attn_implementation == "sdpa"  # the default, not "eager"
    return model


@functools.cache
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_inner=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = _finish(transformers.GPT2LMHeadModel(config), seed=1)
    ids = torch.randint(0, VOCAB, (GPT2_BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    return model, ids


@functools.cache
def bert():
    torch.manual_seed(3)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        type_vocab_size=2,
        num_labels=LABELS,
        pad_token_id=0,
    )
    model = _finish(transformers.BertForSequenceClassification(config), seed=4)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=gen)
    mask = torch.ones(4, SEQ, dtype=torch.long)
    mask[0, -2:] = 0  # padding: the attention mask has zeros
    mask[2, -1:] = 0
    ids = ids * mask  # padded positions hold the pad token
    labels = torch.randint(0, LABELS, (4,), generator=gen)
    return model, {"input_ids": ids, "attention_mask": mask}, labels


@functools.cache
def vit():
    torch.manual_seed(6)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=LABELS,
    )
    model = _finish(transformers.ViTForImageClassification(config), seed=7)
    gen = torch.Generator().manual_seed(8)
    pixels = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, LABELS, (3,), generator=gen)
    return model, pixels, labels


# ------------------------------------------------------------------------------------------------
# The cases: (model, data given to the library, its keyword arguments, reference).


@functools.cache
def case(name):
    """(model, data, loss_fn, library kwargs, reference); the model is never modified."""
    if name == "gpt2":  # a tensor input, all parameters (P = 840, tied embeddings)
        model, ids = gpt2()
        batches, data = [(ids, ids)], (ids, ids)
        loss_fn, kwargs, names = shifted_cross_entropy, {"reduction": "mean"}, None
    elif name == "gpt2_labels_dict":  # one Hugging Face dict batch with "labels", batch_fn
        model, ids = gpt2()
        batches = [({"input_ids": ids}, ids)]
        data = {"input_ids": ids, "labels": ids}
        loss_fn, names = shifted_cross_entropy, None
        kwargs = {"reduction": "mean", "batch_fn": without_labels}
    elif name == "gpt2_two_dicts":  # a list of two such dicts of unequal size, streamed
        model, ids = gpt2()
        parts = ids.split(list(GPT2_SPLIT))
        batches = [({"input_ids": p}, p) for p in parts]
        data = [{"input_ids": p, "labels": p} for p in parts]
        loss_fn, names = shifted_cross_entropy, None
        kwargs = {"reduction": "mean", "batch_fn": without_labels, "cache": False}
    elif name == "bert":  # dict inputs with padding, nn.CrossEntropyLoss, a parameter subset
        model, inputs, labels = bert()
        batches, data = [(inputs, labels)], (inputs, labels)
        loss_fn, kwargs, names = nn.CrossEntropyLoss(), {"params": BERT_PARAMS}, BERT_PARAMS
    elif name == "vit":  # pixel values as a tensor, all parameters, a "sum" loss
        model, pixels, labels = vit()
        batches, data = [(pixels, labels)], (pixels, labels)
        loss_fn, kwargs, names = nn.CrossEntropyLoss(reduction="sum"), {}, None
    else:
        raise KeyError(name)
    reduction = getattr(loss_fn, "reduction", kwargs.get("reduction"))
    ref = build_reference(FlatModel(model, names), loss_fn, batches, reduction)
    return model, data, loss_fn, kwargs, ref


CASES = ("gpt2", "gpt2_labels_dict", "gpt2_two_dicts", "bert", "vit")
MODELS = ("gpt2", "bert", "vit")


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_finite_differences(name):
    assert_reference_valid(case(name)[4])


def test_gpt2_embeddings_are_tied_and_listed_once():
    model, ids = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    # functional_call ties them too: replacing wte changes the output layer as well.
    flat = FlatModel(model)
    theta = flat.theta0.clone()
    wte = slice(0, model.transformer.wte.weight.numel())
    theta[wte] += 0.1 * torch.randn(theta[wte].shape, dtype=theta.dtype)
    moved = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, moved.parameters())
    assert moved.lm_head.weight is moved.transformer.wte.weight
    with torch.no_grad():
        assert torch.allclose(flat(theta, ids), moved(ids).logits, rtol=0, atol=1e-12)
    # ... and the library's θ is the same list: one copy of the tied matrix.
    op = GGNOperator(model, shifted_cross_entropy, (ids, ids), reduction="mean")
    assert op.param_names == names and op.num_params == flat.num_params == 840


def test_gpt2_per_example_loss_is_the_token_mean():
    """ℓ_n (sequence n alone) has ∂ℓ_n/∂z_n = N_b ∂L_b/∂z_n: the GN the module docstring defines."""
    model, ids = gpt2()
    with torch.no_grad():
        z = model(ids).logits
    z = z.clone().requires_grad_(True)
    (batch_grad,) = torch.autograd.grad(shifted_cross_entropy(z, ids), z)
    for n in range(GPT2_BATCH):
        zn = z[n : n + 1].detach().clone().requires_grad_(True)
        (own,) = torch.autograd.grad(shifted_cross_entropy(zn, ids[n : n + 1]), zn)
        assert rel_err(own[0], GPT2_BATCH * batch_grad[n]) <= 1e-14


# ------------------------------------------------------------------------------------------------
# Products against the references.


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("name", CASES)
def test_products_match_reference(name, op_name):
    model, data, loss_fn, kwargs, ref = case(name)
    before = attention_settings()
    op = make_operator(op_name, model, loss_fn, data, **kwargs)
    assert op.param_names == ref.flat.names
    R = ref.matrix(op_name)
    V = random_vectors(op.num_params, 3, seed=1)
    assert rel_err(op.matmat(V), R @ V) <= TOL
    assert rel_err(op @ V[:, 0], R @ V[:, 0]) <= TOL
    v = V[:, 2]
    assert rel_err(op.quadratic_form(v), v @ R @ v) <= TOL
    assert rel_err(op.gradient(), ref.gradient) <= TOL
    assert rel_err(op.loss(), ref.loss) <= TOL
    assert attention_settings() == before


def test_gpt2_example_count_is_the_batch_size():
    """Two dict batches of 1 and 3 sequences are weighted 1/4 and 3/4 ("mean"), N = 4."""
    model, data, loss_fn, kwargs, ref = case("gpt2_two_dicts")
    op = make_operator("ggn", model, loss_fn, data, **kwargs)
    assert op.num_examples == GPT2_BATCH
    assert ref.weights == [n / GPT2_BATCH for n in GPT2_SPLIT]


def test_explicit_output_fn_equals_default():
    model, data, loss_fn, kwargs, ref = case("bert")
    op = GGNOperator(model, loss_fn, data, output_fn=lambda out: out.logits, **kwargs)
    v = random_vectors(op.num_params, 1, seed=2)[:, 0]
    assert rel_err(op @ v, ref.ggn @ v) <= TOL


@pytest.mark.parametrize("op_name", ["ggn", "hessian"])
@pytest.mark.parametrize("name", MODELS)
def test_eigsh_matches_dense_reference(name, op_name):
    model, data, loss_fn, kwargs, ref = case(name)
    op = make_operator(op_name, model, loss_fn, data, **kwargs)
    res = hessian_lab.eigsh(op, k=2)
    assert bool(res.converged.all())
    want = torch.linalg.eigvalsh(ref.matrix(op_name))[-2:]
    assert rel_err(res.eigenvalues, want) <= 1e-8


# ------------------------------------------------------------------------------------------------
# ADLER steps.


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", MODELS)
def test_adler_step_matches_reference(name, curvature):
    model, (inputs, targets), loss_fn, kwargs, ref = case(name)
    model = copy.deepcopy(model)
    eps = 1e-10
    options = {k: v for k, v in kwargs.items() if k in ("params", "reduction")}
    opt = ADLER(model, loss_fn, curvature=curvature, eps=eps, **options)
    rec = opt.step(inputs, targets)
    assert torch.isfinite(rec.loss) and rel_err(rec.loss, ref.loss) <= TOL
    G = ref.gradient
    if curvature == "hessian" and G @ ref.hessian @ G + eps * (G @ G) <= 0:
        assert bool(rec.skipped) and torch.isnan(rec.eta)  # guarded, never negative
        return
    assert not bool(rec.skipped)
    assert torch.isfinite(rec.eta) and rec.eta > 0
    eta = ref.eta(curvature, eps)
    assert rel_err(rec.eta, eta) <= TOL
    named = dict(model.named_parameters())
    theta1 = torch.cat([named[n].detach().reshape(-1) for n in ref.flat.names])
    assert rel_err(theta1 - ref.theta, -eta * G) <= TOL  # η̂_0 = η_0, lr = 1
    if name == "gpt2":  # the tied output layer moved with the embedding
        assert model.lm_head.weight is model.transformer.wte.weight


# ------------------------------------------------------------------------------------------------
# What torch does with these models by itself (why the library's handling is needed).


def _functional(name):
    model, data, *_ = case(name)
    inputs = data[0]
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p):
        return torch.func.functional_call(model, p, args, kwargs).logits

    return f, params


@pytest.mark.parametrize("name", MODELS)
def test_default_sdpa_has_no_forward_ad_and_math_backend_alone_suffices(name):
    f, params = _functional(name)
    tangents = {n: torch.ones_like(p) for n, p in params.items()}
    try:
        torch.func.jvp(f, (params,), (tangents,))
    except NotImplementedError as err:
        assert "flash_attention" in str(err)
    else:
        pytest.skip(f"torch {torch.__version__} ran forward AD through {name}'s default SDPA.")
    with sdpa_kernel(SDPBackend.MATH):  # nothing beyond the math backend is needed
        _, u = torch.func.jvp(f, (params,), (tangents,))
    assert torch.isfinite(u).all()
