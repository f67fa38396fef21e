"""DetCon: contrastive detection, DetCon_S (on SimCLR) and DetCon_B (on BYOL).

Hénaff et al., "Efficient Visual Pretraining with Contrastive Detection" (ICCV 2021). Each tile
carries masks (Felzenszwalb-Huttenlocher segments of the whole tile, computed once and cached;
or a grid, or label maps from files). Every view's mask goes through exactly the view's crop
and flip, is area-pooled to the C5 grid (each cell to one mask), and 16 masks per view are
drawn among those present; their mask-pooled C5 features go through the heads, and a
contrastive loss pulls the same mask of the two views together against every other mask of
every image of both views (docs/methods.md section 5, D4, D5). S: SimCLR's network, augmentations
and LARS; B: BYOL's online/target networks, predictor, EMA and asymmetric augmentations.
The recipes are the parents' NCT recipes, read from simclr.py / byol.py (lr, weight decay,
warm-up; 200 epochs, batch 1024, per-epoch cosine); the released rates are flags (see --lr).

    python -m common.masks --data nct --data-root /data/NCT-CRC-HE-100K --mask-cache /data/fh \
        --workers 16                                                        # FH once, offline
    torchrun --nproc_per_node=8 detcon.py --data nct --data-root /data/NCT-CRC-HE-100K \
        --mask-cache /data/fh --variant B
    python detcon.py --data demo --epochs 2 --batch-size 16 --img-size 64 --masks grid \
        --grid-size 2                                                       # CPU, minutes

A healthy log: `loss` starts below log(2 x 16 x global batch) - the chance level of a row
with a partner - because rows without a partner in the other view weigh 0 and a mask drawn k
times weighs 1/k per row (`paired`: the share of rows with a partner, near 1 for grid masks,
lower for FH), and falls; `acc` (a row's best match is its partner) rises; `masks_computed`
(the share of tiles whose FH map training computed itself) is 1 in the first epoch without a
precompute and 0 afterwards; `masks_per_view` counts the masks that own a cell of a view's C5
grid (what the draws choose among). masks.png (written at the start) shows tiles, their masks,
each view's masks and the cells its 16 draws pool; one colour is one mask across a row. On 224 px NCT tiles FH with the paper's 1000 / 1000 finds only 1-4
segments (a tile has 50,176 pixels; min_size 1000), so DetCon is close to its parent there;
`--fh-scale 250 --fh-min-size 250` gives about 20.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import byol
import simclr
from common import cli
from common import data as cdata
from common import dist as cdist
from common import pictures
from common import train as ctrain
from common.crop import nearest_indices, resize_crop
from common.glands import read_label_map
from common.masks import FHCache, pack_command
from common.models import resnet_maps


# ----------------------------------------------------------------------------- mask geometry
def view_masks(full, boxes, flips, size):
    """(H, W) int ids of the whole tile -> (V, size, size) ids (numpy, full's dtype) as V views
    see them: each view's crop box (x0, y0, x1, y1), nearest resize (the image's sampling grid:
    Pillow's index arithmetic, common.crop; 0 outside the tile), mirrored if flipped (official
    `preprocess_image`). Two gathers per view: the loader's share, a fifth of PIL round trips."""
    full, b = np.asarray(full), torch.stack([torch.as_tensor(x).float() for x in boxes])
    (h, w), n = full.shape, len(b)  # one call for both axes of every view
    idx = nearest_indices(b[:, :2].T.flatten(), b[:, 2:].T.flatten(), size, max(h, w)).numpy()
    xs, ys = np.where(idx[:n] < w, idx[:n], -1), np.where(idx[n:] < h, idx[n:], -1)
    out = []
    for x, y, flip in zip(xs, ys, flips):
        x = x[::-1] if flip else x
        m = full.take(y.clip(0), 0).take(x.clip(0), 1)
        out.append(np.where((y[:, None] < 0) | (x[None, :] < 0), 0, m) if min(x.min(), y.min()) < 0
                   else m)
    return np.stack(out)


