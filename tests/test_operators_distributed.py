"""Operators over data sharded across processes (gloo, CPU) = one process holding all the data.

Each rank passes its own shard (unequal sizes) with ``process_group=WORLD``; products, quadratic
forms, gradients, losses and the linear-algebra routines on top must be identical on every rank
(bit for bit: they see the same all-reduced products) and equal to one process over the list of
shards (≤ 1e-12 relative, float64: the all-reduce only sums in another order).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from operator_helpers import OPERATORS
from optim_helpers import spawn_ranks
from torch import nn

import hessian_lab
from hessian_lab import EmpiricalFisherOperator, GGNOperator, HessianOperator

SHARDS = {2: (7, 11), 3: (5, 9, 4)}  # examples per rank
TOL = 1e-12
LOSSES = ("ce_mean", "mse_sum")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


def _loss(name: str) -> nn.Module:
    return nn.CrossEntropyLoss() if name == "ce_mean" else nn.MSELoss(reduction="sum")


def _shards(world: int, loss: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(world)
    out = []
    for n in SHARDS[world]:
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        if loss == "ce_mean":
            y = torch.randint(0, 3, (n,), generator=g)
        else:
            y = torch.randn(n, 3, generator=g, dtype=torch.float64)
        out.append((x, y))
    return out


def _operator(name: str, loss: str, data, **kwargs):
    model, loss_fn = _model(), _loss(loss)
    if name == "hessian":
        return HessianOperator(model, loss_fn, data, **kwargs)
    if name == "ggn":
        return GGNOperator(model, loss_fn, data, **kwargs)
    mode = "batch" if name == "fisher_batch" else "per_sample"
    return EmpiricalFisherOperator(model, loss_fn, data, mode=mode, **kwargs)


def _everything(op) -> dict[str, torch.Tensor]:
    """What a user computes with an operator; every random routine seeded identically."""
    P = op.shape[0]
    g = torch.Generator().manual_seed(5)
    V = torch.randn(P, 3, generator=g, dtype=torch.float64)
    G = op.gradient()
    top = hessian_lab.eigsh(op, k=2, num_steps=40, warn=False)
    density = hessian_lab.spectral_density(op, num_probes=2, num_steps=12, seed=1)
    x, _ = hessian_lab.cg(op, -G, damping=1.0, tol=1e-12, maxiter=60)
    return {
        "matmat": op @ V,
        "matvec": op @ V[:, 0],
        "quadratic_form": op.quadratic_form(V[:, 1]),
        "gradient": G,
        "loss": op.loss(),
        "num_examples": torch.tensor(float(op.num_examples)),
        "eigenvalues": top.eigenvalues,
        "density_nodes": density.nodes,
        "density_weights": density.weights,
        "trace": torch.tensor(hessian_lab.hutchinson_trace(op, num_probes=6, seed=2).estimate),
        "hutchpp": torch.tensor(hessian_lab.hutchpp_trace(op, num_matvecs=9, seed=3).estimate),
        "diagonal": hessian_lab.hutchinson_diagonal(op, num_probes=4, seed=4).estimate,
        "cg": x,
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for loss in LOSSES:
            shard = _shards(world, loss)[rank]
            for name in OPERATORS:
                op = _operator(name, loss, shard, process_group=dist.group.WORLD)
                results[name, loss] = {k: v.detach().clone() for k, v in _everything(op).items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(SHARDS), ids=lambda w: f"{w}procs")
def sharded(request):
    world = request.param
    return world, spawn_ranks(_worker, world)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", OPERATORS)
@pytest.mark.usefixtures("one_thread")  # as the ranks run; restored after the test
def test_sharded_operator_equals_one_process_and_is_identical_on_every_rank(sharded, name, loss):
    world, ranks = sharded
    one = _everything(_operator(name, loss, _shards(world, loss)))
    first = ranks[0][name, loss]
    for key, want in one.items():
        assert _rel(first[key], want) <= TOL, (key, _rel(first[key], want))
        for other in ranks[1:]:
            assert torch.equal(other[name, loss][key], first[key]), key


def _nccl_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        x, y = _shards(world, "ce_mean")[rank]
        op = GGNOperator(
            _model().cuda(),
            nn.CrossEntropyLoss(),
            (x.cuda(), y.cuda()),
            process_group=dist.group.WORLD,
        )
        V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(5)).double()
        torch.save((op @ V.cuda()).cpu(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_sharded_operator_over_nccl():
    world = 2
    got = spawn_ranks(_nccl_worker, world)
    op = _operator("ggn", "ce_mean", _shards(world, "ce_mean"))
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(5)).double()
    assert _rel(got[0], op @ V) <= TOL and torch.equal(got[0], got[1])


def test_process_group_without_init_is_a_clear_error():
    x, y = _shards(2, "ce_mean")[0]
    with pytest.raises(RuntimeError, match="init_process_group"):
        GGNOperator(_model(), nn.CrossEntropyLoss(), (x, y), process_group=object())


def test_torchrun_example_runs_on_two_gloo_processes(tmp_path):
    script = Path(__file__).resolve().parents[1] / "analyses" / "distributed_spectrum.py"
    args = ["--examples", "64", "--k", "2", "--probes", "1", "--steps", "8", "--sgd-steps", "2"]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + [str(script), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 processes (gloo), N = 64" in run.stdout
    assert run.stdout.count("top-2 eigenvalues") == 2  # H and Q, printed by rank 0 only
    assert (tmp_path / "density.png").is_file()
