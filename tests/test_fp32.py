"""ctrain.fp32 keeps float64 callers in float64 (issue 22.5), and every decision that a method
takes (argmax, assignment, matching, k-means) is the fp32 one under bf16 autocast (issue 23.4;
bf16 autocast runs on the CPU too, the twin of the CUDA path)."""
import math

import pytest
import torch

import detcon
import moco
import simclr
from tests.test_detcon import reference_loss as detcon_reference


def _ce(logits, target):
    """-log softmax(logits)[target] in Python floats (float64)."""
    top = max(logits)
    return -(logits[target] - top - math.log(sum(math.exp(v - top) for v in logits)))


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_info_nce_float64_equals_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    q, k = (_unit(torch.randn(4, 8, generator=g, dtype=torch.float64)) for _ in range(2))
    queue = _unit(torch.randn(16, 8, generator=g, dtype=torch.float64))
    T = 0.2
    dot = lambda u, v: sum(a * b for a, b in zip(u, v)) / T  # noqa: E731
    ref = sum(_ce([dot(qi, ki)] + [dot(qi, n) for n in queue.tolist()], 0)
              for qi, ki in zip(q.tolist(), k.tolist())) / 4
    got = moco.info_nce(q, k, queue, T)
    assert got.dtype == torch.float64
    assert abs(got.item() - ref) < 1e-12


def test_nt_xent_float64_equals_a_float64_loop():
    g = torch.Generator().manual_seed(1)
    z1, z2 = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    T, n = 0.1, 3
    z = _unit(torch.cat([z1, z2])).tolist()
    total = 0.0
    for i in range(2 * n):
        others = [j for j in range(2 * n) if j != i]
        logits = [sum(a * b for a, b in zip(z[i], z[j])) / T for j in others]
        total += _ce(logits, others.index((i + n) % (2 * n)))
    got = simclr.nt_xent(z1, z2, T)
    assert got.dtype == torch.float64
    assert abs(got.item() - total / (2 * n)) < 1e-12


def test_detcon_loss_float64_equals_a_float64_loop():
    g = torch.Generator().manual_seed(2)
    a1, a2, t1, t2 = (torch.randn(3, 4, 6, generator=g, dtype=torch.float64) for _ in range(4))
    ids1, ids2 = (torch.randint(0, 3, (3, 4), generator=g) for _ in range(2))
    got = detcon.detcon_loss(a1, a2, ids1, ids2, 0.1, t1, t2)
    assert got.dtype == torch.float64
    assert abs(got.item() - detcon_reference(a1, a2, ids1, ids2, 0.1, t1, t2)) < 1e-12


def test_fp32_up_casts_half_precision_and_leaves_autocast():
    seen = {}

    @detcon.ctrain.fp32
    def probe(x):
        seen["dtype"], seen["mm"] = x.dtype, (x @ x.t()).dtype
        return x

    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe(torch.ones(2, 2, dtype=torch.bfloat16))
    assert seen == {"dtype": torch.float32, "mm": torch.float32}
