"""MCL: multi-level contrastive learning, montages of down-sampled views retrieve their image.

Guo et al., "Multi-Level Contrastive Learning for Dense Prediction Task" (arXiv 2304.02010 and
its appendix). Per branch, level 0 holds the B views themselves and level i the
B / 4^i montages of views down-sampled by 2^i, tiled 2^i x 2^i; one forward of ResNet + FPN sees
them all. Each level-i sub-image is exactly one w x w window (w = img/32: 7 at 224 px) of FPN map
P_{5-i}; windows go one by one through a shared 4-conv head, a projector and the level's
predictor, and must retrieve the EMA target's level-0 embedding of their own image, from the other
branch, among the whole global batch. Defaults: the appendix (S = 3 levels, weights 1/2^(i+1),
heads 2048 -> 256 with a final BN), on the BYOL NCT scale: batch 256, LARS lr 1.0 x B/256, wd
1e-5, 10 warm-up epochs, cosine per step, EMA 0.99 -> 1, 200 epochs (docs/methods.md 7, D5, D6).
`--levels 4` is the released 4-level variant (weights 1/2, 1/4, 1/8, 1/8; level 3 = B/32 montages
of 64 cells, every image twice). Head and projector normalise each level on its own (BN over
that level's windows), as the released neck. Unlike the released code, the FPN outputs run only
where a level reads them (their BN statistics are then per level, not over every map of every
image), and `--target-views level0` keeps the montages out of the target (the appendix's cost).

    torchrun --nproc_per_node=8 mcl.py --data nct --data-root /data/NCT-CRC-HE-100K
    python mcl.py --data demo --epochs 2 --batch-size 32 --img-size 64          # CPU

A healthy log: `loss` starts near `chance_loss` = 2 branches x 2T x sum(w) x log(global batch)
(19.4 at batch 256, S = 3) and falls; `acc_l0` (level-0 retrieval top-1, %) rises first, the
montage levels `acc_l1`, `acc_l2` follow, each below the one before; `m` climbs 0.99 -> 1; `std`
(of the L2-normalised level-0 projections) stays near 1/sqrt(256) = 0.0625 (-> 0 is collapse).
montages.png (written at the run's first step) shows that step's montages of branch q, one row per
level, each captioned with its level and the images its cells hold.
"""
import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import FeaturePyramidNetwork

from byol import BYOL, augmentation, mlp
from common import cli
from common import data as cdata
from common import dist as cdist
from common import pictures
from common import train as ctrain
from common.models import resnet, resnet_maps


# ----------------------------------------------------------------------------- views
def augmentations(size, levels):
    """2 x S views per image (docs/methods.md 7.1): branch q's S draws with BYOL's view-1 settings
    (blur always, no solarise), branch k's S with view-2 settings (blur 0.1, solarise 0.2); MCL
    crops 20-100% of the area, bilinear, where BYOL crops 8-100%, bicubic."""
    views = []
    for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2)):
        v = augmentation(size, blur_p, solarize_p)
        v.scale, v.interpolation = (0.2, 1.0), Image.BILINEAR
        views += [v] * levels  # the same pipeline, drawn anew for every view
    return views


