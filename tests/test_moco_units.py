"""MoCo's pieces against independent expectations: hand-computed losses, brute-force BN,
explicit queue contents, and 2-process collectives."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import moco
from common import dist as cdist
from common import train as ctrain
from common.models import SplitBatchNorm2d, convert_split_bn, resnet
from tests.conftest import free_port


def test_info_nce_hand_computed():
    # 2 queries, 2-d; queue of 2 negatives. Cosines chosen to be easy to write down.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    T = 0.5
    # row 0 logits: [0.6, 1, -1]/T ; row 1: [1, 0, 0]/T ; label 0
    def ce(logits):
        return -logits[0] + math.log(sum(math.exp(v) for v in logits))
    expected = (ce([1.2, 2.0, -2.0]) + ce([2.0, 0.0, 0.0])) / 2
    assert moco.info_nce(q, k, queue, T).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_chance_level():
    # Orthogonal-to-everything positives and negatives: all logits equal -> loss log(K+1).
    q = torch.tensor([[1.0, 0.0, 0.0]])
    k = torch.tensor([[0.0, 1.0, 0.0]])
    queue = torch.tensor([[0.0, 0.0, 1.0]] * 7)
    assert moco.info_nce(q, k, queue, 0.2).item() == pytest.approx(math.log(8), rel=1e-6)


def test_queue_fifo_and_wraparound():
    m = moco.MoCo(K=6, dim=2)
    batches = [torch.full((2, 2), float(i)) for i in range(1, 5)]  # 4 batches of 2 into K=6
    for b in batches:
        m.enqueue(b)
    # FIFO ring: after 1,2,3 the queue is [1,1,2,2,3,3]; batch 4 overwrites the oldest (1).
    assert m.queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3]
    assert int(m.queue_ptr) == 2
    with pytest.raises(AssertionError):
        m.enqueue(torch.zeros(4, 2))  # 4 does not divide 6


def test_momentum_update_is_ema_of_parameters_only():
    m = moco.MoCo(K=8, dim=4, m=0.9)
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(1.0)
        m.encoder_q[0].bn1.running_mean.fill_(5.0)
    before_k = [p.clone() for p in m.encoder_k.parameters()]
    after_q = [p.clone() for p in m.encoder_q.parameters()]
    m.momentum_update()
    for pk, k0, q in zip(m.encoder_k.parameters(), before_k, after_q):
        torch.testing.assert_close(pk, 0.9 * k0 + 0.1 * q)
    assert torch.all(m.encoder_k[0].bn1.running_mean == 0)  # buffers are not averaged
    assert not any(p.requires_grad for p in m.encoder_k.parameters())


def test_identical_views_rank_first_and_key_encoder_gets_no_gradient():
    torch.manual_seed(0)
    m = moco.MoCo(K=64, dim=16, bn_splits=1)
    x = torch.randn(8, 3, 64, 64)
    # Same images, same weights, one BN group: k == q however shuffle-BN permutes the keys (batch
    # statistics are order-free) as long as the keys are un-shuffled, so every positive logit is
    # the maximum 1/T. A missing un-shuffle would pair q with other images' keys.
    loss, parts = m(x, x)
    assert parts["acc"].item() == 100
    assert loss.item() < math.log(65)
    loss.backward()
    assert all(p.grad is None for p in m.encoder_k.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder_q.parameters())
    assert int(m.queue_ptr) == 8


def test_split_bn_equals_per_chunk_bn():
    torch.manual_seed(0)
    x = torch.randn(12, 5, 4, 4) * 3 + 1
    split = SplitBatchNorm2d(5, num_splits=3)
    with torch.no_grad():
        split.weight.uniform_(0.5, 2)
        split.bias.uniform_(-1, 1)
    ref = [nn.BatchNorm2d(5) for _ in range(3)]
    for r in ref:
        r.load_state_dict(split.state_dict())
    y = split(x)
    y_ref = torch.empty_like(x)
    for j, r in enumerate(ref):  # group j = images j, j+3, j+6, ...
        y_ref[j::3] = r(x[j::3])
    torch.testing.assert_close(y, y_ref)
    # running stats: the mean of the three chunks' updates
    torch.testing.assert_close(split.running_mean, sum(r.running_mean for r in ref) / 3)
    torch.testing.assert_close(split.running_var, sum(r.running_var for r in ref) / 3)
    split.eval()
    torch.testing.assert_close(split(x), F.batch_norm(x, split.running_mean, split.running_var,
                                                      split.weight, split.bias, False))


def test_convert_split_bn_keeps_torchvision_state_dict():
    net = resnet("resnet18")
    keys = list(net.state_dict())
    convert_split_bn(net, 4)
    assert list(net.state_dict()) == keys
    assert isinstance(net.layer1[0].bn1, SplitBatchNorm2d)
    assert net(torch.randn(8, 3, 32, 32)).shape == (8, 512)


def test_lr_schedules():
    # per-epoch cosine: constant within an epoch, half of base at the middle epoch
    assert ctrain.cosine_lr(0.03, 0, 10, 200) == 0.03
    assert ctrain.cosine_lr(0.03, 9, 10, 200) == 0.03
    assert ctrain.cosine_lr(0.03, 1000, 10, 200) == pytest.approx(0.015)
    # warm-up from ratio 1e-4 over 2 epochs of 10 steps: linear in the step
    assert ctrain.cosine_lr(1.0, 0, 10, 200, warmup_epochs=2) == pytest.approx(1e-4)
    cos_epoch1 = 0.5 * (1 + math.cos(math.pi / 200))
    assert ctrain.cosine_lr(1.0, 10, 10, 200, warmup_epochs=2) == pytest.approx(
        cos_epoch1 * (1 - 0.5 * (1 - 1e-4)))
    assert ctrain.step_lr(0.03, 119 * 5, 5, [120, 160]) == 0.03
    assert ctrain.step_lr(0.03, 120 * 5, 5, [120, 160]) == pytest.approx(0.003)
    assert ctrain.step_lr(0.03, 199 * 5, 5, [120, 160]) == pytest.approx(0.0003)
    assert ctrain.cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert ctrain.cosine_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert ctrain.cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)


def test_lars_step_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))   # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([0.5])
    opt = ctrain.LARS([dict(params=[w], weight_decay=0.1, lars=True),
                       dict(params=[b], weight_decay=0.0, lars=False)], lr=2.0, eta=0.01)
    opt.step()
    d = torch.tensor([[0.3, 1.4]])                   # g + wd * w
    trust = 0.01 * 5 / math.sqrt(0.3 ** 2 + 1.4 ** 2)
    torch.testing.assert_close(w.data, torch.tensor([[3.0, 4.0]]) - 2.0 * trust * d)
    torch.testing.assert_close(b.data, torch.tensor([1.0 - 2.0 * 0.5]))  # plain SGD
    groups = ctrain.lars_param_groups(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), 1e-6)
    assert [len(g["params"]) for g in groups] == [1, 3]  # weight | bias, BN weight, BN bias


# ----------------------------------------------------------------------------- 2 processes
def _collectives_worker(rank, world, port, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        cdist.init_distributed()
        torch.manual_seed(100 + rank)  # ranks disagree: the permutation must come from rank 0
        x = torch.arange(4 * rank, 4 * rank + 4, dtype=torch.float32).unsqueeze(1)  # global 0..7
        gathered = cdist.concat_all_gather(x)
        assert gathered.squeeze(1).tolist() == list(range(8))
        shuffled, unshuffle = cdist.batch_shuffle(x)
        everything = cdist.concat_all_gather(shuffled).squeeze(1).tolist()
        assert sorted(everything) == list(range(8)), everything   # a permutation of the batch
        assert everything != list(range(8))                       # that moves images across ranks
        restored = cdist.batch_unshuffle(shuffled * 10, unshuffle)
        torch.testing.assert_close(restored, x * 10)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {e!r}")
    finally:
        cdist.cleanup()


def test_shuffle_bn_across_two_processes():
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_collectives_worker, args=(2, free_port(), errors), nprocs=2,
                       start_method="spawn")
    assert errors.empty(), errors.get()


def test_shuffle_single_process_is_permutation_with_inverse():
    torch.manual_seed(3)
    x = torch.arange(16.0).unsqueeze(1)
    s, un = cdist.batch_shuffle(x)
    assert sorted(s.squeeze(1).tolist()) == list(range(16)) and not torch.equal(s, x)
    torch.testing.assert_close(cdist.batch_unshuffle(s, un), x)


def test_openselfsup_init_is_kaiming_fan_in():
    # conv1 of ResNet-18: fan_in 3*7*7 = 147, fan_out 64*7*7 = 3136; std = sqrt(2 / fan)
    torch.manual_seed(0)
    w = resnet("resnet18").conv1.weight
    assert abs(w.std().item() - (2 / 147) ** 0.5) < 0.01
    w = resnet("resnet18", "torchvision").conv1.weight
    assert abs(w.std().item() - (2 / 3136) ** 0.5) < 0.003
    net = resnet("resnet18")
    assert torch.equal(net.bn1.weight, torch.ones(64)) and torch.equal(net.bn1.bias, torch.zeros(64))


# ----------------------------------------------------------------------------- host syncs (issue 23.6)
class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make a CUDA stream wait for the host to read a result: a tensor's
    value turned into a Python number (item, int, float, bool), a copy to the host (tolist,
    numpy, cpu) and data-dependent shapes (nonzero, boolean indexing). Runs on the CPU, as a
    twin of CUDA's sync debug mode."""
    SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2",
             "repeat_interleave"}
    HOST = {"tolist", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.ops = []
        outer = self

        class Methods(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in outer.HOST:
                    outer.ops.append(func.__name__)
                return func(*args, **(kwargs or {}))
        self.methods = Methods()

    def __enter__(self):
        self.methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.methods.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCS or (name == "index" and any(
                torch.is_tensor(i) and i.dtype == torch.bool for i in args[1])):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_host_reads_counter_sees_item_int_copies_and_masks():
    x = torch.arange(4.0)
    with HostReads() as h:
        x.sum().item(), int(x[1]), x[x > 1], (x > 1).nonzero(), x.tolist(), x.cpu()
    assert h.ops == ["_local_scalar_dense", "_local_scalar_dense", "index", "nonzero", "tolist", "cpu"]


def test_queue_pointer_on_the_host_and_exact_after_a_load():
    torch.manual_seed(0)
    m = moco.MoCo(K=8, dim=2)
    m.enqueue(torch.ones(2, 2))  # first call reads the buffer once
    with HostReads() as h:
        for i in range(2, 5):
            m.enqueue(torch.full((2, 2), float(i)))
    assert h.ops == [] and int(m.queue_ptr) == 0 and m.queue[:, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    # a checkpoint taken mid-ring resumes at its pointer, not at the fresh model's host value
    m.enqueue(torch.full((2, 2), 5.0))
    fresh = moco.MoCo(K=8, dim=2)
    fresh.enqueue(torch.zeros(2, 2))  # the fresh model's host pointer is now 2
    fresh.load_state_dict(m.state_dict())
    for model in (m, fresh):
        model.enqueue(torch.full((2, 2), 6.0))
    assert torch.equal(fresh.queue, m.queue) and fresh.queue[:, 0].tolist() == [5, 5, 6, 6, 3, 3, 4, 4]
    assert int(fresh.queue_ptr) == int(m.queue_ptr) == 4


def test_a_moco_step_reads_nothing_back():
    torch.manual_seed(0)
    m = moco.MoCo(K=16, dim=8)
    x = torch.randn(4, 3, 32, 32)
    m(x, x)  # warm-up: the pointer's one read
    with HostReads() as h:
        loss, parts = m(x, x.flip(3))
        loss.backward()
    assert h.ops == []
