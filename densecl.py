"""DenseCL: MoCo v2 plus a dense contrastive loss between matched C5 locations.

Wang et al., "Dense Contrastive Learning for Self-Supervised Visual Pre-Training" (CVPR 2021).
Recipe: the ConCL paper's NCT setting = MoCo v2's (ResNet-18, batch 256, SGD lr 0.03, wd 1e-4,
per-epoch cosine, 200 epochs, two queues of 16384, T 0.2, lambda 0.5; docs/methods.md section 4).

    torchrun --nproc_per_node=8 densecl.py --data nct --data-root /data/NCT-CRC-HE-100K
    python densecl.py --data demo --epochs 2 --batch-size 32 --img-size 64 --queue-size 512  # CPU

A healthy log: `loss_global` behaves like MoCo v2's loss; `loss_dense` starts near the chance
level log(K+1) too and, like the global loss, may rise for the first epochs while the queues
fill (pitfall P7) before it falls; `acc_dense` (a location's matched key ranks first) climbs
more slowly than `acc`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cli
from common import data as cdata
from common import dist as cdist
from common import train as ctrain
from common.models import resnet_maps
from moco import MoCo, augmentation, check_moco_args, lr_at, moco_logits


# ----------------------------------------------------------------------------- the dense idea
@ctrain.fp32
def match(q_feat, k_feat):
    """q_feat, k_feat (N, C, S) backbone features of two views -> (N, S): for every query
    location the most cosine-similar key location (query -> key, not mutual)."""
    sim = torch.bmm(F.normalize(q_feat, dim=1).transpose(1, 2), F.normalize(k_feat, dim=1))
    return sim.argmax(2)


@ctrain.fp32
def dense_logits(q_d, k_d, idx, queue, temperature):
    """q_d, k_d (N, D, S) normalised dense embeddings, idx (N, S) matches, queue (K, D) ->
    (N * S, 1 + K) logits with each location's matched key first."""
    k_pos = k_d.gather(2, idx.unsqueeze(1).expand(-1, k_d.shape[1], -1))   # (N, D, S)
    l_pos = (q_d * k_pos).sum(1).reshape(-1, 1)                            # (N * S, 1)
    l_neg = q_d.transpose(1, 2).reshape(-1, q_d.shape[1]) @ queue.t()       # (N * S, K)
    return torch.cat([l_pos, l_neg], 1) / temperature


