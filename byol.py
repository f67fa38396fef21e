"""BYOL: bootstrap your own latent, a predictor regressing an EMA target, no negatives.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning" (NeurIPS
2020). Recipe: the ConCL paper's NCT-CRC-HE-100K setting (ResNet-18, projector 512-512-256,
predictor 256-512-256, batch 1024, LARS lr 0.2, wd 1.5e-6, 2 warm-up epochs, per-epoch cosine,
EMA 0.996 -> 1, 200 epochs; docs/methods.md section 3).

    torchrun --nproc_per_node=8 byol.py --data nct --data-root /data/NCT-CRC-HE-100K
    python byol.py --data demo --epochs 2 --batch-size 32 --img-size 64   # CPU

A healthy log: `loss` (the sum of two 2 - 2 cos terms, range 0..8) starts near 4, as random
predictions are orthogonal to their targets, and falls steadily; `m` climbs from 0.996 to 1.
`std` (per-dimension std over the batch of the L2-normalised online projections) stays near
1/sqrt(256) = 0.0625. Collapse shows as `std` -> 0 while `loss` -> 0 within an epoch or two.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common import cli
from common import data as cdata
from common import train as ctrain
from common.augment import Photometric
from common.models import convert_split_bn, resnet


# ----------------------------------------------------------------------------- augmentations
def augmentation(size, blur_p, solarize_p, blur_kernel=None):
    """docs/methods.md 3.1, the NCT config's pipeline: bicubic crop of 8-100% of the area, flip,
    jitter (0.4, 0.4, 0.2, 0.1) in random order (torchvision, as the official code), grey;
    blur and solarise with the view's p (in the loader, or on the device: common.augment)."""
    photometric = Photometric(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grey_p=0.2,
                              blur_p=blur_p, blur_sigma=(0.1, 2.0), blur_kernel=blur_kernel,
                              solarize_p=solarize_p, solarize_threshold=128)
    return cdata.View(size, scale=(0.08, 1.0), flip_p=0.5, photometric=photometric,
                      interpolation=Image.BICUBIC)


def augmentations(size, blur_kernel=None):
    """The asymmetric pair: view 1 always blurred, never solarised; view 2 rarely blurred,
    solarised one time in five."""
    return (augmentation(size, blur_p=1.0, solarize_p=0.0, blur_kernel=blur_kernel),
            augmentation(size, blur_p=0.1, solarize_p=0.2, blur_kernel=blur_kernel))


# ----------------------------------------------------------------------------- the loss
def regression_loss(p, z):
    """p: (N, D) online predictions, z: (N, D) target projections (any scale).
    Mean over the batch of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z); in [0, 4]."""
    p, z = F.normalize(p.float(), dim=1), F.normalize(z.float(), dim=1)  # fp32 under --amp
    return (2 - 2 * (p * z).sum(1)).mean()


# ----------------------------------------------------------------------------- the model
def mlp(in_dim, hidden, out_dim, init):
    """Linear-BN-ReLU-Linear (OpenSelfSup's NonLinearNeckV2). init: "kaiming" (projector) or
    "normal" (std 0.01: the predictor), biases 0, as OpenSelfSup initialises the NCT recipe."""
    net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                        nn.Linear(hidden, out_dim))
    for m in net.modules():
        if isinstance(m, nn.Linear):
            if init == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    return net


class BYOL(nn.Module):
    def __init__(self, arch="resnet18", hidden_dim=512, dim=256, init="openselfsup",
                 head_bn_splits=1):
        super().__init__()
        backbone = resnet(arch, init)
        # The heads' BN1d is per GPU in the recipe (128 images; only the backbone has SyncBN):
        # on fewer processes it normalises in groups of that size (common.models split BN).
        self.online = nn.Sequential(backbone, convert_split_bn(
            mlp(backbone.feature_dim, hidden_dim, dim, "kaiming"), head_bn_splits))
        self.predictor = convert_split_bn(mlp(dim, hidden_dim, dim, "normal"), head_bn_splits)
        self.target = copy.deepcopy(self.online)  # backbone + projector, no predictor
        for p in self.target.parameters():
            p.requires_grad = False

    @torch.no_grad()
    def momentum_update(self, m):
        """target <- m * target + (1 - m) * online, parameters only: BN buffers are not averaged
        (docs/methods.md 0.4); the target's BN normalises with batch statistics anyway."""
        t, o = list(self.target.parameters()), list(self.online.parameters())
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, o, alpha=1 - m)

    def forward(self, x1, x2):
        # One forward per view, online and target, as the official code: BN statistics per view.
        y1, y2 = self.online(x1), self.online(x2)           # (N, dim) projections
        p1, p2 = self.predictor(y1), self.predictor(y2)     # (N, dim) predictions
        with torch.no_grad():
            z1, z2 = self.target(x1), self.target(x2)       # (N, dim) targets
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)  # symmetric sum, as the paper
        with torch.no_grad():  # collapse monitor (SimSiam sec. 4.1): ~1/sqrt(dim) when healthy
            std = F.normalize(y1.float(), dim=1).std(0).mean()
        return loss, {"loss": loss.detach(), "std": std}


