"""PCL v2: prototypical contrastive learning on top of MoCo v2.

Li, Zhou, Xiong, Hoi, "Prototypical Contrastive Learning of Unsupervised Representations"
(ICLR 2021); released code salesforce/PCL. A baseline of the ConCL paper's Table 1 (appendix
"PCL-v2": the released code, heads 512-512-128, 20000, 35000 and 50000 clusters on NCT). After
--warmup-epochs of plain MoCo v2, every epoch opens with an E-step: the momentum encoder embeds
every training tile (the released view: Resize + CenterCrop, a 1.14x centre zoom), a k-means per granularity turns the embeddings into
prototypes c (normalised centroids) with a concentration phi each; the M-step trains
L = InfoNCE + mean over granularities of ProtoNCE, where a query meets its own prototype against
--pcl-r negative prototypes, each logit divided by that prototype's phi. Recipe: MoCo v2's NCT
recipe (batch 256, SGD lr 0.03, wd 1e-4, per-epoch cosine, 200 epochs, T 0.2, queue 16384), with
torchvision's init of backbone and head as the released code (--init openselfsup: moco.py's).

    torchrun --nproc_per_node=8 pcl.py --data nct --data-root /data/NCT-CRC-HE-100K
    python pcl.py --data demo --epochs 3 --warmup-epochs 1 --batch-size 32 --img-size 64 \
        --queue-size 512 --num-clusters 48 96 --pcl-r 16                               # CPU

A healthy log: during warm-up it is MoCo v2 (`loss` from log(K+1) = 9.70, `acc` climbing). From
the first E-step on, each epoch prints the embedding and k-means times and, per granularity, the
cluster-size histogram (few empty or one-point clusters; on NCT about 2-5 tiles per cluster) and
the phi range (clipped, mean T); `loss_proto` starts near or below its chance level log(B + r)
(9.71 at B 32, r 16384) and falls, `acc_proto` (the query's own prototype ranks first) climbs;
`loss` = `loss_instance` + `loss_proto`. clusters.png (every E-step) shows the largest clusters of
the coarsest granularity with their member tiles.
"""
import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from common import cli
from common import data as cdata
from common import dist as cdist
from common import pictures
from common import train as ctrain
from common.knn import extract_features, tile_loader
from moco import MoCo, augmentation, check_moco_args, lr_at, moco_logits

BLOCK = 2 ** 26  # at most this many point-centroid distances at once (256 MB in fp32)