# ----------------------------------------------------------------------------- montages
def montage(x, level, mode="nearest"):
    """x (B, C, H, W) -> (B // 4**level, C, H, W): consecutive groups of 4**level images, each
    down-sampled by r = 2**level, tiled row-major in an r x r grid (cell k of montage m holds
    image m * r*r + k). The caller shuffles. "nearest" = the released F.interpolate default
    (pitfall P14), "area" = the mean of each r x r block."""
    r = 2 ** level
    B, C, H, W = x.shape
    if r == 1:
        return x
    small = F.interpolate(x, size=(H // r, W // r), mode=mode)       # (B, C, H/r, W/r)
    return (small.reshape(B // (r * r), r, r, C, H // r, W // r)       # (n, row, col, C, h, w)
            .permute(0, 3, 1, 4, 2, 5).reshape(B // (r * r), C, H, W))


def windows(p, r):
    """FPN map p (n, C, r*w, r*w) of n montages -> (n*r*r, C, w, w): one independent sample per
    sub-image, in montage()'s row-major cell order."""
    n, C, H, W = p.shape
    return (p.reshape(n, C, r, H // r, r, W // r).permute(0, 2, 4, 1, 3, 5)
            .reshape(n * r * r, C, H // r, W // r))


def slot_counts(B, levels):
    """Sub-images per level: every image once (B slots, B/4^i montages), but the released 4-level
    variant fills level 3 with B/32 montages of 64 cells: 2B slots, every image twice."""
    return [2 * B if levels == 4 and i == 3 else B for i in range(levels)]


def level_weights(levels):
    """The appendix's 1/2^(i+1); the released 4-level config: [1/2, 1/4, 1/8, 1/8] (sum 1)."""
    return [1 / 2, 1 / 4, 1 / 8, 1 / 8] if levels == 4 else [1 / 2 ** (i + 1) for i in range(levels)]


def assemble(views, levels, mode="nearest"):
    """One branch's batch. views: `levels` tensors (B, 3, H, W), level i's own augmentation of
    every image -> (x (sum of montage counts, 3, H, W), [labels (slots_i,)] local source index of
    every sub-image). Slots are filled from randperm(slots) mod B, drawn from the global RNG that
    the Trainer seeds per (seed, epoch, step, rank), so a resumed run draws the same montages."""
    B = views[0].shape[0]
    xs, labels = [views[0]], [torch.arange(B, device=views[0].device)]
    for i, n in enumerate(slot_counts(B, levels)[1:], 1):
        src = (torch.randperm(n) % B).to(views[i].device)
        xs.append(montage(views[i][src], i, mode))
        labels.append(src)
    return torch.cat(xs), labels


@ctrain.fp32
def retrieval_loss(e, z, labels, T):
    """e (n, D) online predictions of n sub-images, z (N, D) L2-normalised targets of the other
    branch's level-0 images from every process, labels (n,) global index of each sub-image's
    image -> (2T x mean cross-entropy of e^.z / T (the released scaling), top-1 in %)."""
    logits = F.normalize(e, dim=1) @ z.T / T                                  # (n, N)
    return 2 * T * F.cross_entropy(logits, labels), 100 * (logits.argmax(1) == labels).float().mean()


# ----------------------------------------------------------------------------- the network
def fpn_levels(fpn, feats, counts):
    """Only the FPN outputs the levels read: level i's counts[i] images (consecutive rows of the
    batch) get P_{5-i}. feats: the backbone maps fpn was built on, C5 last. The laterals run on
    the whole batch, the top-down sum and output conv of P_{5-i} on level i's rows only: equal to
    torchvision's fpn(feats) on those rows (BN statistics then per level; the released code runs
    every output on every image)."""
    inner = [blk(f) for blk, f in zip(fpn.inner_blocks, feats)]          # laterals, 256 channels
    out, start = [], 0
    for i, n in enumerate(counts):
        rows = slice(start, start + n)
        start += n
        top = inner[-1][rows]
        for k in range(len(inner) - 2, len(inner) - 2 - i, -1):          # down to stage 5 - i
            top = inner[k][rows] + F.interpolate(top, size=inner[k].shape[-2:], mode="nearest")
        out.append(fpn.layer_blocks[len(inner) - 1 - i](top))            # (n, 256, r*w, r*w)
    return out


def conv_head(c, n=4):
    """The shared detection-style head: n x (3x3 conv without bias, BN, ReLU); zero padding at
    each window's border, as every window is its own sample."""
    layers = []
    for _ in range(n):
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        layers += [conv, nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """ResNet body -> FPN (torchvision ops, BN, over the stages the levels read) -> 4-conv head
    per window -> average pool -> projector 256-hidden-dim with a final BN without affine."""

    def __init__(self, arch, levels, hidden_dim, dim, fpn_dim=256, init="openselfsup"):
        super().__init__()
        self.backbone, self.levels = resnet(arch, init), levels
        c = self.backbone.feature_dim
        self.fpn = FeaturePyramidNetwork([c // 8, c // 4, c // 2, c][4 - levels:], fpn_dim,
                                         norm_layer=nn.BatchNorm2d)
        self.head = conv_head(fpn_dim)
        self.projector = nn.Sequential(*mlp(fpn_dim, hidden_dim, dim, "kaiming"),
                                       nn.BatchNorm1d(dim, affine=False))

    def forward(self, x, counts, keep=None):
        """x: a branch's batch, counts: montages per level -> [(slots_i, dim)] embeddings of the
        first `keep` levels (all by default)."""
        keep = keep or len(counts)
        feats = resnet_maps(self.backbone, x)[4 - self.levels:]         # C_{6-S} .. C5
        return self.embed(fpn_levels(self.fpn, feats, counts[:keep]))

    def embed(self, maps):
        """[P_{5-i} of level i's montages (n_i, 256, r*w, r*w)] -> [(n_i * r*r, dim)]: every
        window its own sample through the head and the projector, one level at a time, so BN
        normalises each level over its own windows (the released neck, forward_list)."""
        return [self.projector(self.head(windows(p, 2 ** i)).mean((2, 3)))
                for i, p in enumerate(maps)]


class MCL(nn.Module):
    def __init__(self, arch="resnet18", levels=3, hidden_dim=2048, dim=256, T=1.0,
                 target_montages=True, init="openselfsup"):
        super().__init__()
        self.levels, self.T, self.weights = levels, T, level_weights(levels)
        self.target_montages = target_montages
        self.online = Encoder(arch, levels, hidden_dim, dim, init=init)
        self.predictors = nn.ModuleList(mlp(dim, hidden_dim, dim, "normal") for _ in range(levels))
        self.target = copy.deepcopy(self.online)  # backbone + FPN + head + projector
        for p in self.target.parameters():
            p.requires_grad = False

    momentum_update = BYOL.momentum_update  # the same EMA of parameters (not buffers) as BYOL

    def forward(self, x_q, labels_q, x_k, labels_k):
        """x_q, x_k: assemble()d batches of the two branches, labels: their local source ids."""
        B = labels_q[0].shape[0]
        counts = [n // 4 ** i for i, n in enumerate(slot_counts(B, self.levels))]
        e_q, e_k = self.online(x_q, counts), self.online(x_k, counts)   # one forward per branch
        with torch.no_grad():  # released: the target sees the montages too (BN statistics)
            rows = slice(None) if self.target_montages else slice(0, B)
            z_q, z_k = (cdist.concat_all_gather(F.normalize(
                self.target(x[rows], counts, keep=1)[0].float(), dim=1)) for x in (x_q, x_k))
        offset = cdist.get_rank() * B                                   # rank order of the gather
        loss, parts = 0.0, {}
        for i, w in enumerate(self.weights):
            l_q, a_q = retrieval_loss(self.predictors[i](e_q[i]), z_k, labels_q[i] + offset, self.T)
            l_k, a_k = retrieval_loss(self.predictors[i](e_k[i]), z_q, labels_k[i] + offset, self.T)
            loss = loss + w * (l_q + l_k)
            parts[f"loss_l{i}"], parts[f"acc_l{i}"] = (l_q + l_k).detach(), (a_q + a_k) / 2
        with torch.no_grad():  # collapse monitor, as byol.py
            std = F.normalize(e_q[0].float(), dim=1).std(0).mean()
        return loss, {"loss": loss.detach(), **parts, "std": std}


def chance_loss(levels, T, global_batch):
    """Loss at init (cosines ~0): per level and branch 2T log N."""
    return 2 * 2 * T * sum(level_weights(levels)) * float(np.log(global_batch))


# ----------------------------------------------------------------------------- seeing montages
@torch.no_grad()
def montage_panels(x, counts, labels, per_level=4):
    """A branch's batch -> rows of (uint8 picture, caption), one row per level: its first
    montages, de-normalised, cell borders in white, captioned with the images they hold."""
    rows, start = [], 0
    for i, n in enumerate(counts):
        r, H = 2 ** i, x.shape[-1]
        row = []
        for m in range(min(n, per_level)):
            img = pictures.to_rgb(x[start + m])
            for k in range(1, r):
                img[k * H // r, :] = img[:, k * H // r] = 255
            src = labels[i][m * r * r:(m + 1) * r * r].tolist()
            what = f"image {src[0]}" if r == 1 else f"images {', '.join(map(str, src))}"
            row.append((img, f"level {i} (P{5 - i}, 1/{r} size), "
                             f"{'view' if r == 1 else 'montage'} {m}: {what}"))
        rows.append(row)
        start += n
    return rows


def save_montages(x, counts, labels, path, mode, per_level=4):
    """PNG of a branch's batch at the first step: one row per level (what montage_panels draws),
    titled, with what each row is."""
    H = x.shape[-1]
    notes = [f"Row i = level i, read from FPN map P(5-i): each panel is one montage of 2^i x 2^i "
             f"views of the batch, each down-sampled by 2^i ({mode}) from {H} to {H} / 2^i px "
             "and filled from a seeded permutation (white lines: the cells, each exactly one "
             "window of the FPN map; 'images' lists each cell's source image, row-major). "
             "Level 0 is the views themselves. Every sub-image retrieves its own image's level-0 "
             "embedding of the other branch. Branch q: BYOL's view-1 settings (blur always, no "
             "solarise); branch k (not drawn) uses view-2's.",
             f"Per process: {' + '.join(f'{n} at level {i}' for i, n in enumerate(counts))} "
             "montages."]
    rows = montage_panels(x, counts, labels, per_level)
    pictures.sheet(rows, "MCL montages of branch q at the first step", notes,
                   cell=max(192, H), caption_lines=3).save(path)
    return path


# ----------------------------------------------------------------------------- training
def train_one_epoch(model, optimizer, trainer, run, args):
    total_steps = args.epochs * trainer.steps_per_epoch
    S = args.levels
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if trainer.epoch < args.warmup_epochs:
        run.print(f"warm-up: epoch {trainer.epoch + 1} of {args.warmup_epochs} (lr rising "
                  f"linearly to {args.scaled_lr:.4g}; the retrieval stays near chance until "
                  "the lr is up)")
    for step, batch in trainer.steps(trainer.epoch):
        it = trainer.global_step()
        lr = ctrain.set_lr(optimizer, ctrain.cosine_lr(
            args.scaled_lr, it, trainer.steps_per_epoch, args.epochs, args.warmup_epochs,
            per_epoch=False, min_lr=args.min_lr))                           # per step, as released
        views = [run.images(v) for v in batch["views"]]                    # 2S x (B, 3, H, W)
        x_q, labels_q = assemble(views[:S], S, args.montage_resize)       # view-1 settings
        x_k, labels_k = assemble(views[S:], S, args.montage_resize)       # view-2 settings
        if run.main and it == 0:
            B = views[0].shape[0]
            save_montages(x_q, [n // 4 ** i for i, n in enumerate(slot_counts(B, S))],
                          labels_q, run.out / "montages.png", args.montage_resize)
        with run.autocast():
            loss, parts = model(x_q, labels_q, x_k, labels_k)
        trainer.check(loss, parts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:  # the released config's grad_clip (rarely reached)
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        optimizer.step()
        # EMA after the optimiser step, as BYOL (P17); m is a function of the global step
        m = ctrain.cosine_momentum(args.base_momentum, it, total_steps)
        ctrain.unwrap(model).momentum_update(m)
        trainer.update({**parts, "m": m}, lr)


def check_mcl_args(args):
    """Montages must tile the per-process batch and the FPN grid exactly (one clear line)."""
    q = 32 if args.levels == 4 else 4 ** (args.levels - 1)
    B = args.batch_size
    if B % q:
        near = " or ".join(str(v) for v in (B // q * q, (B // q + 1) * q) if v > 0)
        raise cdata.DataError(f"--batch-size {B} (per process): --levels {args.levels} needs a "
                              f"multiple of {q} to fill its smallest montages; nearest valid: {near}")
    if args.img_size % 32:
        raise cdata.DataError(f"--img-size {args.img_size}: use a multiple of 32, so every "
                              "sub-image is exactly one window of its FPN map")


def get_args(argv=None):
    p = cli.parser(__doc__)
    ctrain.add_common_args(p, batch_size=256, lr=1.0, epochs=200, weight_decay=1e-5)
    g = p.add_argument_group("mcl")
    g.add_argument("--levels", type=int, choices=[1, 2, 3, 4], default=3,
                   help="montage levels S (the appendix: 3, cost 1.3125x); 4 = the released "
                        "variant with weights 1/2, 1/4, 1/8, 1/8 and B/32 level-3 montages")
    g.add_argument("--montage-resize", choices=["nearest", "area"], default="nearest",
                   help="down-sampling of the montage cells: nearest (default) = what the "
                        "released code's F.interpolate does (aliases, pitfall P14), area = block "
                        "means")
    g.add_argument("--temperature", type=cli.positive_float, default=1.0,
                   help="T of the retrieval cross-entropy, which is scaled by 2T as released")
    g.add_argument("--base-momentum", type=cli.unit_float, default=0.99,
                   help="EMA m at step 0, rising to 1 on a cosine of the global step")
    g.add_argument("--warmup-epochs", type=cli.nonneg_int, default=10,
                   help="linear lr warm-up (per step, from 1e-4 x lr); released: 3127 steps "
                        "~ 10 ImageNet epochs")
    g.add_argument("--min-lr", type=cli.nonneg_float, default=1e-4,
                   help="floor of the per-step cosine, as the released config")
    g.add_argument("--clip-grad", type=cli.nonneg_float, default=500.0,
                   help="max global gradient norm, as the released config; 0 = off")
    g.add_argument("--target-views", choices=["all", "level0"], default="all",
                   help="what the EMA target forwards: all = the montages too, as released (they "
                        "shape its BN statistics); level0 = only the B views it embeds, the "
                        "appendix's accounting of 1.3125x for the online network alone")
    g.add_argument("--hidden-dim", type=cli.positive_int, default=2048,
                   help="projector and predictor hidden width (the appendix; D5)")
    g.add_argument("--dim", type=cli.positive_int, default=256, help="embedding width")
    p.epilog = ("CPU example (a few minutes; its 2 epochs lie inside the 10-epoch warm-up,\n"
                "so the retrieval stays near chance):\n  python mcl.py --data demo --epochs 2 "
                "--batch-size 32 --img-size 64 --workers 2")
    p.set_defaults(resume_keys=("levels", "montage_resize", "hidden_dim", "dim", "temperature",
                                "target_views"))
    return p.parse_args(argv)


def main():
    args = get_args()
    run = ctrain.Run(args, "mcl")
    check_mcl_args(args)
    S = args.levels
    dataset = cdata.MultiViewDataset(cdata.build_dataset(args), augmentations(args.img_size, S),
                                     seed=args.seed)
    loader, sampler = cdata.pretrain_loader(dataset, args.batch_size, args.workers, args.seed,
                                            run.device)

    model = run.sync_bn(MCL(args.arch, S, args.hidden_dim, args.dim, args.temperature,
                            target_montages=args.target_views == "all", init=args.init))
    model = model.to(run.device)
    # LARS; 1-D parameters (biases, every BN) get no decay and no trust ratio (P11)
    optimizer = ctrain.LARS(ctrain.lars_param_groups(model, args.weight_decay), lr=args.scaled_lr,
                            momentum=0.9)
    chance = chance_loss(S, args.temperature, run.global_batch)
    trainer = ctrain.Trainer(run, model, optimizer, loader, sampler, model.online.backbone,
                             extra_log={"chance_loss": chance})
    B = args.batch_size
    montages = [n // 4 ** i for i, n in enumerate(slot_counts(B, S))]
    run.print(f"MCL {args.arch}: {len(dataset)} images, global batch {run.global_batch} = "
              f"{run.world} x {B}, {S} levels: {' + '.join(map(str, montages))} = {sum(montages)} "
              f"images per branch and process ({sum(montages) / B:.4g}x), weights "
              f"{[round(w, 4) for w in level_weights(S)]}, {args.montage_resize} down-sampling, "
              f"LARS lr {args.scaled_lr:.4g} (= {args.lr} x {run.global_batch}/{args.paper_batch}),"
              f" wd {args.weight_decay}, warm-up {args.warmup_epochs} epochs, EMA m "
              f"{args.base_momentum} -> 1 over {args.epochs * trainer.steps_per_epoch} steps, "
              f"T {args.temperature}, loss at init ~{chance:.3g}, {trainer.steps_per_epoch} "
              f"steps/epoch, output {run.out}")
    ddp_model = run.wrap(model)
    for _ in trainer.epochs():
        train_one_epoch(ddp_model, optimizer, trainer, run, args)


if __name__ == "__main__":
    ctrain.main_guard(main)
