"""PixCon: pixel-level contrast on MoCo-v2+, with three ways to pick a pixel's positive.

Pang, Nakashima, Otani, Nagahara, "Revisiting Pixel-Level Contrastive Pre-Training on Scene
Images" (WACV 2024; "PixCon: Pixel-Level Contrastive Learning Revisited", Electronics 2025).
DenseCL's global + dense InfoNCE with two queues, plus BYOL's pieces (predictors, EMA target
0.99 -> 1, symmetric loss, BYOL augmentations) on two *overlapping* crops. `--match` picks the
positive of a query pixel: `sim` the most similar key pixel (DenseCL's rule), `coord` the key
pixel at the same place of the tile, `sr` (default, the released code) `sim` with semantic
reweighting. Recipe (docs/methods.md section 8, NCT as the other baselines): ResNet-18, neck
512-512-128 with BN, batch 256, SGD lr 0.2 x B/256, wd 1e-4, 4 warm-up epochs, per-epoch cosine,
200 epochs, queues 2 x 16384, T 0.2, lambda 0.5.

    torchrun --nproc_per_node=8 pixcon.py --data nct --data-root /data/NCT-CRC-HE-100K --match sr
    python pixcon.py --data demo --epochs 2 --batch-size 32 --img-size 64 --queue-size 512  # CPU

A healthy log: `loss` = (1 - lambda) `loss_global` + lambda `loss_dense`, each part the sum of
both directions, so at chance it is 2 log(K+1) (`chance_loss`); like DenseCL it may rise while
the queues fill (P7), then falls. `acc`/`acc_dense`: the positive ranks first. `dense_weight`:
the mean weight of a query pixel (sim: 1; coord: the share of cells inside the other crop; sr:
falls below 1 as out-of-overlap matches get weighed by their similarity). `m` climbs 0.99 -> 1.
"""
import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import byol
import densecl
from common import cli
from common import data as cdata
from common.draws import centre_box
from common import dist as cdist
from common import pictures
from common import train as ctrain
from common.models import resnet, resnet_maps
from moco import moco_logits

OVERLAP_TRIES, MIN_OVERLAP = 10, 0.01  # the released sampler's constants (docs/methods.md 8.1)


# ----------------------------------------------------------------------------- overlapping views
def draw_crop(width, height, scale, ratio):
    """One attempt of RandomResizedCrop, torchvision's draws in its order -> (box (x0, y0, x1,
    y1) or None when the drawn size does not fit the image, the drawn target area)."""
    target = width * height * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if not (0 < w <= width and 0 < h <= height):
        return None, target
    top, left = (int(torch.randint(0, n + 1, size=(1,))) for n in (height - h, width - w))
    return (left, top, left + w, top + h), target


