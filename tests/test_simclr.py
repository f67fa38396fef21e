"""SimCLR's loss by hand, by brute force and across two processes; its runs end to end."""
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import simclr
from common import dist as cdist
from common import train as ctrain
from tests.conftest import free_port, run_script


def test_nt_xent_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])   # normalisation must not matter
    z2 = torch.tensor([[3.0, 0.0], [0.0, -1.0]])
    T = 0.5
    # normalised rows: a=(1,0) b=(0,1) | a'=(1,0) b'=(0,-1); cosines a.b=0 a.a'=1 a.b'=0,
    # b.a'=0 b.b'=-1, a'.b'=0
    def ce(pos, others):
        return -pos / T + math.log(sum(math.exp(v / T) for v in [pos] + others))
    expected = (ce(1, [0, 0]) + ce(-1, [0, 0]) + ce(1, [0, 0]) + ce(-1, [0, 0])) / 4
    assert simclr.nt_xent(z1, z2, T).item() == pytest.approx(expected, rel=1e-6)


def brute_force(z1, z2, T):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        others = [z[i] @ z[m] / T for m in range(n2) if m != i]
        total = total - z[i] @ z[j] / T + torch.logsumexp(torch.stack(others), 0)
    return total / n2


def test_nt_xent_matches_brute_force_and_world_size_one():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(simclr.nt_xent(z1, z2, 0.1), brute_force(z1, z2, 0.1))
    torch.testing.assert_close(simclr.distributed_nt_xent(z1, z2, 0.1), simclr.nt_xent(z1, z2, 0.1))


def _worker(rank, world, port, z1, z2, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cdist.init_distributed()
    n = z1.shape[0] // world
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = simclr.distributed_nt_xent(a, b, 0.1)
    loss.backward()
    results.put((rank, loss.item(), a.grad.tolist(), b.grad.tolist()))  # plain data: the process ends
    cdist.cleanup()


def test_two_processes_equal_one_process_on_the_whole_batch():
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, free_port(), z1, z2, results), nprocs=2,
                       start_method="spawn")
    got = sorted(results.get() for _ in range(2))
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = simclr.nt_xent(a, b, 0.1)
    full.backward()
    # DDP averages over ranks: the mean of the two losses and half of each rank's gradient
    # (which holds both ranks' contributions through the all-reducing gather) are the full ones
    assert (got[0][1] + got[1][1]) / 2 == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(torch.tensor(got[0][2] + got[1][2]) / 2, a.grad)
    torch.testing.assert_close(torch.tensor(got[0][3] + got[1][3]) / 2, b.grad)


def test_lars_excludes_bn_and_bias():
    model = simclr.SimCLR()
    decay, plain = ctrain.lars_param_groups(model, 1e-6)
    assert all(p.ndim > 1 for p in decay["params"]) and decay["lars"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bn" in names[id(p)] or "downsample.1" in names[id(p)] or "head.1" in names[id(p)]
               or "head.4" in names[id(p)] for p in plain["params"])
    assert plain["weight_decay"] == 0 and not plain["lars"]


TINY = ["--data", "demo", "--demo-size", "24", "--batch-size", "8", "--img-size", "64",
        "--workers", "1", "--epochs", "2", "--warmup-epochs", "1"]


def test_runs_single_two_processes_resume_and_histo(tmp_path):
    run_script("simclr.py", *TINY, "--aug", "histo", "--output-dir", tmp_path / "one")
    rows = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["chance_loss"] == pytest.approx(math.log(15))
    assert rows[0]["lr"] < rows[1]["lr"]  # warm-up epoch, then the cosine's first epoch
    two = ["simclr.py", *TINY, "--batch-size", "4"]
    run_script(*two, "--output-dir", tmp_path / "ref", nproc=2)
    run_script(*two, "--output-dir", tmp_path / "cut", "--stop-after-steps", "4", nproc=2)
    run_script(*two, "--output-dir", tmp_path / "cut", nproc=2)
    a, b = (torch.load(tmp_path / d / "backbone.pth") for d in ("ref", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
