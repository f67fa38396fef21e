"""MoCo v1 and v2: momentum contrast with a queue of negatives.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (CVPR 2020);
Chen et al., "Improved Baselines with Momentum Contrastive Learning" (2020). Recipe: the ConCL
paper's NCT-CRC-HE-100K setting (ResNet-18, heads 512-128 / 512-512-128, queue 16384, batch 256,
SGD lr 0.03, wd 1e-4, 200 epochs; docs/methods.md section 2).

    torchrun --nproc_per_node=8 moco.py --data nct --data-root /data/NCT-CRC-HE-100K
    python moco.py --data demo --epochs 2 --batch-size 32 --img-size 64 --queue-size 512   # CPU

A healthy log: `loss` starts near the chance level log(K+1) (9.70 for K = 16384), may *rise*
for the first epochs while the queue fills with real keys (pitfall P7), then falls; `acc` (the
positive key ranks first among K+1) climbs towards 90%+. A loss that collapses within an epoch
while features stay poor is the BN "cheat" that shuffle-BN exists to prevent.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cli
from common import data as cdata
from common import dist as cdist
from common import train as ctrain
from common.augment import Photometric
from common.models import convert_split_bn, resnet


# ----------------------------------------------------------------------------- augmentations
def augmentation(version, size, blur_kernel=None):
    """docs/methods.md 2.1. v1: grey *before* an always-on jitter with hue 0.4; v2: SimCLR-style.
    The photometric ops run in the loader or, with --device-aug, on the device (common.augment)."""
    if version == "v1":
        photometric = Photometric(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grey_p=0.2,
                                  grey_first=True)
    else:
        photometric = Photometric(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grey_p=0.2,
                                  blur_p=0.5, blur_sigma=(0.1, 2.0), blur_kernel=blur_kernel)
    return cdata.View(size, scale=(0.2, 1.0), flip_p=0.5, photometric=photometric)


# ----------------------------------------------------------------------------- the loss
def info_nce(q, k, queue, temperature):
    """q, k: (N, D) L2-normalised queries and their positive keys; queue: (K, D) negatives.
    Mean cross-entropy of [q.k, q.queue] / T with the positive in column 0."""
    return F.cross_entropy(moco_logits(q, k, queue, temperature),
                           torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@ctrain.fp32
def moco_logits(q, k, queue, temperature):
    l_pos = (q * k).sum(1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.t()                  # (N, K)
    return torch.cat([l_pos, l_neg], 1) / temperature


# ----------------------------------------------------------------------------- the model
def head(version, in_dim, dim):
    """v1: linear 512-128; v2: MLP 512-512-128 without BN (the ConCL NCT configs)."""
    if version == "v1":
        mlp = nn.Linear(in_dim, dim)
    else:
        mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, dim))
    for m in mlp.modules():  # OpenSelfSup's neck init (the NCT recipe); official MoCo keeps defaults
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return mlp


class MoCo(nn.Module):
    def __init__(self, arch="resnet18", version="v2", dim=128, K=16384, m=0.999, T=0.2,
                 bn_splits=1, init="openselfsup"):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        backbone = convert_split_bn(resnet(arch, init), bn_splits)
        self.encoder_q = nn.Sequential(backbone, head(version, backbone.feature_dim, dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(K, dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # Queue pointers live on the host (reading a device buffer each step would stall the
        # GPU); the buffers mirror them for checkpoints and are read back once after a load.
        self._host_ptr = {}
        self.register_load_state_dict_post_hook(lambda module, keys: module._host_ptr.clear())

    def advance(self, name, n):
        """The ring pointer buffer `name` -> its current value (a host int), moved on by n."""
        ptr = self._host_ptr.get(name)
        if ptr is None:  # first step, or after load_state_dict: one read
            ptr = int(getattr(self, name))
        self._host_ptr[name] = (ptr + n) % self.K
        getattr(self, name).fill_(self._host_ptr[name])
        return ptr

    @torch.no_grad()
    def momentum_update(self):
        """key <- m * key + (1 - m) * query, parameters only (BN buffers are not averaged)."""
        q, k = list(self.encoder_q.parameters()), list(self.encoder_k.parameters())
        torch._foreach_mul_(k, self.m)
        torch._foreach_add_(k, q, alpha=1 - self.m)

    @torch.no_grad()
    def enqueue(self, keys):
        keys = cdist.concat_all_gather(keys)  # (global batch, D), same on every rank
        n = keys.shape[0]
        assert self.K % n == 0, f"queue size {self.K} is not a multiple of the global batch {n}"
        ptr = self.advance("queue_ptr", n)
        self.queue[ptr:ptr + n] = keys

    def forward(self, x_q, x_k):
        q = F.normalize(self.encoder_q(x_q), dim=1)
        with torch.no_grad():
            self.momentum_update()  # at the start of forward, as the official code (P17)
            x_k, unshuffle = cdist.batch_shuffle(x_k)
            k = F.normalize(self.encoder_k(x_k), dim=1)
            k = cdist.batch_unshuffle(k, unshuffle)
        # clone: the queue is overwritten below while autograd still needs it for q's gradient
        logits = moco_logits(q, k, self.queue.clone(), self.T)
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        acc = (logits.argmax(1) == 0).float().mean()
        self.enqueue(k)
        return loss, {"loss": loss.detach(), "acc": 100 * acc}


# ----------------------------------------------------------------------------- training
def lr_at(args, step, steps_per_epoch):
    if args.schedule == "cos":
        return ctrain.cosine_lr(args.scaled_lr, step, steps_per_epoch, args.epochs)
    return ctrain.step_lr(args.scaled_lr, step, steps_per_epoch, args.lr_steps)


def train_one_epoch(model, optimizer, trainer, run, args):
    for step, batch in trainer.steps(trainer.epoch):
        lr = ctrain.set_lr(optimizer, lr_at(args, trainer.global_step(), trainer.steps_per_epoch))
        x_q, x_k = (run.images(v) for v in batch["views"])
        with run.autocast():
            loss, parts = model(x_q, x_k)
        trainer.backward_step(optimizer, loss, parts)
        trainer.update(parts, lr)


def check_moco_args(args, run):
    """The MoCo family's batch constraints (shared by densecl.py and concl.py)."""
    args.bn_splits = args.bn_splits or max(1, args.batch_size // 32)
    if args.batch_size % args.bn_splits:
        raise cdata.DataError(f"--batch-size {args.batch_size} is not a multiple of "
                              f"--bn-splits {args.bn_splits}")
    if args.queue_size % run.global_batch:
        raise cdata.DataError(f"--queue-size {args.queue_size} must be a multiple of the global "
                              f"batch {run.global_batch}")


def get_args(argv=None):
    p = cli.parser(__doc__)
    ctrain.add_common_args(p, batch_size=256, lr=0.03, epochs=200, weight_decay=1e-4)
    g = p.add_argument_group("moco")
    g.add_argument("--version", choices=["v1", "v2"], default="v2",
                   help="MoCo v1 (linear head, T 0.07, step lr) or v2 (MLP head, blur, cosine)")
    g.add_argument("--queue-size", type=cli.positive_int, default=16384, help="K (ImageNet MoCo: 65536)")
    g.add_argument("--moco-m", type=cli.unit_float, default=0.999, help="key encoder momentum")
    g.add_argument("--temperature", type=cli.positive_float, default=None, help="default v1 0.07, v2 0.2")
    g.add_argument("--dim", type=cli.positive_int, default=128, help="embedding width (the head's output)")
    g.add_argument("--blur-kernel", type=cli.odd_kernel, default=None,
                   help="v2 blur: default PIL GaussianBlur(radius=sigma) as the official code; "
                        "23 = torchvision's exact kernel (docs/methods.md 0.4), 5x the CPU cost")
    g.add_argument("--schedule", choices=["cos", "step"], default=None,
                   help="default v1 step, v2 per-epoch cosine")
    g.add_argument("--lr-steps", type=cli.positive_int, nargs="+", default=None,
                   help="v1 decay epochs (x0.1); default 0.6 and 0.8 of --epochs (120, 160 at "
                        "200). ConCL's 400/800-epoch v1 configs kept 120, 160: pass them to match")
    g.add_argument("--bn-splits", type=cli.positive_int, default=None,
                   help="BN groups per process (docs/methods.md D8); default batch-size / 32, so "
                        "BN always sees the paper's 32 images per GPU")
    p.set_defaults(resume_keys=("version", "queue_size", "dim"))
    args = p.parse_args(argv)
    args.temperature = args.temperature or (0.07 if args.version == "v1" else 0.2)
    args.schedule = args.schedule or ("step" if args.version == "v1" else "cos")
    args.lr_steps = args.lr_steps or [round(0.6 * args.epochs), round(0.8 * args.epochs)]
    return args


def main():
    args = get_args()
    run = ctrain.Run(args, "moco")
    check_moco_args(args, run)

    view = augmentation(args.version, args.img_size, args.blur_kernel)
    dataset = cdata.MultiViewDataset(cdata.build_dataset(args), [view, view], seed=args.seed)
    loader, sampler = cdata.pretrain_loader(dataset, args.batch_size, args.workers, args.seed,
                                            run.device)

    model = MoCo(args.arch, args.version, args.dim, args.queue_size, args.moco_m,
                 args.temperature, args.bn_splits, args.init).to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.scaled_lr, momentum=0.9,
                                weight_decay=args.weight_decay)
    trainer = ctrain.Trainer(run, model, optimizer, loader, sampler, model.encoder_q[0],
                             extra_log={"chance_loss": math.log(args.queue_size + 1)})
    run.print(f"MoCo {args.version} {args.arch}: {len(dataset)} images, global batch "
              f"{run.global_batch} = {run.world} x {args.batch_size} (BN groups of "
              f"{args.batch_size // args.bn_splits}), lr {args.scaled_lr:.4g}, T {args.temperature}, "
              f"K {args.queue_size}, chance loss log(K+1) = {math.log(args.queue_size + 1):.3f}, "
              f"{trainer.steps_per_epoch} steps/epoch, output {run.out}")
    ddp_model = run.wrap(model)
    for _ in trainer.epochs():
        train_one_epoch(ddp_model, optimizer, trainer, run, args)


if __name__ == "__main__":
    ctrain.main_guard(main)