def cell_labels(mask, grid):
    """(..., S, S) ids -> (..., grid * grid) id of each C5 cell: the mask covering most of the
    cell's S/grid x S/grid pixels (one-hot average pooling + argmax, official
    `create_binary_mask`; ties -> lowest id), so every cell belongs to exactly one mask."""
    mask = np.asarray(mask)
    *lead, S, _ = mask.shape
    k, m = S // grid, int(mask.max()) + 1
    cells = mask.reshape(-1, grid, k, grid, k).swapaxes(2, 3).reshape(-1, k * k)  # (N g g, k k)
    counts = np.bincount((cells + m * np.arange(len(cells))[:, None]).ravel(),
                         minlength=len(cells) * m)
    return torch.from_numpy(counts.reshape(*lead, grid * grid, m).argmax(-1))


def sample_masks(cells, n):
    """(S,) cell ids -> (n,) ids drawn with replacement, uniformly among the masks present
    (owning >= 1 cell), from torch's RNG (official `sample_masks`)."""
    present = torch.bincount(cells).gt(0).float()
    return torch.multinomial(present, n, replacement=True)


def mask_pool(feat, cells, ids):
    """feat (B, C, S) C5 vectors, cells (B, S), ids (B, R) -> (B, R, C): the mean C5 vector of
    each sampled mask's cells (mask / max(area, 1))."""
    w = (cells[:, None, :] == ids[:, :, None]).to(feat.dtype)        # (B, R, S)
    w = w / w.sum(2, keepdim=True).clamp_min(1)
    return w @ feat.transpose(1, 2)


# ----------------------------------------------------------------------------- the loss
def _direction(a, t_other, t_same, ids_a, ids_o_all, ids_a_all, temperature):
    """One view's rows: a (N, M, D) local anchors; t_* (W N, M, D) gathered targets of the other
    and the same view; ids_*_all (W N, M). -> (loss, correct, rows with a positive)."""
    N, M, _ = a.shape
    rank = cdist.get_rank()
    a = a.flatten(0, 1)                                                       # (N M, D)
    img_a = (torch.arange(N, device=a.device) + rank * N).repeat_interleave(M)
    img_all = torch.arange(t_other.shape[0], device=a.device).repeat_interleave(M)
    same_img = img_a[:, None] == img_all[None, :]                            # (N M, W N M)
    id_a = ids_a.flatten()[:, None]
    pos = same_img & (id_a == ids_o_all.flatten()[None, :])                  # partner rows
    logits_x = a @ t_other.flatten(0, 1).t() / temperature
    logits_s = (a @ t_same.flatten(0, 1).t() / temperature).masked_fill(
        same_img & (id_a == ids_a_all.flatten()[None, :]), -1e9)             # itself, duplicates
    # log-softmax over both blocks without concatenating them (half the memory at NCT scale)
    lse = torch.logaddexp(logits_x.logsumexp(1), logits_s.logsumexp(1))      # (N M,)
    n_pos = pos.sum(1)
    ce = -(pos * (logits_x - lse[:, None])).sum(1) / n_pos.clamp_min(1)      # soft labels
    dup = (ids_a[:, :, None] == ids_a[:, None, :]).sum(2).flatten()          # draws of this id
    weight = (n_pos > 0).to(ce.dtype) / dup
    best, j = logits_x.max(1)                                                # best candidate
    hit = (best >= logits_s.max(1).values) & pos.gather(1, j[:, None]).squeeze(1)
    return (weight * ce).mean(), (hit & (n_pos > 0)).sum(), (n_pos > 0).sum()


