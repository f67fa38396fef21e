"""DenseCL's pieces against brute force, and its runs end to end."""
import copy
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision

import densecl
from common.models import resnet_maps
from moco import MoCo
from tests.conftest import run_script


def test_match_recovers_a_permutation_by_cosine_not_dot_product():
    torch.manual_seed(0)
    N, C, S = 3, 16, 49
    q = torch.randn(N, C, S)
    perm = torch.stack([torch.randperm(S) for _ in range(N)])         # key j = query perm[j]
    scale = torch.rand(N, 1, S) * 10 + 0.1                            # breaks a dot product
    k = q.gather(2, perm.unsqueeze(1).expand(-1, C, -1)) * scale + 0.01 * torch.randn(N, C, S)
    idx = densecl.match(q, k)
    expected = torch.argsort(perm, dim=1)                             # where query i went
    assert torch.equal(idx, expected)


def test_dense_logits_against_a_loop():
    torch.manual_seed(1)
    N, D, S, K, T = 2, 4, 5, 6, 0.2
    q = F.normalize(torch.randn(N, D, S), dim=1)
    k = F.normalize(torch.randn(N, D, S), dim=1)
    queue = F.normalize(torch.randn(K, D), dim=1)
    idx = torch.randint(S, (N, S))
    got = F.cross_entropy(densecl.dense_logits(q, k, idx, queue, T), torch.zeros(N * S, dtype=torch.long))
    losses = []
    for n in range(N):
        for i in range(S):
            pos = (q[n, :, i] @ k[n, :, idx[n, i]]) / T
            neg = (queue @ q[n, :, i]) / T
            losses.append(-pos + torch.logsumexp(torch.cat([pos[None], neg]), 0))
    torch.testing.assert_close(got, torch.stack(losses).mean())


def args(**kw):
    a = dict(arch="resnet18", dim=16, queue_size=32, moco_m=0.99, temperature=0.2, bn_splits=1,
             init="openselfsup")
    a.update(kw)
    return types.SimpleNamespace(**a)


def test_unshuffled_keys_and_pooled_dense_keys():
    torch.manual_seed(2)
    model = densecl.DenseCL(args())
    x = torch.randn(8, 3, 64, 64)
    loss, parts = model(x, x, 0.5)
    # identical views and weights, one BN group: each location's best key is itself, which
    # requires every key tensor to be back in query order after shuffle-BN
    assert parts["acc_dense"].item() == 100 and parts["acc"].item() == 100
    # the enqueued dense keys are the key map averaged over locations, then normalised (P6)
    with torch.no_grad():
        c5 = resnet_maps(model.encoder_k[0], x)[-1]
        expected = F.normalize(model.dense_k(c5).mean(2), dim=1)
    torch.testing.assert_close(model.queue2[:8], expected, atol=1e-5, rtol=1e-4)
    assert int(model.queue2_ptr) == 8 and int(model.queue_ptr) == 8
    assert all(p.grad is None for p in model.dense_k.parameters())


def test_lambda_zero_is_moco_v2():
    torch.manual_seed(3)
    model = densecl.DenseCL(args())
    twin = copy.deepcopy(model)
    xq, xk = torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64)
    torch.manual_seed(4)
    loss, parts = model(xq, xk, 0.0)
    torch.manual_seed(4)  # same shuffle-BN permutation
    moco_loss, _ = MoCo.forward(twin, xq, xk)
    torch.testing.assert_close(loss, moco_loss)
    assert parts["loss_dense"] > 0


TINY = ["--data", "demo", "--demo-size", "24", "--batch-size", "8", "--img-size", "64",
        "--queue-size", "64", "--workers", "1", "--epochs", "2"]


def test_runs_single_and_two_processes_and_resumes(tmp_path):
    run_script("densecl.py", *TINY, "--output-dir", tmp_path / "one")
    rows = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"loss_global", "loss_dense", "acc_dense"} <= rows[0].keys()
    assert rows[0]["loss"] == \
        pytest.approx(0.5 * rows[0]["loss_global"] + 0.5 * rows[0]["loss_dense"])
    assert rows[0]["chance_loss"] == pytest.approx(math.log(65))
    res = torchvision.models.resnet18().load_state_dict(
        torch.load(tmp_path / "one" / "backbone.pth"), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    two = ["densecl.py", *TINY, "--batch-size", "4"]
    run_script(*two, "--output-dir", tmp_path / "ref", nproc=2)
    run_script(*two, "--output-dir", tmp_path / "cut", "--stop-after-steps", "4", nproc=2)
    run_script(*two, "--output-dir", tmp_path / "cut", nproc=2)
    a, b = (torch.load(tmp_path / d / "backbone.pth") for d in ("ref", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_match_is_fp32_under_bf16_autocast():
    # key location 1 is the query itself, location 0 a near copy (cosine 1 - 5e-5): bf16 rounds
    # both similarities to 1.0 and its argmax takes the first; fp32 finds the copy's twin
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, 3, generator=g)
    k = torch.randn(2, 64, 3, generator=g)
    k[:, :, 1] = q[:, :, 0]
    k[:, :, 0] = q[:, :, 0] + 0.01 * torch.randn(2, 64, generator=g) * q[:, :, 0].norm(dim=1, keepdim=True) / 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = densecl.match(q.bfloat16(), k.bfloat16())
    assert idx[:, 0].tolist() == [1, 1] and torch.equal(idx, densecl.match(q.bfloat16(), k.bfloat16()))


def test_a_densecl_step_reads_nothing_back():
    from tests.test_moco_units import HostReads
    torch.manual_seed(2)
    model = densecl.DenseCL(args())
    x = torch.randn(8, 3, 32, 32)
    model(x, x, 0.5)  # warm-up: the queue pointers' one read each
    with HostReads() as h:
        loss, _ = model(x, x.flip(3), 0.5)
        loss.backward()
    assert h.ops == []