# ----------------------------------------------------------------------------- training
def train_one_epoch(model, optimizer, trainer, run, args):
    total_steps = args.epochs * trainer.steps_per_epoch
    for step, batch in trainer.steps(trainer.epoch):
        it = trainer.global_step()
        lr = ctrain.set_lr(optimizer, ctrain.cosine_lr(args.scaled_lr, it, trainer.steps_per_epoch,
                                                       args.epochs, args.warmup_epochs))
        x1, x2 = (run.images(v) for v in batch["views"])
        with run.autocast():
            loss, parts = model(x1, x2)
        trainer.backward_step(optimizer, loss, parts)
        # EMA after the optimiser step, as OpenSelfSup's BYOLHook.after_train_iter (P17); m is a
        # function of the global step, so a resumed run needs no momentum state.
        m = ctrain.cosine_momentum(args.base_momentum, it, total_steps)
        ctrain.unwrap(model).momentum_update(m)
        trainer.update({**parts, "m": m}, lr)


def get_args(argv=None):
    p = cli.parser(__doc__)
    ctrain.add_common_args(p, batch_size=1024, lr=0.2, epochs=200, weight_decay=1.5e-6)
    g = p.add_argument_group("byol")
    g.add_argument("--head-bn-group", type=cli.nonneg_int, default=128,
                   help="images per BN group in the projector and predictor: the recipe's per-GPU "
                        "batch (1024 / 8), whatever the number of processes; 0 = the whole "
                        "per-process batch")
    g.add_argument("--base-momentum", type=cli.unit_float, default=0.996,
                   help="EMA m at step 0, rising to 1 on a cosine of the global step")
    g.add_argument("--warmup-epochs", type=cli.nonneg_int, default=2,
                   help="linear lr warm-up (per step, from 1e-4 x lr); official BYOL: 10")
    g.add_argument("--hidden-dim", type=cli.positive_int, default=512,
                   help="projector and predictor hidden width (ConCL's R18 heads; official "
                        "R50: 4096)")
    g.add_argument("--dim", type=cli.positive_int, default=256, help="projection and prediction width")
    g.add_argument("--blur-kernel", type=cli.odd_kernel, default=None,
                   help="default PIL GaussianBlur(radius=sigma) as the NCT (OpenSelfSup) config; "
                        "23 = torchvision's exact kernel as official BYOL (docs/methods.md 0.4), "
                        "5x the CPU cost")
    p.set_defaults(resume_keys=("hidden_dim", "dim"))
    return p.parse_args(argv)


def main():
    args = get_args()
    run = ctrain.Run(args, "byol")

    view1, view2 = augmentations(args.img_size, args.blur_kernel)
    dataset = cdata.MultiViewDataset(cdata.build_dataset(args), [view1, view2], seed=args.seed)
    loader, sampler = cdata.pretrain_loader(dataset, args.batch_size, args.workers, args.seed,
                                            run.device)

    group = args.head_bn_group or args.batch_size
    if args.batch_size % group and group < args.batch_size:
        raise cdata.DataError(f"--batch-size {args.batch_size} is not a multiple of "
                              f"--head-bn-group {group}")
    args.head_bn_splits = max(1, args.batch_size // group)
    model = BYOL(args.arch, args.hidden_dim, args.dim, args.init, args.head_bn_splits)
    for net in (model.online, model.target):  # NCT recipe: SyncBN backbones, per-GPU BN1d heads
        net[0] = run.sync_bn(net[0])
    model = model.to(run.device)
    # LARS; 1-D parameters (biases, every BN incl. the heads') get no decay and no trust ratio
    # (P11); the target (requires_grad False) is not in the optimiser.
    optimizer = ctrain.LARS(ctrain.lars_param_groups(model, args.weight_decay), lr=args.scaled_lr,
                            momentum=0.9)
    trainer = ctrain.Trainer(run, model, optimizer, loader, sampler, model.online[0])
    run.print(f"BYOL {args.arch}: {len(dataset)} images, global batch {run.global_batch} = "
              f"{run.world} x {args.batch_size} (head BN groups of {args.batch_size // args.head_bn_splits}), LARS lr {args.scaled_lr:.4g} (= {args.lr} x "
              f"{run.global_batch}/{args.paper_batch}), wd {args.weight_decay}, warm-up "
              f"{args.warmup_epochs} epochs, EMA m {args.base_momentum} -> 1 over "
              f"{args.epochs * trainer.steps_per_epoch} steps, loss at init ~4 (cos ~0), "
              f"{trainer.steps_per_epoch} steps/epoch, output {run.out}")
    ddp_model = run.wrap(model)
    for _ in trainer.epochs():
        train_one_epoch(ddp_model, optimizer, trainer, run, args)


if __name__ == "__main__":
    ctrain.main_guard(main)