@ctrain.fp32
def detcon_loss(a1, a2, ids1, ids2, temperature, t1=None, t2=None, return_stats=False):
    """a1, a2 (N, M, D) anchors of the two views for M sampled masks per image (predictions for
    B, projections for S); t1, t2 targets (default: the anchors, DetCon_S; B: the target
    network's projections, no gradient); ids (N, M) mask ids. Positives: the same image and id
    in the other view; negatives: every other row of both views on every process (targets
    gathered with gradients, pitfall P3); duplicated ids share the label mass and the weight;
    rows without a positive weigh 0 but count in the mean over N*M rows; the two directions
    are averaged, so the loss is half the released sum (`byol_nce_detcon`, lightly), and one
    global mask per image gives exactly simclr.nt_xent (the mean over 2N rows of the
    OpenSelfSup SimCLR that trained the NCT recipe). The soft-label cross-entropy is explicit
    (pitfall P8)."""
    t1 = a1 if t1 is None else t1
    t2 = a2 if t2 is None else t2
    a1, a2, t1, t2 = (F.normalize(x, dim=-1) for x in (a1, a2, t1, t2))
    T1, T2 = cdist.gather_with_grad(t1), cdist.gather_with_grad(t2)          # (W N, M, D)
    I1, I2 = cdist.concat_all_gather(ids1), cdist.concat_all_gather(ids2)
    l1, h1, n1 = _direction(a1, T2, T1, ids1, I2, I1, temperature)
    l2, h2, n2 = _direction(a2, T1, T2, ids2, I1, I2, temperature)
    loss = (l1 + l2) / 2
    if not return_stats:
        return loss
    rows = 2 * ids1.numel()
    return loss, {"acc": 100 * (h1 + h2).float() / (n1 + n2).clamp_min(1),
                  "paired": (n1 + n2).float() / rows}


# ----------------------------------------------------------------------------- data
def read_mask_file(path, size):
    """--masks file: a label map (grey, palette, 16-bit or RGB; RGB colours told apart by all
    three channels, common.glands.read_label_map) of an image of `size` (W, H) -> (H, W) ids
    0..n-1, one per distinct value or colour."""
    if not Path(path).exists():
        raise cdata.DataError(f"--mask-dir: cannot read {path} (no such file)")
    full = read_label_map(path)
    if full.shape != (size[1], size[0]):
        raise cdata.DataError(f"{path}: mask {full.shape[::-1]} != image {tuple(size)}")
    return np.unique(full, return_inverse=True)[1].reshape(full.shape)


class MaskViews(cdata.MultiViewDataset):
    """The method's two views plus, per view, the C5 cell ids of its masks (`cells`, (g*g,))
    and the `num_masks` ids sampled among them (`ids`): drawn here, per sample and seeded like
    the views, so the online and target forwards share one draw and any process layout sees
    the same draws. `masks_computed` is 1 where the FH map was not in the cache."""

    def __init__(self, base, views, seed, args):
        super().__init__(base, views, seed)
        self.args, self.grid = args, args.img_size // 32
        if args.masks == "fh":
            self.fh = FHCache(args.mask_cache or Path(args.output_dir) / "masks", args.fh_scale,
                              args.fh_min_size, store=getattr(args, "data_store", None))

    def full_labels(self, img, i, hw):
        """(H, W) ids over the whole tile of size hw and whether they had to be computed; img:
        the PIL tile or a callable giving it (called only for an FH map neither packed beside
        the store nor cached)."""
        a, (h, w) = self.args, hw
        if a.masks == "fh":
            return self.fh.load(FHCache.key(self.base, i, a.data_root, self.seed), img)
        if a.masks == "grid":  # an n x n grid over the tile (the paper's spatial heuristic)
            rows, cols = np.arange(h) * a.grid_size // h, np.arange(w) * a.grid_size // w
            return rows[:, None] * a.grid_size + cols[None, :], False
        rel = Path(FHCache.key(self.base, i, a.data_root, self.seed))
        paths = [Path(a.mask_dir) / rel.with_suffix(".png"), Path(a.mask_dir) / f"{rel.stem}.png"]
        return read_mask_file(next((p for p in paths if p.exists()), paths[-1]), (w, h)), False

    def augment(self, img, i):
        return self.add_masks(super().augment(img, i), i, *self.full_labels(img, i, img.size[::-1]))

    def draw_params(self, tile, i):
        """--device-crop: augment()'s numbers, cells and draws, from the stored tile. The masks
        need no pixels, so they stay here (nearest crops and a bincount on small maps; the
        draws read the cells), and the views are cropped on the device."""
        s = super().draw_params(tile, i)
        return self.add_masks(s, i, *self.full_labels(lambda: Image.fromarray(np.asarray(tile)),
                                                      i, tile.shape[:2]))

    def add_masks(self, s, i, full, computed):
        s["cells"] = list(cell_labels(view_masks(full, s["boxes"], s["flips"], self.args.img_size),
                                      self.grid))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cdata.sample_seed(self.seed, self.epoch, i, 1))
            s["ids"] = [sample_masks(c, self.args.num_masks) for c in s["cells"]]
        s["masks_computed"] = int(computed)
        s["masks_per_view"] = sum(len(c.unique()) for c in s["cells"]) / 2  # owning >= 1 cell
        return s