# ----------------------------------------------------------------------------- E-step: k-means
def nearest(x, c, block=BLOCK):
    """x (N, D), c (k, D) -> (N,) index of the nearest centroid, (N,) its squared distance;
    in row blocks, so the N x k distance matrix never exists whole (100k x 50k on NCT)."""
    c2 = (c * c).sum(1)
    labels, d2 = [], []
    for xb in x.split(max(1, block // c.shape[0])):
        m, i = torch.addmm(c2, xb, c.t(), alpha=-2).min(1)   # |c|^2 - 2 x.c
        labels.append(i)
        d2.append((m + (xb * xb).sum(1)).clamp_min(0))
    return torch.cat(labels), torch.cat(d2)


def seed_centroids(x, k, g, rounds=32, block=BLOCK):
    """k distinct points of x (N, D) by D^2 sampling (k-means++), ceil(k / rounds) centres per
    round so that 50000 centres need 32 passes, not 50000 (exact k-means++ for k <= rounds).
    Deviation: faiss, which the released code calls, seeds with k uniformly random points, which
    can merge well-separated clusters that D^2 seeding keeps apart."""
    n = x.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    idx = torch.randint(n, (1,), generator=g, device=x.device)
    chosen[idx] = True
    d2 = ((x - x[idx]) ** 2).sum(1)
    picked, count, per = [idx], 1, math.ceil(k / rounds)
    while count < k:
        m = min(per, k - count)
        # every unchosen point keeps a tiny weight: duplicates of a centre can still be drawn
        w = torch.where(chosen, 0.0, d2 / d2.max().clamp_min(1e-30) + 1e-9)
        new = torch.multinomial(w, m, replacement=False, generator=g)
        chosen[new] = True
        d2 = torch.minimum(d2, nearest(x, x[new], block)[1])
        picked.append(new)
        count += m
    return x[torch.cat(picked)].clone()


def lloyd(x, c, iters, block=BLOCK):
    """`iters` Lloyd iterations from centroids c (k, D); a cluster left empty is re-seeded on the
    point farthest from its centroid (faiss splits a large cluster instead). Returns the
    centroids and the final assignment to them: (k, D), (N,) labels, (N,) squared distances."""
    k = c.shape[0]
    for _ in range(iters):
        labels, d2 = nearest(x, c, block)
        n = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        c = torch.where(n[:, None] > 0, sums / n.clamp_min(1)[:, None], c)
        empty = (n == 0).nonzero()[:, 0]
        if empty.numel():
            c[empty] = x[d2.topk(empty.numel()).indices]
    labels, d2 = nearest(x, c, block)
    return c, labels, d2


@ctrain.fp32
def kmeans(x, k, iters=20, redo=5, seed=0, block=BLOCK):
    """Euclidean k-means of x (N, D) on its device, in fp32 even under --amp, the best of `redo`
    seeded restarts by inertia (faiss niter 20, nredo 5 as the released code) -> centroids
    (k, D), labels (N,), squared distances (N,) of every point to its centroid."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    best = None
    for _ in range(redo):
        c, labels, d2 = lloyd(x, seed_centroids(x, k, g, block=block), iters, block)
        if best is None or d2.double().sum() < best[2].double().sum():
            best = (c, labels, d2)
    return best


def concentration(dist, labels, k, temperature):
    """dist (N,) Euclidean distance of each point to its centroid, labels (N,) -> phi (k,):
    phi_c = mean distance / log(n_c + 10) (paper eq. 12); clusters of at most one point take the
    largest phi; then, as the released code, clipped to its 10th-90th percentiles (numpy's linear
    interpolation) and scaled so that its mean is T."""
    n = torch.bincount(labels, minlength=k)
    phi = (torch.zeros(k, dtype=torch.float64, device=dist.device)
           .index_add_(0, labels, dist.double()) / n.clamp_min(1) / torch.log(n + 10.0))
    many = n > 1
    phi = torch.where(many, phi, phi[many].max() if many.any() else 1.0)
    lo, hi = torch.quantile(phi, torch.tensor([0.1, 0.9], dtype=phi.dtype, device=phi.device))
    phi = phi.clamp(lo, hi)
    if phi.mean() <= 0:  # every cluster a set of duplicates: no spread to scale
        phi = torch.ones_like(phi)
    return (temperature * phi / phi.mean()).float()


# ----------------------------------------------------------------------------- ProtoNCE
def sample_negatives(pos, k, r):
    """pos (B,) the batch's cluster ids -> (r,) distinct ids of clusters no image of the batch
    uses, uniformly at random (torch's RNG, seeded per step): the r largest of k uniform keys,
    the batch's own clusters' keys set to -1. No device-to-host read (check_pcl_args ensures
    r free clusters)."""
    keys = torch.rand(k, device=pos.device).index_fill_(0, pos, -1.0)
    return keys.topk(r).indices


@ctrain.fp32
def proto_logits(q, pos, neg, prototypes, phi):
    """q (B, D) normalised queries, pos (B,) each query's cluster, neg (r,) negative clusters,
    prototypes (k, D), phi (k,) -> (B, B + r) logits q.c / phi_c; row i's target is column i.
    Reproduced from the released code: the columns are the B batch prototypes, then the r
    negatives, so row i also meets every *other* image's prototype as a negative -- its own
    prototype again when a batch-mate shares its cluster. Only the r sampled ones are guaranteed
    free of the batch's clusters."""
    ids = torch.cat([pos, neg])
    return q @ prototypes[ids].t() / phi[ids]


def proto_nce(q, pos, neg, prototypes, phi):
    """ProtoNCE of one granularity: mean cross-entropy of proto_logits, targets on the diagonal."""
    return F.cross_entropy(proto_logits(q, pos, neg, prototypes, phi),
                           torch.arange(q.shape[0], device=q.device))


# ----------------------------------------------------------------------------- the model
class Clusters(nn.Module):
    """One granularity's E-step result. Buffers, so the checkpoint holds it and a run resumed
    inside an epoch trains on the very prototypes that epoch's E-step made."""

    def __init__(self, n, k, dim):
        super().__init__()
        self.register_buffer("im2cluster", torch.zeros(n, dtype=torch.long))  # (N,)
        self.register_buffer("prototypes", torch.zeros(k, dim))              # (k, D) normalised
        self.register_buffer("phi", torch.ones(k))                           # (k,)


class PCL(MoCo):
    def __init__(self, args, n):
        init = getattr(args, "init", "torchvision")
        super().__init__(args.arch, "v2", args.dim, args.queue_size, args.moco_m, args.temperature,
                         args.bn_splits, init)
        if init == "torchvision":  # the released code: torchvision's init, head Linear included
            for m in self.encoder_q[1].modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
            self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.r = args.pcl_r
        self.clusters = nn.ModuleList(Clusters(n, k, args.dim) for k in args.num_clusters)
        self.register_buffer("cluster_epoch", torch.tensor(-1))  # whose E-step the buffers hold

    def forward(self, x_q, x_k, index=None):
        """index (B,): the batch's dataset indices, to look up their clusters; None in warm-up."""
        q = F.normalize(self.encoder_q(x_q), dim=1)
        with torch.no_grad():
            self.momentum_update()
            x_k, unshuffle = cdist.batch_shuffle(x_k)
            k = cdist.batch_unshuffle(F.normalize(self.encoder_k(x_k), dim=1), unshuffle)
        logits = moco_logits(q, k, self.queue.clone(), self.T)
        loss_inst = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        parts = {"loss_instance": loss_inst.detach(), "acc": 100 * (logits.argmax(1) == 0).float().mean()}
        self.enqueue(k)
        if index is None:  # warm-up: plain MoCo v2
            return loss_inst, {"loss": loss_inst.detach(), **parts}

        losses, hits = [], []
        for c in self.clusters:
            pos = c.im2cluster[index]  # this process's batch, as the released code
            neg = sample_negatives(pos, c.phi.numel(), self.r)
            lp = proto_logits(q, pos, neg, c.prototypes, c.phi)
            losses.append(F.cross_entropy(lp, torch.arange(q.shape[0], device=q.device)))
            # a hit when the top column is the query's own prototype, also as a batch-mate's
            # column (the released top-1 counts that identical logit as a miss)
            hits.append((torch.cat([pos, neg])[lp.argmax(1)] == pos).float().mean())
        loss_proto = torch.stack(losses).mean()
        loss = loss_inst + loss_proto
        return loss, {"loss": loss.detach(), **parts, "loss_proto": loss_proto.detach(),
                      "acc_proto": 100 * torch.stack(hits).mean()}


# ----------------------------------------------------------------------------- the E-step
def e_step_view(size):
    """The released `eval_augmentation`, Resize(256) + CenterCrop(224) (a 1.14x centre zoom),
    scaled to --img-size: the shorter side to round(size * 256 / 224), the centre size x size."""
    return T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size)])


