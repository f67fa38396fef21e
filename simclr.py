"""SimCLR: contrast every view against all other views of the (global) batch.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (ICML 2020);
`--aug histo` is Ciga et al.'s histopathology recipe ("Self supervised contrastive learning for
digital histopathology", 2021, appendix C). Recipe: the ConCL paper's NCT setting (ResNet-18,
head 512-512-128 with BN, T 0.1, global batch 1024, LARS lr 0.6, wd 1e-6, 10 warm-up epochs,
per-epoch cosine, 200 epochs; docs/methods.md section 1).

    torchrun --nproc_per_node=8 simclr.py --data nct --data-root /data/NCT-CRC-HE-100K
    python simclr.py --data demo --epochs 2 --batch-size 32 --img-size 64 --warmup-epochs 1  # CPU

A healthy log: `loss` starts near the chance level log(2N - 1) (7.62 at N = 1024) and falls
steadily; `acc` (the other view of the same tile is the most similar of the 2N - 1 candidates)
rises. Across processes, negatives are gathered with gradients, so 8 GPUs x 128 train exactly
like one device with 1024.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common import cli
from common import data as cdata
from common import dist as cdist
from common import train as ctrain
from common.augment import Photometric
from common.models import resnet


# ----------------------------------------------------------------------------- augmentations
class RotateFlip:
    """Ciga et al.'s rotation by 0, 90, 180 or 270 degrees (counter-clockwise, each with
    probability 1/4), then a vertical flip with p 0.5: a common.data.View geometric op, run on
    the PIL view or on the device (--device-crop). sample() draws what RandomRot90 and
    T.RandomVerticalFlip(0.5) drew, in their order: (k, flipped) float64."""

    def sample(self):
        k = int(torch.randint(4, ()))
        return torch.tensor([k, float(torch.rand(1) < 0.5)], dtype=torch.float64)

    def apply_pil(self, img, params):
        k, flip = int(params[0]), bool(params[1])
        if k:
            img = img.transpose((Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)[k - 1])
        return img.transpose(Image.FLIP_TOP_BOTTOM) if flip else img

    def apply_batch(self, x, params):
        """x (N, C, S, S) uint8 on the device, params (N, 2) as sample()'s -> apply_pil's pixels
        per sample (PIL's ROTATE_90 is torch.rot90 over (H, W)). The parameters reach the device
        in one copy, pinned and non-blocking on CUDA; nothing waits for the device."""
        p = params.pin_memory() if x.is_cuda else params
        p = p.to(x.device, non_blocking=True).view(-1, 2, 1, 1, 1)
        out = x
        for k in (1, 2, 3):
            out = torch.where(p[:, 0] == k, torch.rot90(x, k, (2, 3)), out)
        return torch.where(p[:, 1] > 0, out.flip(2), out)

    def __repr__(self):
        return "RotateFlip()"


def augmentation(kind, size, blur_kernel=None):
    """docs/methods.md 1.1 (`simclr`, the NCT config) or Ciga et al.'s `histo`: crops down to 1% of
    the area, 90-degree rotations, both flips, medium jitter, blur; no grey. SimCLR needs no
    crop boxes, so the rotation and vertical flip (RotateFlip) run after the view's crop and
    flip, before the photometric ops: in the loader, or with --device-crop on the device."""
    ops = dict(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, blur_p=0.5, blur_sigma=(0.1, 2.0),
               blur_kernel=blur_kernel)
    if kind == "histo":  # the paper gives no jitter probability: SimCLR's 0.8
        return cdata.View(size, scale=(0.01, 1.0), photometric=Photometric(**ops),
                          geometric=RotateFlip())
    return cdata.View(size, scale=(0.08, 1.0), photometric=Photometric(**ops, grey_p=0.2))


# ----------------------------------------------------------------------------- the loss
@ctrain.fp32
def nt_xent(z1, z2, temperature):
    """z1, z2 (N, D) projections of two views. Each of the 2N rows against the other 2N - 1
    (itself removed, not compensated; pitfall P4), positive = the other view; mean over 2N."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.t() / temperature).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


@ctrain.fp32
def distributed_nt_xent(z1, z2, temperature, return_logits=False):
    """nt_xent with this process's 2N anchors against the 2N x world candidates of all processes,
    gathered with gradients (common.dist.gather_with_grad). The mean over ranks equals nt_xent on
    the concatenated global batch, and with DDP's gradient averaging so do the gradients."""
    n, world, rank = z1.shape[0], cdist.get_world_size(), cdist.get_rank()
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    cand = torch.cat([cdist.gather_with_grad(z1), cdist.gather_with_grad(z2)])  # (2 W N, D)
    logits = torch.cat([z1, z2]) @ cand.t() / temperature                       # (2N, 2WN)
    own = torch.arange(n, device=z1.device) + rank * n                          # z1 rows in cand
    self_idx = torch.cat([own, own + world * n])
    pos_idx = torch.cat([own + world * n, own])
    logits = logits.scatter(1, self_idx[:, None], float("-inf"))
    loss = F.cross_entropy(logits, pos_idx)
    return (loss, logits, pos_idx) if return_logits else loss


def projection_head(in_dim, hidden, dim):
    """512 -> 512 (no bias) -> BN -> ReLU -> 128 (no bias) -> BN (the NCT config's neck)."""
    head = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, dim, bias=False),
                         nn.BatchNorm1d(dim))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return head