# ----------------------------------------------------------------------------- the models
def pooled(backbone, x, cells, ids):
    """(B, 3, H, W) -> (B * R, C) mask-pooled C5 vectors, the rows the heads see (BN over all)."""
    return mask_pool(resnet_maps(backbone, x)[-1].flatten(2), cells, ids).flatten(0, 1)


class DetConS(simclr.SimCLR):
    """SimCLR's network (backbone + projection head 512-512-128 with BN) on mask-pooled rows;
    both views in one forward (BN over both, as simclr.py), gradients through both sides."""

    def __init__(self, args):
        super().__init__(args.arch, args.hidden_dim, args.dim, args.temperature, args.init)

    def forward(self, x1, x2, cells, ids):
        B, R = ids[0].shape
        f = pooled(self.backbone, torch.cat([x1, x2]), torch.cat(cells), torch.cat(ids))
        z1, z2 = self.head(f).view(2, B, R, -1).unbind(0)
        loss, stats = detcon_loss(z1, z2, ids[0], ids[1], self.T, return_stats=True)
        return loss, {"loss": loss.detach(), **stats}


class DetConB(byol.BYOL):
    """BYOL's online network + predictor and EMA target on mask-pooled rows; one forward per
    view (BN statistics per view, over its B * 16 rows, as the official code)."""

    def __init__(self, args):
        super().__init__(args.arch, args.hidden_dim, args.dim, args.init)
        self.T = args.temperature

    def forward(self, x1, x2, cells, ids):
        B, R = ids[0].shape
        views = list(zip((x1, x2), cells, ids))
        p1, p2 = (self.predictor(self.online[1](pooled(self.online[0], *v))).view(B, R, -1)
                  for v in views)
        with torch.no_grad():  # the same draws as the online forward of each view
            z1, z2 = (self.target[1](pooled(self.target[0], *v)).view(B, R, -1) for v in views)
        loss, stats = detcon_loss(p1, p2, ids[0], ids[1], self.T, z1, z2, return_stats=True)
        return loss, {"loss": loss.detach(), **stats}


# ----------------------------------------------------------------------------- seeing masks
def mask_source(a):
    return {"fh": f"FH scale {a.fh_scale} min_size {a.fh_min_size}",
            "grid": f"{a.grid_size} x {a.grid_size} grid",
            "file": f"files in {a.mask_dir}"}[a.masks]