class DenseHead(nn.Module):
    """1x1-conv MLP 512-512-128 over the C5 grid (no BN), as DenseCL's neck. PyTorch's default
    conv init, as the official code: OpenSelfSup's neck init (necks._init_weights) re-initialises
    only nn.Linear layers (the global branch, moco.head) and leaves these convolutions alone."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(in_dim, dim, 1))

    def forward(self, c5):
        return self.mlp(c5).flatten(2)  # (N, D, S)


class DenseCL(MoCo):
    def __init__(self, args):
        super().__init__(args.arch, "v2", args.dim, args.queue_size, args.moco_m, args.temperature,
                         args.bn_splits, args.init)
        feat = self.encoder_q[0].feature_dim
        self.dense_q = DenseHead(feat, args.dim)
        self.dense_k = DenseHead(feat, args.dim)
        self.dense_k.load_state_dict(self.dense_q.state_dict())
        for p in self.dense_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue2", F.normalize(torch.randn(args.queue_size, args.dim), dim=1))
        self.register_buffer("queue2_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        super().momentum_update()
        q, k = list(self.dense_q.parameters()), list(self.dense_k.parameters())
        torch._foreach_mul_(k, self.m)
        torch._foreach_add_(k, q, alpha=1 - self.m)

    @torch.no_grad()
    def enqueue2(self, keys):
        keys = cdist.concat_all_gather(keys)
        n = keys.shape[0]
        assert self.K % n == 0, f"queue size {self.K} is not a multiple of the global batch {n}"
        ptr = self.advance("queue2_ptr", n)
        self.queue2[ptr:ptr + n] = keys

    @staticmethod
    def encode(encoder, dense, x):
        """-> backbone C5 (N, C, S), global embedding (N, D), raw dense embeddings (N, D, S)."""
        c5 = resnet_maps(encoder[0], x)[-1]
        return c5.flatten(2), F.normalize(encoder[1](c5.mean((2, 3))), dim=1), dense(c5)

    def forward(self, x_q, x_k, lam):
        b_q, q, d_q = self.encode(self.encoder_q, self.dense_q, x_q)
        d_q = F.normalize(d_q, dim=1)
        with torch.no_grad():
            self.momentum_update()
            x_k, unshuffle = cdist.batch_shuffle(x_k)
            b_k, k, d_k = self.encode(self.encoder_k, self.dense_k, x_k)
            # every key-derived tensor back in query order (pitfall P1)
            b_k, k, d_k = (cdist.batch_unshuffle(t, unshuffle) for t in (b_k, k, d_k))
            k_pool = F.normalize(d_k.mean(2), dim=1)  # pool, then normalise (P6)
            d_k = F.normalize(d_k, dim=1)
            idx = match(b_q, b_k)
        logits_g = moco_logits(q, k, self.queue.clone(), self.T)
        logits_d = dense_logits(d_q, d_k, idx, self.queue2.clone(), self.T)
        loss_g = F.cross_entropy(logits_g, logits_g.new_zeros(logits_g.shape[0], dtype=torch.long))
        loss_d = F.cross_entropy(logits_d, logits_d.new_zeros(logits_d.shape[0], dtype=torch.long))
        loss = (1 - lam) * loss_g + lam * loss_d
        self.enqueue(k)
        self.enqueue2(k_pool)
        return loss, {"loss": loss.detach(), "loss_global": loss_g.detach(),
                      "loss_dense": loss_d.detach(),
                      "acc": 100 * (logits_g.argmax(1) == 0).float().mean(),
                      "acc_dense": 100 * (logits_d.argmax(1) == 0).float().mean()}


# ----------------------------------------------------------------------------- training
def train_one_epoch(model, optimizer, trainer, run, args):
    for step, batch in trainer.steps(trainer.epoch):
        it = trainer.global_step()
        lr = ctrain.set_lr(optimizer, lr_at(args, it, trainer.steps_per_epoch))
        lam = 0.0 if it < args.dense_warmup_iters else args.loss_lambda
        x_q, x_k = (run.images(v) for v in batch["views"])
        with run.autocast():
            loss, parts = model(x_q, x_k, lam)
        trainer.backward_step(optimizer, loss, parts)
        trainer.update(parts, lr)


def get_args(argv=None):
    p = cli.parser(__doc__)
    ctrain.add_common_args(p, batch_size=256, lr=0.03, epochs=200, weight_decay=1e-4)
    g = p.add_argument_group("densecl")
    g.add_argument("--queue-size", type=cli.positive_int, default=16384, help="both queues (ImageNet: 65536)")
    g.add_argument("--moco-m", type=cli.unit_float, default=0.999, help="key encoder momentum")
    g.add_argument("--temperature", type=cli.positive_float, default=0.2, help="both losses")
    g.add_argument("--dim", type=cli.positive_int, default=128, help="embedding width of both heads")
    g.add_argument("--loss-lambda", type=cli.unit_float, default=0.5, help="weight of the dense loss")
    g.add_argument("--dense-warmup-iters", type=cli.nonneg_int, default=0,
                   help="lambda = 0 for the first N iterations (the official hook; off in every "
                        "released config)")
    g.add_argument("--blur-kernel", type=cli.odd_kernel, default=None, help="as moco.py")
    g.add_argument("--bn-splits", type=cli.positive_int, default=None, help="as moco.py (docs/methods.md D8)")
    p.set_defaults(resume_keys=("queue_size", "dim"))
    args = p.parse_args(argv)
    args.version, args.schedule = "v2", "cos"
    return args


def main():
    args = get_args()
    run = ctrain.Run(args, "densecl")
    check_moco_args(args, run)
    view = augmentation("v2", args.img_size, args.blur_kernel)
    dataset = cdata.MultiViewDataset(cdata.build_dataset(args), [view, view], seed=args.seed)
    loader, sampler = cdata.pretrain_loader(dataset, args.batch_size, args.workers, args.seed,
                                            run.device)
    model = DenseCL(args).to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.scaled_lr, momentum=0.9,
                                weight_decay=args.weight_decay)
    trainer = ctrain.Trainer(run, model, optimizer, loader, sampler, model.encoder_q[0],
                             extra_log={"chance_loss": math.log(args.queue_size + 1)})
    run.print(f"DenseCL {args.arch}: {len(dataset)} images, global batch {run.global_batch} = "
              f"{run.world} x {args.batch_size} (BN groups of {args.batch_size // args.bn_splits}), "
              f"lr {args.scaled_lr:.4g}, T {args.temperature}, K {args.queue_size} x 2, lambda "
              f"{args.loss_lambda}, chance loss {math.log(args.queue_size + 1):.3f}, "
              f"{trainer.steps_per_epoch} steps/epoch, output {run.out}")
    ddp_model = run.wrap(model)
    for _ in trainer.epochs():
        train_one_epoch(ddp_model, optimizer, trainer, run, args)


if __name__ == "__main__":
    ctrain.main_guard(main)
