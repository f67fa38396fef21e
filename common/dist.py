"""Process group set-up and the collectives the methods share.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (env://). NCCL on CUDA, gloo on CPU. Without
torchrun (or with one process) there is no process group and every helper is the identity, so
`python moco.py` and `torchrun --nproc_per_node=8 moco.py` run the same code.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed():
    """Returns (rank, world_size, local_rank, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    # More processes than GPUs share them round-robin: only with DIST_BACKEND=gloo (NCCL refuses
    # two ranks on one GPU); scripts/gpu_check.sh runs two processes on one GPU that way.
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = os.environ.get("DIST_BACKEND") or ("nccl" if cuda else "gloo")
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=30),
                                device_id=device if cuda and backend == "nccl" else None)
    return rank, world, local, device


def is_dist():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def barrier():
    if is_dist():
        dist.barrier()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def concat_all_gather(x):
    """(N, ...) on every rank -> (world * N, ...), rank order. No gradient flows back."""
    if not is_dist():
        return x
    x, out = _gather_buffers(x)
    dist.all_gather(out, x)
    return torch.cat(out)


def _gather_buffers(x):
    """x made contiguous and world-size outputs of the same (contiguous) layout. NCCL copies raw
    memory into the outputs: outputs allocated like a channels_last x (empty_like) but filled
    from x.contiguous() would permute the data without an error (pytorch issue 163483)."""
    x = x.contiguous()
    return x, [torch.empty(x.shape, dtype=x.dtype, device=x.device)
               for _ in range(dist.get_world_size())]


def all_reduce(x, op="sum"):
    """In-place all-reduce of a tensor ("sum" or "max"); identity at world size 1. A
    non-contiguous x is reduced through a contiguous copy (the ranks' layouts could differ)."""
    if is_dist():
        buf = x if x.is_contiguous() else x.contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        if buf is not x:
            x.copy_(buf)
    return x


@torch.no_grad()
def batch_shuffle(x):
    """Shuffle-BN (MoCo): permute the global key batch across processes.

    Returns this rank's slice of the permuted global batch and the index that undoes it. At
    world size 1 the permutation is local; with split BN (common.models.SplitBatchNorm2d) it
    still spreads every BN group's images over the whole batch.
    """
    n = x.shape[0]
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    if is_dist():
        dist.broadcast(perm, src=0)  # every rank must use rank 0's permutation
    unshuffle = torch.argsort(perm)
    mine = perm.view(get_world_size(), n)[get_rank()]
    return x_all[mine], unshuffle


@torch.no_grad()
def batch_unshuffle(x, unshuffle):
    """Inverse of batch_shuffle for anything computed from the shuffled keys (pitfall P1)."""
    n = x.shape[0]
    x_all = concat_all_gather(x)
    mine = unshuffle.view(get_world_size(), n)[get_rank()]
    return x_all[mine]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks before slicing, so a
    loss computed on local anchors against gathered candidates gets every rank's contribution
    (pitfall P3: a backward that returns only the local slice loses them)."""

    @staticmethod
    def forward(ctx, x):
        x, out = _gather_buffers(x)
        dist.all_gather(out, x)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x):
    """(N, ...) on every rank -> (world * N, ...) with gradients flowing back to every rank.

    Each rank's backward receives the gradient of the *sum* of all ranks' losses; DDP then
    averages over ranks, so a per-rank mean over local anchors trains with exactly the gradient
    of the mean over the global batch."""
    return _GatherWithGrad.apply(x) if is_dist() else x