def save_masks(dataset, indices, path):
    """PNG, one row per tile: the tile, its masks, then per view the view with its masks (the
    view's crop and flip) and the C5 cells that its drawn masks pool (the others dimmed); one
    colour is one mask across a row, drawn as outlines over a light tint."""
    a, g = dataset.args, dataset.grid
    cell, size = max(160, a.img_size), a.img_size
    rows = []
    for i in indices:
        img = dataset.base.load(i)[0] if hasattr(dataset.base, "load") else dataset.base[i][0]
        full = np.asarray(dataset.full_labels(img, i, img.size[::-1])[0], np.int64)
        s = dataset[i]
        if "views" not in s:  # --device-crop: the views' crops here (as --device-aug's, no colour)
            s["views"] = [resize_crop(s["tile"][None], s["boxes"][v][None], view.size,
                                      view.interpolation, [s["flips"][v]])[0]
                          for v, view in enumerate(dataset.views)]
        tile = pictures.enlarge(cdata.pil_to_uint8(img).permute(1, 2, 0).numpy(), cell)
        row = [(tile, f"tile {i}"), (pictures.paint(tile, full), f"{full.max() + 1} masks")]
        masks = view_masks(full, s["boxes"], s["flips"], size)
        for v, vm in enumerate(masks):
            view = pictures.enlarge(pictures.to_rgb(s["views"][v]), cell)
            cells = s["cells"][v].view(g, g)
            drawn = torch.where(torch.isin(cells, s["ids"][v]), cells, -1).numpy()
            dim = pictures.enlarge(drawn, cell) < 0
            faded = np.where(dim[..., None], view // 3 + 170, view).astype(np.uint8)
            row += [(pictures.paint(view, vm), f"view {v + 1}: {len(np.unique(vm))} masks"),
                    (pictures.paint(faded, drawn), f"view {v + 1}: {len(np.unique(cells))} on the "
                     f"{g}x{g} grid, {len(np.unique(drawn[drawn >= 0]))} drawn")]
        rows.append(row)
    notes = ["One colour is one mask: the same colour marks the same mask in every column of a "
             "row. Columns: the tile; its masks; per view, the view (its crop and flip) with the "
             "masks carried through, then its C5 grid, each cell given to the mask covering most "
             f"of it, with the cells of the masks among its {a.num_masks} draws (with "
             "replacement) in colour and the others faded. Log: masks_per_view = masks on the "
             "grid per view, the number under the grid column."]
    pictures.sheet(rows, f"DetCon masks ({mask_source(a)})", notes, cell).save(path)
    return path


# ----------------------------------------------------------------------------- training
def train_one_epoch(model, optimizer, trainer, run, args):
    total_steps = args.epochs * trainer.steps_per_epoch
    computed = torch.zeros((), dtype=torch.float64, device=run.device)
    for step, batch in trainer.steps(trainer.epoch):
        it = trainer.global_step()
        lr = ctrain.set_lr(optimizer, ctrain.cosine_lr(args.scaled_lr, it, trainer.steps_per_epoch,
                                                       args.epochs, args.warmup_epochs))
        x1, x2 = (run.images(v) for v in batch["views"])
        cells = [c.to(run.device) for c in batch["cells"]]
        ids = [i.to(run.device) for i in batch["ids"]]
        with run.autocast():
            loss, parts = model(x1, x2, cells, ids)
        trainer.backward_step(optimizer, loss, parts)
        parts["masks_computed"] = batch["masks_computed"].float().mean()
        parts["masks_per_view"] = batch["masks_per_view"].float().mean()
        computed += batch["masks_computed"].sum()
        if args.variant == "B":  # EMA after the optimiser step, as byol.py
            m = ctrain.cosine_momentum(args.base_momentum, it, total_steps)
            ctrain.unwrap(model).momentum_update(m)
            parts["m"] = m
        trainer.update(parts, lr)
    cdist.all_reduce(computed)
    if args.masks == "fh":
        run.print(f"FH masks computed by training this epoch: {int(computed)} (0 once cached)")


PARENTS = {"S": simclr, "B": byol}
INHERITED = ("lr", "weight_decay", "warmup_epochs", "dim")
RELEASED_LR = {"S": 0.3 * 1024 / 256, "B": 0.2 * 1024 / 256}  # the paper's 0.3 / 0.2 x B/256


def variant_defaults(variant):
    """lr (at global batch 1024), wd, warm-up epochs and projection width of the parent's NCT
    recipe, read from simclr.py / byol.py themselves so the two cannot drift apart (docs/methods.md
    5.6: DetCon on NCT reuses its parent's recipe, so the comparison is fair)."""
    parent = PARENTS[variant].get_args([])
    assert parent.paper_batch == 1024
    return {k: getattr(parent, k) for k in INHERITED}


def get_args(argv=None):
    p = cli.parser(__doc__)
    ctrain.add_common_args(p, batch_size=1024, lr=0.8, epochs=200, weight_decay=1.5e-6)
    S, B = variant_defaults("S"), variant_defaults("B")
    derived = {"lr": f"lr at global batch 1024, scaled linearly; default the parent's NCT recipe,"
                     f" S: {S['lr']} (simclr.py), B: {B['lr']} (byol.py). The released rates "
                     f"(0.3 / 0.2 x B/256): --lr {RELEASED_LR['S']} (S), "
                     f"--lr {RELEASED_LR['B']} (B)",
               "weight_decay": f"default S: {S['weight_decay']} (simclr.py), B: "
                               f"{B['weight_decay']} (byol.py)"}
    for action in p._actions:
        if action.dest in derived:
            action.default, action.help = None, derived[action.dest]
    g = p.add_argument_group("detcon")
    g.add_argument("--variant", choices=["S", "B"], default="B",
                   help="S: on SimCLR (one network, negatives with gradients); B: on BYOL "
                        "(EMA target, predictor; the released code)")
    g.add_argument("--masks", choices=["fh", "grid", "file"], default="fh",
                   help="fh: Felzenszwalb segments of the whole tile, cached; grid: n x n grid; "
                        "file: label maps from --mask-dir")
    g.add_argument("--fh-scale", type=cli.positive_int, default=1000, help="FH scale (D4)")
    g.add_argument("--fh-min-size", type=cli.positive_int, default=1000, help="FH min_size (D4)")
    g.add_argument("--mask-cache", default=None,
                   help="FH cache folder shared with concl.py, filled beforehand by "
                        "`python -m common.masks` (default OUTPUT/masks); with --data-store, "
                        "maps packed beside the store (python -m common.masks --data-store) "
                        "are read first")
    g.add_argument("--grid-size", type=cli.positive_int, default=5,
                   help="--masks grid: n (5 x 5 best in the paper's Fig. 7)")
    g.add_argument("--mask-dir", default=None,
                   help="--masks file: PNG label maps named <relative path>.png or <stem>.png "
                        "(grey, palette or RGB: one mask per value or colour)")
    g.add_argument("--num-masks", type=cli.positive_int, default=16, help="masks sampled per view")
    g.add_argument("--temperature", type=cli.positive_float, default=0.1, help="T")
    g.add_argument("--hidden-dim", type=cli.positive_int, default=512,
                   help="head hidden width (D5: 512 for ResNet-18; official R50: 2048 S, 4096 B)")
    g.add_argument("--dim", type=cli.positive_int, default=None,
                   help=f"projection width; default S: {S['dim']} (simclr.py), B: {B['dim']} "
                        "(byol.py)")
    g.add_argument("--warmup-epochs", type=cli.nonneg_int, default=None,
                   help=f"linear lr warm-up; default S: {S['warmup_epochs']} (simclr.py), B: "
                        f"{B['warmup_epochs']} (byol.py's NCT recipe)")
    g.add_argument("--base-momentum", type=cli.unit_float, default=0.996,
                   help="B: EMA m at step 0, rising to 1 on a cosine of the global step")
    g.add_argument("--blur-kernel", type=cli.odd_kernel, default=None,
                   help="blur: default PIL GaussianBlur(radius=sigma) as the NCT (OpenSelfSup) "
                        "config; 23 = torchvision's exact kernel (docs/methods.md 0.4), 5x the CPU cost")
    g.add_argument("--vis-tiles", type=cli.nonneg_int, default=8,
                   help="masks.png with this many tiles at the start (0: off)")
    p.epilog = ("CPU example (minutes):\n  python detcon.py --data demo --epochs 2 --batch-size 16 "
                "--img-size 64 --masks grid --grid-size 2")
    p.set_defaults(resume_keys=("variant", "masks", "num_masks", "dim", "hidden_dim",
                                "fh_scale", "fh_min_size", "grid_size"))
    args = p.parse_args(argv)
    for k, v in variant_defaults(args.variant).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.masks == "file" and not args.mask_dir:
        p.error("--masks file needs --mask-dir")
    return args


def main():
    args = get_args()
    run = ctrain.Run(args, "detcon")
    if args.img_size % 32:
        raise cdata.DataError(f"--img-size {args.img_size}: use a multiple of 32 (C5 grid)")
    g = args.img_size // 32
    if args.masks == "grid" and args.grid_size > g:
        raise cdata.DataError(f"--grid-size {args.grid_size}: {args.grid_size ** 2} masks do not "
                              f"fit the {g} x {g} C5 grid of --img-size {args.img_size}; at most {g}")
    if args.variant == "S":
        views = [simclr.augmentation("simclr", args.img_size, args.blur_kernel)] * 2
    else:
        views = byol.augmentations(args.img_size, args.blur_kernel)
    dataset = MaskViews(cdata.build_dataset(args), views, args.seed, args)
    loader, sampler = cdata.pretrain_loader(dataset, args.batch_size, args.workers, args.seed,
                                            run.device)
    # cross-replica BN in backbone and heads, as the official code (identity on CPU / 1 process)
    model = run.sync_bn(DetConS(args) if args.variant == "S" else DetConB(args)).to(run.device)
    optimizer = ctrain.LARS(ctrain.lars_param_groups(model, args.weight_decay), lr=args.scaled_lr,
                            momentum=0.9)
    rows = 2 * run.global_batch * args.num_masks
    trainer = ctrain.Trainer(run, model, optimizer, loader, sampler,
                             model.backbone if args.variant == "S" else model.online[0],
                             extra_log={"chance_loss": math.log(rows - 1)})
    run.print(f"DetCon_{args.variant} {args.arch}: {len(dataset)} images, global batch "
              f"{run.global_batch} = {run.world} x {args.batch_size}, {args.num_masks} masks per "
              f"view ({mask_source(args)}) on the {g} x {g} C5 grid, LARS lr {args.scaled_lr:.4g} "
              f"(= {args.lr} x {run.global_batch}/1024), wd {args.weight_decay}, warm-up "
              f"{args.warmup_epochs} epochs, T {args.temperature}, heads {args.hidden_dim} -> "
              f"{args.dim}, chance loss log({rows} - 1) = {math.log(rows - 1):.2f} per paired row, "
              f"{trainer.steps_per_epoch} steps/epoch, output {run.out}")
    if args.masks == "fh" and run.main:
        keys = [FHCache.key(dataset.base, i, args.data_root, args.seed) for i in range(len(dataset))]
        cached = sum(dataset.fh.has(k) for k in keys)
        where = (f"packed in --data-store {args.data_store}" if dataset.fh.packed is not None
                 else f"cache {dataset.fh.folder}")
        how = (pack_command(args.data_store, args.fh_scale, args.fh_min_size) if args.data_store
               else "python -m common.masks ... --mask-cache DIR")
        run.print(f"FH maps ({where}): {cached} of {len(keys)} tiles cached" + (
            "" if cached == len(keys) else f"; the rest are computed in the loader (precompute: {how})"))
    if run.main and args.vis_tiles and trainer.epoch == 0 and trainer.step == 0:
        print(save_masks(dataset, range(min(args.vis_tiles, len(dataset))), run.out / "masks.png"))
    ddp_model = run.wrap(model)
    for _ in trainer.epochs():
        train_one_epoch(ddp_model, optimizer, trainer, run, args)


if __name__ == "__main__":
    ctrain.main_guard(main)
