"""Helpers shared by the optimizer tests (tests/test_optim_*.py): tiny models, batches, vectors.

The one-thread pin of those files is the ``one_thread`` fixture of tests/conftest.py.
"""

import math
import socket

import torch
from torch import nn

REL = 1e-12  # float64 throughout


def mlp(dtype=torch.float64, seed=0):
    """A 6 → 8 → 3 tanh MLP drawn from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def mlp_batches(k, n=16, dtype=torch.float64, seed=1):
    """``k`` classification batches ``(x, y)`` of ``n`` examples for :func:`mlp`."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
        for _ in range(k)
    ]


def ln_mlp():
    """A 5 → 7 → 3 MLP with a LayerNorm, float64 (the DDP tests' model)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()


def ln_mlp_batches(n, steps):
    """``steps`` batches ``(x, y)`` of ``n`` examples for :func:`ln_mlp`."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(steps)
    ]


def flat_params(model):
    """θ: the model's parameters, detached and concatenated."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grad(model):
    """The parameters' ``.grad``, detached and concatenated."""
    return torch.cat([p.grad.detach().reshape(-1) for p in model.parameters()])


def autograd_gradient(model, loss_fn, x, y):
    """G = ∇ loss_fn(model(x), y), by ``torch.autograd.grad`` (independent of the optimizer)."""
    grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def close(actual, expected, rel=REL):
    """Asserts ``|actual − expected| ≤ rel·|expected|`` (scalars or one-element tensors)."""
    actual = float(actual.detach()) if torch.is_tensor(actual) else float(actual)
    expected = float(expected)
    assert math.isclose(actual, expected, rel_tol=rel, abs_tol=0.0), (actual, expected)


def assert_vectors_close(actual, expected, rel=REL):
    """max |a − e| ≤ rel · max |e|: a relative error on the vector's scale."""
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= rel * scale, (err, scale)


def free_port():
    """A free TCP port on 127.0.0.1 for a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int) -> list:
    """Run ``worker(rank, world, port, out_dir)`` in ``world`` processes; each saves its results
    as ``out_dir/rank{rank}.pt``. Returns them, rank by rank."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world, free_port(), out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
