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


# ----------------------------------------------------------------------------- issue 23.4
def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_detcon_and_mcl_decisions_under_bf16_autocast_are_the_fp32_ones():
    """DetCon's labels are integer counts drawn in the loader (no float decides them); its
    loss and best-match statistics, and MCL's retrieval loss and top-1, are fp32 islands."""
    import mcl
    g = torch.Generator().manual_seed(3)
    a1, a2 = (torch.randn(4, 8, 32, generator=g) for _ in range(2))
    ids1, ids2 = (torch.randint(0, 5, (4, 8), generator=g) for _ in range(2))
    ref = detcon.detcon_loss(a1, a2, ids1, ids2, 0.1, return_stats=True)
    with bf16():
        got = detcon.detcon_loss(a1, a2, ids1, ids2, 0.1, return_stats=True)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(got[1][k], ref[1][k]) for k in ref[1])
    e, z = torch.randn(48, 32, generator=g), _unit(torch.randn(16, 32, generator=g))
    labels = torch.randint(0, 16, (48,), generator=g)
    ref = mcl.retrieval_loss(e, z, labels, 1.0)
    with bf16():
        got = mcl.retrieval_loss(e, z, labels, 1.0)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    cells = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 1]]).repeat_interleave(8, 0)
    cells = cells.repeat_interleave(8, 1)  # a 16 x 32 map -> 2 x 4 cells of 8 x 8 pixels
    with bf16():
        assert detcon.cell_labels(torch.cat([cells, cells]), 4).tolist() == \
            [0, 0, 1, 1, 2, 2, 2, 1, 0, 0, 1, 1, 2, 2, 2, 1]


def test_pixcon_matching_under_bf16_autocast_is_the_fp32_one():
    import pixcon
    g = torch.Generator().manual_seed(4)
    b_q, b_k = (torch.randn(6, 64, 49, generator=g) for _ in range(2))
    b_k[:, :, 1::2] = b_k[:, :, ::2][:, :, :24] + 1e-3 * torch.randn(6, 64, 24, generator=g)
    overlap = torch.rand(6, 49, generator=g) > 0.5
    for match in ("sim", "sr"):
        ref = pixcon.positives(match, b_q, b_k, overlap, None, 2.0)
        with bf16():
            got = pixcon.positives(match, b_q.bfloat16(), b_k.bfloat16(), overlap, None, 2.0)
            full = pixcon.positives(match, b_q, b_k, overlap, None, 2.0)
        assert torch.equal(full[0], ref[0]) and torch.equal(full[1], ref[1])
        assert got[0].dtype == torch.long and got[1].dtype == torch.float32


def test_pcl_e_step_k_means_and_prototype_argmax_under_bf16_autocast_are_the_fp32_ones():
    import pcl
    g = torch.Generator().manual_seed(5)
    x = _unit(torch.randn(300, 16, generator=g))
    ref = pcl.kmeans(x, 20, iters=5, redo=2, seed=1)
    with bf16():
        got = pcl.kmeans(x, 20, iters=5, redo=2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    q, protos = _unit(torch.randn(8, 16, generator=g)), _unit(torch.randn(30, 16, generator=g))
    pos, neg = torch.arange(8), torch.arange(8, 20)
    phi = 0.1 + 0.2 * torch.rand(30, generator=g)
    ref = pcl.proto_logits(q, pos, neg, protos, phi)
    with bf16():
        got = pcl.proto_logits(q, pos, neg, protos, phi)
    assert torch.equal(got, ref) and torch.equal(got.argmax(1), ref.argmax(1))