@torch.no_grad()
def embed_tiles(encoder, base, run, args):
    """(N, D) L2-normalised momentum embeddings of every tile of `base` (e_step_view,
    eval-mode BN with rank 0's statistics), each process embedding a contiguous share of whole
    batches of 4 x --batch-size tiles (so every batch, and every bit of the
    result, is the same on any number of processes); gathered, in dataset order."""
    n, b = len(base), 4 * args.batch_size
    per = math.ceil(math.ceil(n / b) / run.world) * b
    encoder = copy.deepcopy(encoder)  # training's BN statistics stay untouched
    if run.world > 1:
        for buf in encoder.buffers():
            torch.distributed.broadcast(buf, 0)
    share = torch.utils.data.Subset(base, range(min(n, run.rank * per), min(n, (run.rank + 1) * per)))
    loader = tile_loader(share, args.img_size, b, args.workers)
    loader.dataset.transform = e_step_view(args.img_size)  # read by the workers it forks
    f = (extract_features(encoder, loader, run.device, progress=None if run.main else False)[0]
         if len(share) else torch.zeros(0, args.dim))
    padded = torch.zeros(per, args.dim, device=run.device)
    padded[:len(f)] = F.normalize(f, dim=1).to(run.device)
    return cdist.concat_all_gather(padded)[:n]