class SimCLR(nn.Module):
    def __init__(self, arch="resnet18", hidden=512, dim=128, T=0.1, init="openselfsup"):
        super().__init__()
        self.backbone = resnet(arch, init)
        self.head = projection_head(self.backbone.feature_dim, hidden, dim)
        self.T = T

    def forward(self, x1, x2):
        # one forward for both views: BN statistics over 2N images, as OpenSelfSup's SimCLR
        z1, z2 = self.head(self.backbone(torch.cat([x1, x2]))).float().chunk(2)
        loss, logits, pos = distributed_nt_xent(z1, z2, self.T, return_logits=True)
        acc = (logits.argmax(1) == pos).float().mean()
        return loss, {"loss": loss.detach(), "acc": 100 * acc}


# ----------------------------------------------------------------------------- training
def train_one_epoch(model, optimizer, trainer, run, args):
    for step, batch in trainer.steps(trainer.epoch):
        lr = ctrain.set_lr(optimizer, ctrain.cosine_lr(
            args.scaled_lr, trainer.global_step(), trainer.steps_per_epoch, args.epochs,
            warmup_epochs=args.warmup_epochs))
        x1, x2 = (run.images(v) for v in batch["views"])
        with run.autocast():
            loss, parts = model(x1, x2)
        trainer.backward_step(optimizer, loss, parts)
        trainer.update(parts, lr)


def get_args(argv=None):
    p = cli.parser(__doc__)
    ctrain.add_common_args(p, batch_size=1024, lr=0.6, epochs=200, weight_decay=1e-6)
    g = p.add_argument_group("simclr")
    g.add_argument("--temperature", type=cli.positive_float, default=0.1, help="NT-Xent temperature T")
    g.add_argument("--hidden-dim", type=cli.positive_int, default=512, help="projection head hidden width")
    g.add_argument("--dim", type=cli.positive_int, default=128, help="projection width")
    g.add_argument("--warmup-epochs", type=cli.nonneg_int, default=10, help="linear lr warm-up epochs")
    g.add_argument("--aug", choices=["simclr", "histo"], default="simclr",
                   help="histo: Ciga et al.'s best histopathology setting (crops down to 1%%, "
                        "rotations, both flips, medium jitter)")
    g.add_argument("--blur-kernel", type=cli.odd_kernel, default=None, help="as moco.py")
    return p.parse_args(argv)


def main():
    args = get_args()
    run = ctrain.Run(args, "simclr")
    view = augmentation(args.aug, args.img_size, args.blur_kernel)
    dataset = cdata.MultiViewDataset(cdata.build_dataset(args), [view, view], seed=args.seed)
    loader, sampler = cdata.pretrain_loader(dataset, args.batch_size, args.workers, args.seed,
                                            run.device)
    model = run.sync_bn(SimCLR(args.arch, args.hidden_dim, args.dim, args.temperature, args.init)).to(run.device)
    optimizer = ctrain.LARS(ctrain.lars_param_groups(model, args.weight_decay), lr=args.scaled_lr)
    chance = math.log(2 * run.global_batch - 1)
    trainer = ctrain.Trainer(run, model, optimizer, loader, sampler, model.backbone,
                             extra_log={"chance_loss": chance})
    run.print(f"SimCLR ({args.aug} augmentation) {args.arch}: {len(dataset)} images, global batch "
              f"{run.global_batch} = {run.world} x {args.batch_size}, LARS lr {args.scaled_lr:.4g}, "
              f"wd {args.weight_decay}, T {args.temperature}, chance loss log(2N-1) = "
              f"{chance:.3f}, {trainer.steps_per_epoch} steps/epoch, output {run.out}")
    ddp_model = run.wrap(model)
    for _ in trainer.epochs():
        train_one_epoch(ddp_model, optimizer, trainer, run, args)


if __name__ == "__main__":
    ctrain.main_guard(main)