def overlapping_crops(width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Two RandomResizedCrop boxes (x0, y0, x1, y1) in pixels of a width x height image, as the
    released get_params_conditioned: the second is drawn OVERLAP_TRIES times (a size that does
    not fit counts as a try) until its intersection with the first covers >= MIN_OVERLAP of its
    drawn target area; if no draw does, both are the same centre crop."""
    top, left, h, w = cdata.crop_box(height, width, scale, ratio)  # get_params' numbers
    b1 = (left, top, left + w, top + h)
    for _ in range(OVERLAP_TRIES):
        b2, target = draw_crop(width, height, scale, ratio)
        if b2 is not None:  # the intersection's width and height
            iw, ih = (min(b1[k + 2], b2[k + 2]) - max(b1[k], b2[k]) for k in (0, 1))
            if iw > 0 and ih > 0 and iw * ih >= MIN_OVERLAP * target:
                return b1, b2
    top, left, h, w = centre_box(height, width, ratio)  # RandomResizedCrop's own fallback
    c = (left, top, left + w, top + h)
    return c, c


class OverlapViews(cdata.MultiViewDataset):
    """Two views of one tile on overlapping crops (bilinear, --img-size), each flipped with
    p 0.5, then its BYOL photometric ops. Sample keys as MultiViewDataset: "boxes" in image
    pixels and "flips", from which the step derives the overlap boxes and masks. --device-crop:
    the loader draws the numbers alone (draw_params) and the device crops `crop_views`."""

    def __init__(self, base, size, photometric, seed=0):
        super().__init__(base, [], seed)
        self.size, self.photometrics = size, photometric  # --device-aug reads `photometrics`
        self.crop_views = [(size, Image.BILINEAR)] * 2     # and --device-crop `crop_views`

    def draw_params(self, tile, i):
        """Sample i's random numbers for a (H, W, ...) tile (its shape is all this reads), seeded
        by (seed, epoch, i): both boxes, then each view's flip and photometric parameters."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cdata.sample_seed(self.seed, self.epoch, i))
            boxes = overlapping_crops(tile.shape[1], tile.shape[0])
            draws = [(bool(torch.rand(1) < 0.5), ph.sample()) for ph in self.photometrics]
        return {"boxes": [torch.tensor(b, dtype=torch.float32) for b in boxes],
                "flips": [f for f, _ in draws], "photo": [p for _, p in draws]}

    def augment(self, img, i):
        s = self.draw_params(np.empty((img.height, img.width, 0), np.uint8), i)  # a shape
        photo, s["views"] = s.pop("photo"), []
        for box, flip, ph, p in zip(s["boxes"], s["flips"], self.photometrics, photo):
            v = img.resize((self.size, self.size), Image.BILINEAR, box=tuple(box.tolist()))
            v = v.transpose(Image.FLIP_LEFT_RIGHT) if flip else v
            s["views"].append(cdata.pil_to_uint8(v if self.device_aug else ph.apply_cpu(v, p)))
        return {**s, "photo": photo} if self.device_aug else s


def intersection_boxes(box_a, box_b, flip_a, flip_b):
    """box_a, box_b (N, 4) crops as (x0, y0, x1, y1) in image pixels, flips (N,) bool ->
    (N, 4) each view's intersection box (x1, y1, x2, y2) in [0, 1] of its own (flipped) view;
    crops that do not meet give empty boxes."""
    lo = torch.maximum(box_a[:, :2], box_b[:, :2])
    inter = torch.cat([lo, torch.maximum(torch.minimum(box_a[:, 2:], box_b[:, 2:]), lo)], 1)

    def own(box, flip):
        r = (inter - box[:, :2].repeat(1, 2)) / (box[:, 2:] - box[:, :2]).repeat(1, 2)
        mirrored = torch.stack([1 - r[:, 2], r[:, 1], 1 - r[:, 0], r[:, 3]], 1)
        return torch.where(flip[:, None], mirrored, r)
    return own(box_a, flip_a), own(box_b, flip_b)


def overlap_mask(box, s):
    """box (N, 4) normalised intersection box -> (N, s * s) bool: rows floor(s y1) ..
    floor(s y2) and columns floor(s x1) .. floor(s x2), ends exclusive (the released code)."""
    ends = (box * s).floor()
    i = torch.arange(s, device=box.device, dtype=box.dtype)
    rows = (i >= ends[:, 1:2]) & (i < ends[:, 3:4])   # (N, s)
    cols = (i >= ends[:, 0:1]) & (i < ends[:, 2:3])   # (N, s)
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)