def size_histogram(labels, k):
    """'0: a  1: b  2-3: c  4-7: d ...' cluster counts by size (powers of two)."""
    n = torch.bincount(labels, minlength=k).cpu()
    bins = [(0, 0), (1, 1)] + [(2 ** i, 2 ** (i + 1) - 1) for i in range(1, int(n.max()).bit_length())]
    return "  ".join(f"{lo}{'' if lo == hi else f'-{hi}'}: {int(((n >= lo) & (n <= hi)).sum())}"
                     for lo, hi in bins)


@torch.no_grad()
def save_clusters(x, clusters, base, args, epoch, path, n_clusters=6, per_cluster=8):
    """clusters.png: the largest clusters of the coarsest granularity, one row each: its member
    tiles (as the E-step saw them) in order of cosine to the prototype, captioned."""
    i = min(range(len(args.num_clusters)), key=lambda j: args.num_clusters[j])
    c, k = clusters[i], args.num_clusters[i]
    labels, protos, phi = c.im2cluster.cpu(), c.prototypes.cpu(), c.phi.cpu()
    sizes = torch.bincount(labels, minlength=k)
    view = e_step_view(args.img_size)
    rows = []
    for cl in sizes.argsort(descending=True, stable=True)[:n_clusters].tolist():
        members = (labels == cl).nonzero()[:, 0]
        cos = x[members].cpu().float() @ protos[cl]
        order = cos.argsort(descending=True, stable=True)[:per_cluster]
        row = []
        for j, m in enumerate(order.tolist()):
            img, y = base[int(members[m])]
            tile = np.asarray(view(img.convert("RGB")))
            head = f"cluster {cl}: {int(sizes[cl])} tiles, phi {phi[cl]:.3f}; " if j == 0 else ""
            cls = f", class {y}" if isinstance(y, int) and y >= 0 else ""
            row.append((tile, f"{head}tile {int(members[m])}{cls}, cos {cos[m]:.2f}"))
        rows.append(row)
    notes = [f"E-step of epoch {epoch}, k = {k} (the coarsest of --num-clusters): the "
             f"{len(rows)} largest clusters, one per row. Each row shows up to {per_cluster} "
             "member tiles as the E-step embedded them (Resize + CenterCrop), the one closest to "
             "the prototype (the normalised centroid) first; cos = cosine of the tile's momentum "
             "embedding to the prototype; phi = the cluster's concentration (a larger phi: a "
             "looser cluster, a softer ProtoNCE logit). Rewritten at every E-step."]
    pictures.sheet(rows, f"PCL clusters after the E-step of epoch {epoch}", notes,
                   cell=max(128, args.img_size), caption_lines=3).save(path)
    return path


