"""ADLER under DistributedDataParallel (2 CPU processes, gloo) = one process on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
from optim_helpers import ln_mlp, ln_mlp_batches, spawn_ranks
from torch import nn

from hessian_lab.optim import ADLER

STEPS = 4
SIZES = (6, 10)  # unequal per-rank batches: the weighting must follow the examples


# (curvature, jvp_method): the LayerNorm MLP's "auto" is double backward; forward mode too.
CASES = (
    ("ggn", "auto"),
    ("ggn", "forward"),
    ("ef", "auto"),
    ("ef_batch", "auto"),
    ("hessian", "auto"),
)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for curvature, method in CASES:  # one process group for all: spawning is the slow part
            ddp = nn.parallel.DistributedDataParallel(ln_mlp())
            opt = ADLER(ddp, nn.CrossEntropyLoss(), curvature=curvature, jvp_method=method)
            lo = sum(SIZES[:rank])
            etas = []
            for x, y in ln_mlp_batches(sum(SIZES), STEPS):
                rec = opt.step(x[lo : lo + SIZES[rank]], y[lo : lo + SIZES[rank]])
                etas.append(rec.eta)
            results[curvature, method] = {
                "params": [p.detach() for p in ddp.module.parameters()],
                "etas": torch.stack(etas),
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results():
    return spawn_ranks(_worker, 2)


@pytest.mark.parametrize("curvature, method", CASES)
def test_ddp_matches_one_process_on_the_concatenated_batch(ddp_results, curvature, method):
    results = [r[curvature, method] for r in ddp_results]
    model = ln_mlp()
    opt = ADLER(model, nn.CrossEntropyLoss(), curvature=curvature, jvp_method=method)
    etas = torch.stack([opt.step(x, y).eta for x, y in ln_mlp_batches(sum(SIZES), STEPS)])
    for res in results:
        torch.testing.assert_close(res["etas"], etas, rtol=1e-6, atol=0)
        for p, q in zip(res["params"], model.parameters(), strict=True):
            torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-6)
    # η_k is identical on every rank, bit for bit.
    assert torch.equal(results[0]["etas"], results[1]["etas"])