# ----------------------------------------------------------------------------- matching rules
def coord_match(box_q, box_k, flip_q, flip_k, s):
    """PixCon-Coord (docs/methods.md D7). Boxes (N, 4) in image pixels, flips (N,) bool, s x s grid ->
    idx (N, s * s): the key cell nearest to the point of the image under each query cell's
    centre; valid (N, s * s): that point lies inside the key crop (the others are dropped)."""
    c = (torch.arange(s, device=box_q.device, dtype=box_q.dtype) + 0.5) / s
    v, u = (t.flatten()[None] for t in torch.meshgrid(c, c, indexing="ij"))  # (1, S) row, col
    u = torch.where(flip_q[:, None], 1 - u, u)                               # un-mirror the query
    x = box_q[:, 0:1] + u * (box_q[:, 2:3] - box_q[:, 0:1])                  # image pixels
    y = box_q[:, 1:2] + v * (box_q[:, 3:4] - box_q[:, 1:2])
    uk = (x - box_k[:, 0:1]) / (box_k[:, 2:3] - box_k[:, 0:1])               # key crop in [0, 1]
    vk = (y - box_k[:, 1:2]) / (box_k[:, 3:4] - box_k[:, 1:2])
    valid = (uk >= 0) & (uk <= 1) & (vk >= 0) & (vk <= 1)
    uk = torch.where(flip_k[:, None], 1 - uk, uk)                            # mirror into the key
    col, row = ((t * s).floor().clamp(0, s - 1).long() for t in (uk, vk))    # nearest centre
    return row * s + col, valid


@ctrain.fp32
def match_similarity(q_feat, k_feat, idx):
    """(N, C, S) backbone features, idx (N, S) matches -> (N, S) cosine of each match."""
    k = F.normalize(k_feat, dim=1).gather(2, idx.unsqueeze(1).expand(-1, k_feat.shape[1], -1))
    return (F.normalize(q_feat, dim=1) * k).sum(1)


def sr_weights(sim, overlap, power=2.0, eps=1e-6):
    """Semantic reweighting (docs/methods.md 8.4). sim (N, S) similarity of each query pixel's match,
    overlap (N, S) bool -> (N, S) weights in [0, 1]: min-max normalised per image with the min
    over all pixels and the max over those outside the overlap, overlap pixels 1, then ^power.
    No pixel outside: all 1; a zero range: outside pixels 0 (they all sit at the minimum)."""
    sim = sim.float()
    s_min = sim.min(1, keepdim=True).values
    s_max = sim.masked_fill(overlap, -math.inf).max(1, keepdim=True).values
    w = ((sim - s_min) / (s_max - s_min).clamp_min(eps)).clamp(0, 1)
    return torch.where(overlap, torch.ones_like(w), w) ** power


@torch.no_grad()
@ctrain.fp32
def positives(match, b_q, b_k, overlap, geometry, power):
    """Every query pixel's positive and weight, (N, S) each, decided in fp32 even under --amp:
    C5 features (N, C, S) of the query and key views, overlap (N, S) bool, geometry for
    coord_match."""
    if match == "coord":
        idx, valid = coord_match(*geometry)
        return idx, valid.float()
    idx = densecl.match(b_q, b_k)
    if match == "sim":
        return idx, torch.ones_like(idx, dtype=torch.float)
    return idx, sr_weights(match_similarity(b_q, b_k, idx), overlap, power)


# ----------------------------------------------------------------------------- the model
class Neck(nn.Module):
    """DenseCL's neck with BN (MoCo-v2+): global avgpool -> 512-512-BN-ReLU-128 and dense 1x1
    conv 512-512-BN-ReLU-128 over the C5 grid. Init as the released code (mmselfsup's
    DenseCLNeck without init_cfg): PyTorch's defaults for the Linear layers and the convs."""

    def __init__(self, in_dim, hidden, dim):
        super().__init__()
        self.glob = byol.mlp(in_dim, hidden, dim, "kaiming")
        for m in self.glob.modules():  # byol.mlp's Kaiming init undone: PyTorch's, as released
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        self.dense = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.BatchNorm2d(hidden),
                                   nn.ReLU(inplace=True), nn.Conv2d(hidden, dim, 1))

    def forward(self, c5):
        return self.glob(c5.mean((2, 3))), self.dense(c5).flatten(2)  # (N, D), (N, D, S)