@torch.no_grad()
def e_step(model, base, run, args, epoch):
    """Cluster the momentum embeddings of every tile at each granularity into model.clusters.
    Granularity i is computed on process i % world (seeded from (seed, epoch, i)) and broadcast
    from it, so every process holds the same result. Returns the seconds it took."""
    t0 = time.perf_counter()
    x = embed_tiles(model.encoder_k, base, run, args)
    t1 = time.perf_counter()
    for i, (k, c) in enumerate(zip(args.num_clusters, model.clusters)):
        if i % run.world == run.rank:  # the granularities run in parallel over the processes
            cent, labels, d2 = kmeans(x, k, args.kmeans_iters, args.kmeans_redo,
                                      cdata.sample_seed(args.seed, epoch, i))
            c.prototypes.copy_(F.normalize(cent, dim=1))
            c.im2cluster.copy_(labels)
            c.phi.copy_(concentration(d2.sqrt(), labels, k, args.temperature))
    for i, c in enumerate(model.clusters if run.world > 1 else []):
        for b in c.buffers():
            torch.distributed.broadcast(b, i % run.world)
    model.cluster_epoch.fill_(epoch)
    t2 = time.perf_counter()
    run.print(f"E-step epoch {epoch}: {len(x)} x {x.shape[1]} embeddings in {t1 - t0:.1f} s, "
              f"k-means ({args.kmeans_iters} iterations, best of {args.kmeans_redo}) in "
              f"{t2 - t1:.1f} s")
    if run.main and args.vis_clusters:
        save_clusters(x, model.clusters, base, args, epoch, run.out / "clusters.png")
    for k, c in zip(args.num_clusters, model.clusters):
        run.print(f"  k={k}: cluster sizes {size_histogram(c.im2cluster, k)}; phi "
                  f"{c.phi.min():.3f}-{c.phi.max():.3f} (mean {c.phi.mean():.3f})")
    return t2 - t0


# ----------------------------------------------------------------------------- training
def train_one_epoch(model, optimizer, trainer, run, args):
    proto = trainer.epoch >= args.warmup_epochs
    for step, batch in trainer.steps(trainer.epoch):
        lr = ctrain.set_lr(optimizer, lr_at(args, trainer.global_step(), trainer.steps_per_epoch))
        x_q, x_k = (run.images(v) for v in batch["views"])
        index = batch["index"].to(run.device) if proto else None
        with run.autocast():
            loss, parts = model(x_q, x_k, index)
        trainer.backward_step(optimizer, loss, parts)
        trainer.update(parts, lr)


def get_args(argv=None):
    p = cli.parser(__doc__)
    ctrain.add_common_args(p, batch_size=256, lr=0.03, epochs=200, weight_decay=1e-4)
    g = p.add_argument_group("moco v2 (the instance branch)")
    g.add_argument("--queue-size", type=cli.positive_int, default=16384, help="K")
    g.add_argument("--moco-m", type=cli.unit_float, default=0.999, help="key encoder momentum")
    g.add_argument("--temperature", type=cli.positive_float, default=0.2,
                   help="InfoNCE's T and the mean of phi")
    g.add_argument("--dim", type=cli.positive_int, default=128, help="embedding and prototype size")
    g.add_argument("--blur-kernel", type=cli.odd_kernel, default=None,
                   help="blur: default PIL GaussianBlur(radius=sigma) as the official code; 23 = "
                        "torchvision's exact kernel (docs/methods.md 0.4), 5x the CPU cost")
    g.add_argument("--bn-splits", type=cli.positive_int, default=None,
                   help="shuffle-BN emulation, BN statistics over this many groups of the "
                        "per-process batch; default per-process batch / 32, at least 1 (as "
                        "moco.py, docs/methods.md D8)")
    for action in p._actions:
        if action.dest == "init":  # the released PCL code keeps torchvision's init (issue 22.4)
            action.default = "torchvision"
            action.help = ("backbone and head init: torchvision (default) = torchvision's ResNet "
                           "and PyTorch's Linear defaults, as the released PCL code that gave "
                           "ConCL's PCL-v2 row (ConCL's repository holds no PCL config); "
                           "openselfsup = Kaiming fan_in convs and head, as moco.py")
    g = p.add_argument_group("pcl")
    g.add_argument("--num-clusters", type=cli.positive_int, nargs="+", default=[20000, 35000, 50000],
                   help="k of each granularity (ConCL's NCT setting; ImageNet: 25000 50000 100000)")
    g.add_argument("--pcl-r", type=cli.positive_int, default=16384,
                   help="negative prototypes per granularity and step")
    g.add_argument("--warmup-epochs", type=cli.nonneg_int, default=20, help="plain MoCo v2 epochs before the first E-step")
    g.add_argument("--kmeans-iters", type=cli.positive_int, default=20, help="Lloyd iterations")
    g.add_argument("--kmeans-redo", type=cli.positive_int, default=5,
                   help="k-means restarts; the lowest inertia wins")
    g.add_argument("--vis-clusters", type=int, choices=[0, 1], default=1,
                   help="1: clusters.png at every E-step (the largest clusters and their tiles)")
    p.epilog = ("CPU example (minutes):\n  python pcl.py --data demo --epochs 3 --warmup-epochs 1 "
                "--batch-size 32 --img-size 64 --queue-size 512 --num-clusters 48 96 --pcl-r 16")
    p.set_defaults(resume_keys=("queue_size", "dim", "num_clusters", "pcl_r", "warmup_epochs",
                                "kmeans_iters", "kmeans_redo"))
    args = p.parse_args(argv)
    args.version, args.schedule = "v2", "cos"
    return args


def check_pcl_args(args, n):
    """Cluster counts the data can hold, and enough free clusters for --pcl-r negatives."""
    demo = "demo-sized runs need small counts, e.g. --num-clusters 48 96 --pcl-r 16 at --batch-size 32"
    for k in args.num_clusters:
        if k > n:
            raise cdata.DataError(f"--num-clusters {k}: more clusters than the {n} training tiles; {demo}")
    free = min(args.num_clusters) - args.batch_size
    if args.pcl_r > free:
        raise cdata.DataError(f"--pcl-r {args.pcl_r} exceeds the negatives available: the "
                              f"{min(args.num_clusters)} clusters of the smallest --num-clusters "
                              f"minus up to --batch-size {args.batch_size} the batch uses leave "
                              f"{max(free, 0)}; {demo}")


def main():
    args = get_args()
    run = ctrain.Run(args, "pcl")
    check_moco_args(args, run)
    base = cdata.build_dataset(args)
    check_pcl_args(args, len(base))

    view = augmentation("v2", args.img_size, args.blur_kernel)
    dataset = cdata.MultiViewDataset(base, [view, view], seed=args.seed)
    loader, sampler = cdata.pretrain_loader(dataset, args.batch_size, args.workers, args.seed,
                                            run.device)
    model = PCL(args, len(base)).to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.scaled_lr, momentum=0.9,
                                weight_decay=args.weight_decay)
    trainer = ctrain.Trainer(run, model, optimizer, loader, sampler, model.encoder_q[0],
                             extra_log={"chance_loss": math.log(args.queue_size + 1)})
    run.print(f"PCL v2 {args.arch}: {len(dataset)} images, global batch {run.global_batch} = "
              f"{run.world} x {args.batch_size}, lr {args.scaled_lr:.4g}, T {args.temperature}, "
              f"K {args.queue_size}, {args.warmup_epochs} warm-up epochs, then clusters "
              f"{' '.join(map(str, args.num_clusters))} with r = {args.pcl_r} negative prototypes; "
              f"chance losses: instance log(K+1) = {math.log(args.queue_size + 1):.3f}, proto "
              f"log(B+r) = {math.log(args.batch_size + args.pcl_r):.3f}; output {run.out}")
    ddp_model = run.wrap(model)
    for epoch in trainer.epochs():
        if epoch >= args.warmup_epochs:
            # a run resumed inside an epoch keeps the prototypes its checkpoint holds
            fresh = int(model.cluster_epoch) != epoch
            trainer.extra_log["e_step_s"] = e_step(model, base, run, args, epoch) if fresh else 0.0
        train_one_epoch(ddp_model, optimizer, trainer, run, args)


if __name__ == "__main__":
    ctrain.main_guard(main)