class PixCon(nn.Module):
    def __init__(self, arch="resnet18", hidden_dim=512, dim=128, K=16384, T=0.2, lam=0.5,
                 match="sr", power=2.0, init="openselfsup"):
        super().__init__()
        self.K, self.T, self.lam, self.match, self.power = K, T, lam, match, power
        backbone = resnet(arch, init)
        self.online = nn.Sequential(backbone, Neck(backbone.feature_dim, hidden_dim, dim))
        self.pred_g = byol.mlp(dim, hidden_dim, dim, "normal")   # global predictor
        self.pred_d = byol.mlp(dim, hidden_dim, dim, "normal")   # per pixel, BN over N x S pixels
        self.target = copy.deepcopy(self.online)                 # backbone + neck, no predictors
        for p in self.target.parameters():
            p.requires_grad = False
        for name in ("queue_g", "queue_d"):                      # (K, D) each, as DenseCL
            self.register_buffer(name, F.normalize(torch.randn(K, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._ptr = None  # host copy of queue_ptr: no device-to-host read per step
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_ptr", None))

    momentum_update = byol.BYOL.momentum_update  # target <- m target + (1 - m) online, params only

    @torch.no_grad()
    def enqueue(self, k_g, k_pool):
        k_g, k_pool = cdist.concat_all_gather(k_g), cdist.concat_all_gather(k_pool)
        n = k_g.shape[0]
        assert self.K % n == 0, f"queue size {self.K} is not a multiple of the global batch {n}"
        if self._ptr is None:  # read from the buffer once (after init or a resume), not per step
            self._ptr = int(self.queue_ptr)
        ptr = self._ptr
        self.queue_g[ptr:ptr + n], self.queue_d[ptr:ptr + n] = k_g, k_pool
        self._ptr = (ptr + n) % self.K
        self.queue_ptr.fill_(self._ptr)  # the checkpoint's copy

    def online_view(self, x):
        """-> backbone C5 (N, C, S), normalised predictions: global (N, D), dense (N, D, S)."""
        c5 = resnet_maps(self.online[0], x)[-1]
        g, d = self.online[1](c5)
        n, dim, s = d.shape
        d = self.pred_d(d.transpose(1, 2).reshape(n * s, dim)).reshape(n, s, dim).transpose(1, 2)
        return c5.flatten(2), F.normalize(self.pred_g(g), dim=1), F.normalize(d, dim=1)

    @torch.no_grad()
    def target_view(self, x):
        """-> backbone C5 (N, C, S), normalised keys: global (N, D), dense (N, D, S), pooled
        dense (N, D) (pooled before normalising, P6)."""
        c5 = resnet_maps(self.target[0], x)[-1]
        g, d = self.target[1](c5)
        return c5.flatten(2), F.normalize(g, dim=1), F.normalize(d, dim=1), \
            F.normalize(d.mean(2), dim=1)

    def direction(self, qa, kb, overlap_a, geometry, queues):
        """Query view a against key view b -> global CE, dense weighted CE, parts. geometry:
        (box_a, box_b, flip_a, flip_b, s) for coord_match."""
        b_q, q_g, q_d = qa
        b_k, k_g, k_d, _ = kb
        logits_g = moco_logits(q_g.float(), k_g.float(), queues[0], self.T)
        loss_g = F.cross_entropy(logits_g, logits_g.new_zeros(len(logits_g), dtype=torch.long))
        with torch.no_grad():
            idx, w = positives(self.match, b_q, b_k, overlap_a, geometry, self.power)
        logits_d = densecl.dense_logits(q_d.float(), k_d.float(), idx, queues[1], self.T)
        ce = F.cross_entropy(logits_d, logits_d.new_zeros(len(logits_d), dtype=torch.long),
                             reduction="none")                      # (N * S,), (n, s) order
        w = w.flatten()
        loss_d = (w * ce).sum() / w.sum().clamp_min(1e-6)          # no pixel kept: 0, not NaN
        hit = (logits_d.argmax(1) == 0).float()
        return loss_g, loss_d, {
            "acc": (logits_g.argmax(1) == 0).float().mean(),
            "acc_dense": (w > 0).float().mul(hit).sum() / (w > 0).float().sum().clamp_min(1),
            "dense_weight": w.mean()}

    def forward(self, x1, x2, boxes, flips, enqueue_dir):
        """Views (N, 3, H, W); boxes 2 x (N, 4) image pixels; flips 2 x (N,) bool; enqueue_dir
        0: enqueue the keys of view 2 (direction 1 -> 2), 1: those of view 1."""
        o1, o2 = self.online_view(x1), self.online_view(x2)   # separate forwards: BN per view
        t1, t2 = self.target_view(x1), self.target_view(x2)
        s = int(round(o1[0].shape[2] ** 0.5))
        in1, in2 = intersection_boxes(boxes[0], boxes[1], flips[0], flips[1])
        m1, m2 = overlap_mask(in1, s), overlap_mask(in2, s)
        queues = (self.queue_g.clone(), self.queue_d.clone())  # overwritten below (P12)
        g12, d12, p12 = self.direction(o1, t2, m1, (*boxes, *flips, s), queues)
        g21, d21, p21 = self.direction(o2, t1, m2, (*boxes[::-1], *flips[::-1], s), queues)
        loss_g, loss_d = g12 + g21, d12 + d21                  # symmetric: sum of both directions
        loss = (1 - self.lam) * loss_g + self.lam * loss_d
        keys = t2 if enqueue_dir == 0 else t1
        self.enqueue(keys[1], keys[3])                         # one direction's keys per step
        parts = {k: 100 * (p12[k] + p21[k]) / 2 if k.startswith("acc") else (p12[k] + p21[k]) / 2
                 for k in p12}
        return loss, {"loss": loss.detach(), "loss_global": loss_g.detach(),
                      "loss_dense": loss_d.detach(), **parts,
                      "overlap": (m1.float().mean() + m2.float().mean()) / 2}


# ----------------------------------------------------------------------------- seeing matches
@torch.no_grad()
def save_matches(model, dataset, indices, path, per_tile=4, cell=192):
    """matches.png, one row per tile: view 1 with a few query cells (half inside the overlap),
    view 2 with each one's positive in the same colour, and every query cell's weight."""
    was, dev = model.training, next(model.parameters()).device
    model.eval()  # running BN statistics: a few tiles need no batch statistics
    ss = [dataset[i] for i in indices]
    x1, x2 = (cdata.to_device(torch.stack([t["views"][v] for t in ss]), dev) for v in range(2))
    boxes = [torch.stack([t["boxes"][v] for t in ss]).to(dev) for v in range(2)]
    flips = [torch.tensor([t["flips"][v] for t in ss], device=dev) for v in range(2)]
    b1 = resnet_maps(model.online[0], x1)[-1].flatten(2)       # query C5, as in training
    b2 = resnet_maps(model.target[0], x2)[-1].flatten(2)       # key C5
    model.train(was)
    s = int(round(b1.shape[2] ** 0.5))
    in1, in2 = intersection_boxes(boxes[0], boxes[1], flips[0], flips[1])
    idx, w = (t.cpu() for t in positives(model.match, b1, b2, overlap_mask(in1, s),
                                           (*boxes, *flips, s), model.power))
    rows = []
    for n, i in enumerate(indices):
        inside = overlap_mask(in1[n:n + 1], s)[0].cpu()
        pick = [c[torch.linspace(0, len(c) - 1, per_tile // 2).round().long()].tolist() if len(c)
                else [] for c in (inside.nonzero()[:, 0], (~inside).nonzero()[:, 0])]
        q = sorted(set(pick[0] + pick[1]))
        v1, v2 = (pictures.enlarge(pictures.to_rgb(x[n]), cell) for x in (x1, x2))
        weight = pictures.enlarge(w[n].view(s, s).numpy(), cell)[..., None]
        faded = (v1 * (0.2 + 0.8 * weight) + 255 * 0.8 * (1 - weight)).astype(np.uint8)
        v1 = pictures.box(v1, *(in1[n] * cell).round().int().tolist(), (0, 0, 0), 2)  # overlap
        v2 = pictures.box(v2, *(in2[n] * cell).round().int().tolist(), (0, 0, 0), 2)
        for j, c in enumerate(q):
            v1 = pictures.cell_box(v1, c, s, pictures.PALETTE[j])
            if w[n, c] > 0:  # coord: a query outside the key crop has no positive
                v2 = pictures.cell_box(v2, int(idx[n, c]), s, pictures.PALETTE[j])
        caption = [f"{float(w[n, c]):.2f}" for c in q]
        rows.append([(v1, f"tile {i}, view 1: {len(q)} query cells"),
                     (v2, f"view 2: their positives; weights {', '.join(caption)}"),
                     (faded, "view 1 faded by each query cell's weight (unfaded: 1)")])
    rule = {"sim": "the key cell of the most similar C5 feature (PixCon-Sim)",
            "sr": "the most similar key cell, weighted by its min-max normalised similarity "
                  "squared outside the overlap (PixCon-SR)",
            "coord": "the key cell at the same place of the tile; cells outside the key crop are "
                     "dropped, weight 0 (PixCon-Coord)"}[model.match]
    notes = [f"One colour is one query cell of view 1 and its positive in view 2: {rule}. Black "
             f"outline: the part of each view that the other view also sees. C5 grid {s} x {s}; "
             "features of the online backbone (view 1) and the EMA target (view 2), as in "
             "training, in eval mode. Written at the end of the run."]
    name = {"sim": "Sim", "sr": "SR", "coord": "Coord"}[model.match]
    pictures.sheet(rows, f"PixCon-{name} matches", notes, cell).save(path)
    return path


# ----------------------------------------------------------------------------- training
def enqueue_direction(seed, step):
    """Which direction's keys this step enqueues (the released code: a coin flip per step).
    Drawn from (seed, global step) alone, so every process enqueues the same direction and a
    resumed run the same as an uninterrupted one."""
    g = torch.Generator().manual_seed(cdata.sample_seed(seed, step, 15))
    return int(torch.randint(2, (1,), generator=g))


def train_one_epoch(model, optimizer, trainer, run, args):
    total_steps = args.epochs * trainer.steps_per_epoch
    for step, batch in trainer.steps(trainer.epoch):
        it = trainer.global_step()
        lr = ctrain.set_lr(optimizer, ctrain.cosine_lr(args.scaled_lr, it, trainer.steps_per_epoch,
                                                       args.epochs, args.warmup_epochs))
        x1, x2 = (run.images(v) for v in batch["views"])
        boxes, flips = ([t.to(run.device) for t in batch[k]] for k in ("boxes", "flips"))
        with run.autocast():
            loss, parts = model(x1, x2, boxes, flips, enqueue_direction(args.seed, it))
        trainer.backward_step(optimizer, loss, parts)
        # EMA after the optimiser step, as BYOL (P17); m is a function of the global step
        m = ctrain.cosine_momentum(args.base_momentum, it, total_steps)
        ctrain.unwrap(model).momentum_update(m)
        trainer.update({**parts, "m": m}, lr)


def get_args(argv=None):
    p = cli.parser(__doc__)
    ctrain.add_common_args(p, batch_size=256, lr=0.2, epochs=200, weight_decay=1e-4)
    g = p.add_argument_group("pixcon")
    g.add_argument("--match", choices=["sim", "coord", "sr"], default="sr",
                   help="a query pixel's positive: sim = most similar key pixel (PixCon-Sim, "
                        "DenseCL's rule), coord = same place of the tile (PixCon-Coord, docs/methods.md "
                        "D7), sr = sim with semantic reweighting (PixCon-SR, the released config)")
    g.add_argument("--queue-size", type=cli.positive_int, default=16384,
                   help="both queues (the NCT size of the MoCo family; released COCO: 65536)")
    g.add_argument("--temperature", type=cli.positive_float, default=0.2, help="both losses")
    g.add_argument("--loss-lambda", type=cli.unit_float, default=0.5,
                   help="weight of the dense loss (the global one: 1 - lambda)")
    g.add_argument("--base-momentum", type=cli.unit_float, default=0.99,
                   help="EMA m at step 0, rising to 1 on a cosine of the global step")
    g.add_argument("--warmup-epochs", type=cli.nonneg_int, default=4,
                   help="linear lr warm-up (per step, from 1e-4 x lr)")
    g.add_argument("--hidden-dim", type=cli.positive_int, default=512,
                   help="neck and predictor hidden width (docs/methods.md D5; released R50: 2048)")
    g.add_argument("--dim", type=cli.positive_int, default=128, help="embedding width")
    g.add_argument("--sr-power", type=cli.positive_float, default=2.0,
                   help="--match sr: power of the weights (the released config)")
    g.add_argument("--blur-kernel", type=cli.odd_kernel, default=23,
                   help="Gaussian blur kernel size (sigma 0.1-2), as the released pipeline; "
                        "small kernels are cheaper on the CPU")
    g.add_argument("--vis-tiles", type=cli.nonneg_int, default=4,
                   help="matches.png at the end with this many tiles (0: off)")
    p.epilog = ("CPU example (minutes):\n  python pixcon.py --data demo --epochs 2 --batch-size 32 "
                "--img-size 64 --queue-size 512")
    p.set_defaults(resume_keys=("match", "queue_size", "dim", "hidden_dim", "loss_lambda",
                                "sr_power"))
    return p.parse_args(argv)


def main():
    args = get_args()
    run = ctrain.Run(args, "pixcon")
    if args.queue_size % run.global_batch:
        raise cdata.DataError(f"--queue-size {args.queue_size} must be a multiple of the global "
                              f"batch {run.global_batch}")
    # BYOL's photometric ops per view (torchvision ColorJitter, P10): view 1 always blurred,
    # view 2 blurred one time in ten and solarised one in five; the crops are ours (above).
    photometric = [v.photometric for v in byol.augmentations(args.img_size, args.blur_kernel)]
    dataset = OverlapViews(cdata.build_dataset(args), args.img_size, photometric, seed=args.seed)
    loader, sampler = cdata.pretrain_loader(dataset, args.batch_size, args.workers, args.seed,
                                            run.device)
    model = PixCon(args.arch, args.hidden_dim, args.dim, args.queue_size, args.temperature,
                   args.loss_lambda, args.match, args.sr_power, args.init)
    model = run.sync_bn(model).to(run.device)  # SyncBN everywhere, as the released config
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=args.scaled_lr, momentum=0.9, weight_decay=args.weight_decay)
    chance = 2 * math.log(args.queue_size + 1)
    trainer = ctrain.Trainer(run, model, optimizer, loader, sampler, model.online[0],
                             extra_log={"chance_loss": chance})
    run.print(f"PixCon-{args.match} {args.arch}: {len(dataset)} images, global batch "
              f"{run.global_batch} = {run.world} x {args.batch_size}, SGD lr {args.scaled_lr:.4g} "
              f"(= {args.lr} x {run.global_batch}/{args.paper_batch}), warm-up "
              f"{args.warmup_epochs} epochs, EMA m {args.base_momentum} -> 1, T {args.temperature},"
              f" K {args.queue_size} x 2, lambda {args.loss_lambda}, chance loss 2 log(K+1) = "
              f"{chance:.3f}, {trainer.steps_per_epoch} steps/epoch, output {run.out}")
    ddp_model = run.wrap(model)
    for _ in trainer.epochs():
        train_one_epoch(ddp_model, optimizer, trainer, run, args)
    if run.main and args.vis_tiles:
        dataset.device_crop = False  # --device-crop: the picture from the loader's PIL views
        print(save_matches(model, dataset, range(min(args.vis_tiles, len(dataset))),
                           run.out / "matches.png"), flush=True)


if __name__ == "__main__":
    ctrain.main_guard(main)
