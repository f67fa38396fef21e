"""ConCL: concept contrastive learning on top of MoCo v2 (g-, fh-, b-ConCL and external masks).

Yang et al., "ConCL: Concept Contrastive Learning for Dense Prediction Pre-training in Pathology
Images" (ECCV 2022). A reference view (the original tile cropped to the union of the query and
key crops) carries concept masks; each concept is mapped into both views, its C5 features are
mask-average-pooled, passed through the shared MoCo-v2 head and contrasted against a queue of
concept keys. Defaults: the paper's b-ConCL (k-means with K=8 on the key encoder's stage-4
features), 20 warm-up epochs of instance loss, lambda = 1 (docs/methods.md section 6, D1-D3).

    torchrun --nproc_per_node=8 concl.py --data nct --data-root /data/NCT-CRC-HE-100K
    python concl.py --data demo --epochs 3 --warmup-epochs 1 --batch-size 32 --img-size 64 \
        --queue-size 512 --vis-every 1                                                 # CPU

A healthy log: during warm-up it is MoCo v2 (loss from log(K+1) = 9.70); when concepts switch on,
`loss_concept` starts near its own chance level and falls, `shared_concepts` (the concepts per
image found in both views, the ones contrasted) stays well above 1 (about 5-8 for K = 8), and
concepts_epochNNN.png shows regions that follow tissue structure and sharpen over training.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate

from common import cli
from common import data as cdata
from common import dist as cdist
from common import pictures
from common import train as ctrain
from common.crop import resize_crop
from common.masks import FHCache, felzenszwalb, grid_labels, kmeans, one_hot
from common.models import resnet_maps
from moco import MoCo, augmentation, check_moco_args, info_nce, lr_at, moco_logits

# ----------------------------------------------------------------------------- concept geometry
def union_box(boxes):
    """(V, 4) or list of (4,) boxes (x0, y0, x1, y1) -> their bounding box (paper: x_r)."""
    b = torch.stack(list(boxes)) if not torch.is_tensor(boxes) else boxes
    return torch.cat([b[..., :2].min(0).values, b[..., 2:].max(0).values])


def _cover(lo, hi, n_out, n_in):
    """(B,) intervals [lo, hi) in input-cell units, split into n_out equal cells -> (B, n_out,
    n_in): the length of input cell r = [r, r + 1) inside each output cell (area weights)."""
    t = torch.arange(n_out + 1, device=lo.device, dtype=lo.dtype) / n_out
    edges = lo[:, None] + (hi - lo)[:, None] * t
    a, b = edges[:, :-1, None], edges[:, 1:, None]
    r = torch.arange(n_in, device=lo.device, dtype=lo.dtype)
    return (torch.minimum(b, r + 1) - torch.maximum(a, r)).clamp_min(0)


def view_masks(ref_labels, ref_boxes, view_boxes, flips, size, num_ids=None):
    """Concepts of the reference view as seen by each view.

    ref_labels (B, R, R) ids in [0, num_ids) (-1 = no concept; num_ids default: the largest id
    + 1, read from the device) over the reference crop ref_boxes (B, 4); view_boxes (B, 4) in
    original-image pixels, flips (B,) -> (B, size, size): each view cell takes the concept
    covering most of its area (ties -> lowest id), mirrored when flipped. The official code
    rounds the crop to whole reference cells before adaptive pooling; here the areas are exact.
    Always fp32 (under --amp too: the 1e-6 tie-break is below bf16's resolution).
    """
    with torch.autocast(ref_labels.device.type, enabled=False):
        return _view_masks(ref_labels, ref_boxes, view_boxes, flips, size, num_ids)


def _view_masks(ref_labels, ref_boxes, view_boxes, flips, size, num_ids):
    B, R, _ = ref_labels.shape
    if num_ids is None:
        num_ids = int(ref_labels.max()) + 1 if ref_labels.numel() else 0
    k = num_ids + 1
    onehot = one_hot(ref_labels.long() + 1, k, torch.float32).permute(0, 3, 1, 2)  # (B, k, R, R), 0 = none
    rb, vb = ref_boxes.float(), view_boxes.float()
    sx, sy = R / (rb[:, 2] - rb[:, 0]), R / (rb[:, 3] - rb[:, 1])
    wy = _cover((vb[:, 1] - rb[:, 1]) * sy, (vb[:, 3] - rb[:, 1]) * sy, size, R)   # (B, size, R)
    wx = _cover((vb[:, 0] - rb[:, 0]) * sx, (vb[:, 2] - rb[:, 0]) * sx, size, R)
    area = torch.einsum("bir,bkrc,bjc->bkij", wy, onehot, wx)
    # "none" loses ties against any real concept, real concepts tie towards the lowest id
    area = torch.cat([area[:, 1:], area[:, :1] - 1e-6], 1)
    labels = area.argmax(1)
    labels = torch.where(labels == k - 1, -1, labels)
    flips = torch.as_tensor(flips, device=labels.device).bool()
    return torch.where(flips[:, None, None], labels.flip(2), labels)


def shared_prototypes(feat_q, feat_k, lab_q, lab_k, num_ids=None):
    """Masked average pooling of every concept present in both views.

    feat (B, C, S) C5 features, lab (B, S) concept ids in [0, num_ids) (-1 none; default: the
    largest + 1) -> (n, C), (n, C) mean feature of each shared concept in the query and key
    view, and (n,) its image index."""
    k = (num_ids if num_ids is not None else int(max(lab_q.max(), lab_k.max())) + 1) + 1
    oq = one_hot(lab_q, k - 1, feat_q.dtype)  # (B, S, k-1)
    ok = one_hot(lab_k, k - 1, feat_k.dtype)
    nq, nk = oq.sum(1), ok.sum(1)                             # (B, k-1) cells per concept
    shared = (nq > 0) & (nk > 0)
    pq = torch.bmm(oq.transpose(1, 2), feat_q.transpose(1, 2)) / nq.clamp_min(1)[..., None]
    pk = torch.bmm(ok.transpose(1, 2), feat_k.transpose(1, 2)) / nk.clamp_min(1)[..., None]
    img, concept = shared.nonzero().unbind(1)  # one host read: how many are shared
    return pq[img, concept], pk[img, concept], img


def fixed_count(keys, n):
    """Exactly n keys to enqueue (paper B.1): a random subset when there are more, random
    duplicates of real keys when fewer; never zero padding (pitfall P13)."""
    if keys.shape[0] >= n:
        return keys[torch.randperm(keys.shape[0], device=keys.device)[:n]]
    extra = torch.randint(keys.shape[0], (n - keys.shape[0],), device=keys.device)
    return torch.cat([keys, keys[extra]])


def stage_map(net, x, stage):
    """Feature map f_stage of a `resnet()` network: f1 = the stem's conv-BN-ReLU (stride 2,
    before max-pool: OpenSelfSup's out_indices 0, ConCL's cluster_indice 0), f2..f5 = layer1..4."""
    if stage == 1:
        return net.relu(net.bn1(net.conv1(x)))
    return resnet_maps(net, x, upto=stage)[-1]


# ----------------------------------------------------------------------------- data
def crop_labels(full, box, res, max_concepts):
    """(H, W) int label map of the whole tile -> (res, res) over the reference box (nearest),
    ids renumbered by area (largest = 0); ids beyond max_concepts become -1 (no concept)."""
    crop = np.asarray(Image.fromarray(full.astype(np.int32)).resize(
        (res, res), Image.NEAREST, box=tuple(box.tolist())))
    ids, inverse, counts = np.unique(crop, return_inverse=True, return_counts=True)
    rank = np.empty_like(counts)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
    out = rank[inverse].reshape(crop.shape)
    return torch.from_numpy(np.where(out < max_concepts, out, -1).astype(np.int64))


class ConceptViews(cdata.MultiViewDataset):
    """MoCo-v2 query and key views plus the reference view x_r (the tile cropped to the union
    box, resized, no photometric augmentation) and, for fh/file concepts, the concept label map
    over x_r at the reference resolution."""

    def __init__(self, base, views, seed, args):
        super().__init__(base, views, seed)
        self.args = args
        if args.concept == "fh" and args.fh_input == "tile":  # maps packed beside a store: read
            self.fh = FHCache(args.mask_cache or Path(args.output_dir) / "masks",
                              args.fh_scale, args.fh_scale, store=getattr(args, "data_store", None))

    def name(self, i):
        """Tile stem (NCT names are unique), or the index for generated data."""
        paths = getattr(self.base, "paths", None)
        return Path(paths[i]).stem if paths else f"{i:06d}"

    def augment(self, img, i):
        return self.extras(super().augment(img, i), i, (img.height, img.width), lambda: img)

    def draw_params(self, tile, i):  # --device-crop: the same numbers and labels, no x_r
        return self.extras(super().draw_params(tile, i), i, tile.shape[:2],
                           lambda: Image.fromarray(np.asarray(tile)))

    def extras(self, s, i, hw, img):
        """x_r's box, x_r (under --device-crop cropped on the device instead: reference_view)
        and the fh/file concept labels over it; img: a callable giving the PIL tile."""
        a = self.args
        s["ref_box"] = box = union_box(s["boxes"])
        ref = lambda: cdata.pil_to_uint8(img().resize((a.img_size, a.img_size), Image.BICUBIC,
                                                      box=tuple(s["ref_box"].tolist())))
        if not self.device_crop:
            s["ref"] = ref()
        if a.concept == "fh" and a.fh_input == "reference":
            # The paper (sections 3.2, 4.3): FH segments x_r itself, as the network sees it.
            # A fresh x_r every step, so no cache: ~30 ms per 224 px tile in the loader workers
            # (under --device-crop too: FH needs x_r's pixels here).
            x_r = s["ref"] if "ref" in s else ref()
            full = felzenszwalb(x_r.permute(1, 2, 0).numpy(), a.fh_scale, a.fh_scale)
            box = torch.tensor([0, 0, a.img_size, a.img_size])
        elif a.concept == "fh":
            full = self.fh(self.fh.key(self.base, i, a.data_root, self.seed), img)  # rel. path
        elif a.concept == "file":
            path = Path(a.concept_dir) / f"{self.name(i)}.png"
            try:
                full = np.asarray(Image.open(path))
            except OSError as e:
                raise cdata.DataError(f"--concept-dir: cannot read {path} ({e.strerror or e})") from None
            full = full[..., 0] if full.ndim == 3 else full
            if full.shape != tuple(hw):
                raise cdata.DataError(f"{path}: mask {full.shape[::-1]} != image {tuple(hw)[::-1]}")
            if a.concept_threshold is not None:  # grey saliency -> binary: 1 salient, 0 not
                full = (full >= a.concept_threshold).astype(np.int32)
        else:
            return s
        # in the loader under --device-crop too: a nearest crop to a small map (R = S/16), and
        # the renumbering by area is a per-sample sort
        s["ref_labels"] = crop_labels(full, box, a.img_size // 16, a.max_concepts)
        return s


def reference_view(batch, size):
    """x_r: the loader's, or (--device-crop) cropped on the tiles' device, Pillow's pixels."""
    if "ref" in batch:
        return batch["ref"]
    return resize_crop(batch["tile"], batch["ref_box"], size, Image.BICUBIC)


# ----------------------------------------------------------------------------- the model
class ConCL(MoCo):
    def __init__(self, args):
        super().__init__(args.arch, "v2", args.dim, args.queue_size, args.moco_m, args.temperature,
                         args.bn_splits, args.init)
        self.args = args
        self.register_buffer("concept_queue", F.normalize(torch.randn(args.queue_size, args.dim), dim=1))
        self.register_buffer("concept_ptr", torch.zeros((), dtype=torch.long))

    @staticmethod
    def encode(encoder, x):
        """-> C5 map (N, C, h, w) and the normalised instance embedding."""
        c5 = resnet_maps(encoder[0], x)[-1]
        return c5, F.normalize(encoder[1](c5.mean((2, 3))), dim=1)

    @torch.no_grad()
    def reference_labels(self, batch, ref, device):
        """(B, R, R) concept ids over the reference view for the chosen concept source."""
        a = self.args
        if a.concept == "grid":  # one map cell per grid cell: each covers exactly 1/s^2 of x_r
            g = a.grid_size
            return grid_labels(g, g).to(device).expand(len(batch["ref_box"]), g, g)
        if a.concept in ("fh", "file"):
            return batch["ref_labels"].to(device)
        # b-ConCL: cluster the momentum encoder's stage-f features of x_r (BN in train mode on
        # the reference batch, as the official code)
        f = stage_map(self.encoder_k[0], ref, a.cluster_stage)  # (B, C, R, R)
        B, _, h, w = f.shape
        return kmeans(f.flatten(2).transpose(1, 2), a.num_concepts).view(B, h, w)

    @torch.no_grad()
    def enqueue_concepts(self, keys):
        keys = cdist.concat_all_gather(keys)[-self.K:]  # the same fixed count from every process
        ptr = self.advance("concept_ptr", keys.shape[0])
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % self.K
        self.concept_queue[idx] = keys.to(self.concept_queue.dtype)  # a ring, as the official code

    def forward(self, x_q, x_k, batch=None, ref=None, concepts=True):
        c5_q, q = self.encode(self.encoder_q, x_q)
        with torch.no_grad():
            self.momentum_update()
            x_k, unshuffle = cdist.batch_shuffle(x_k)
            c5_k, k = self.encode(self.encoder_k, x_k)
            k = cdist.batch_unshuffle(k, unshuffle)
            if not self.args.official_key_order:  # D1: key concepts from the same image
                c5_k = cdist.batch_unshuffle(c5_k, unshuffle)
        logits = moco_logits(q, k, self.queue.clone(), self.T)
        zeros = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss_inst = F.cross_entropy(logits, zeros)
        parts = {"loss_instance": loss_inst.detach(), "acc": 100 * (logits.argmax(1) == 0).float().mean()}
        self.enqueue(k)
        if not concepts:  # warm-up: plain MoCo v2
            return loss_inst, {"loss": loss_inst.detach(), **parts}

        with torch.no_grad():
            dev = x_q.device
            ref_labels = self.reference_labels(batch, ref, dev)
            size, ids = c5_q.shape[-1], self.args.concept_ids
            ref_box = batch["ref_box"].to(dev)
            lab_q, lab_k = (view_masks(ref_labels, ref_box, batch["boxes"][v].to(dev),
                                       batch["flips"][v].to(dev), size, ids) for v in (0, 1))
        # the one host synchronisation of a step: how many concepts both views share
        pq, pk, _ = shared_prototypes(c5_q.flatten(2), c5_k.flatten(2), lab_q.flatten(1),
                                      lab_k.flatten(1), ids)
        cq = F.normalize(self.encoder_q[1](pq), dim=1)
        with torch.no_grad():
            ck = F.normalize(self.encoder_k[1](pk), dim=1)
        if cq.shape[0]:
            loss_con = info_nce(cq, ck, self.concept_queue.clone(), self.T)
            acc_con = (moco_logits(cq, ck, self.concept_queue, self.T).argmax(1) == 0).float().mean()
        else:  # no shared concept on this process: nothing to contrast (keeps DDP's graph)
            loss_con, acc_con = 0.0 * cq.sum(), torch.zeros((), device=cq.device)
        n_fix = (self.args.concept_ids if self.args.concept_ids <= 8 else 4) * x_q.shape[0]
        self.enqueue_concepts(fixed_count(ck if ck.shape[0] else k, n_fix))
        lam = self.args.concept_weight
        loss = lam * loss_con + (1 - lam) * loss_inst
        return loss, {"loss": loss.detach(), **parts, "loss_concept": loss_con.detach(),
                      "acc_concept": 100 * acc_con, "shared_concepts": cq.shape[0] / x_q.shape[0]}


# ----------------------------------------------------------------------------- seeing concepts
def sheet(rows, headers, cell, captions=(), note=""):
    """Rows of equal (cell, cell, 3) pictures under a header naming each column and a note; a
    caption line under each row."""
    from PIL import ImageDraw
    line = 14
    parts = []
    for r, row in enumerate(rows):
        parts.append(np.concatenate(row, 1))
        if r < len(captions):
            strip = Image.new("RGB", (parts[-1].shape[1], line + 4), "white")
            ImageDraw.Draw(strip).text((4, 2), captions[r], fill="black")
            parts.append(np.asarray(strip))
    grid = np.concatenate(parts, 0)
    top = Image.new("RGB", (grid.shape[1], 2 * line + 8 if note else line + 4), "white")
    draw = ImageDraw.Draw(top)
    for c, h in enumerate(headers):
        draw.text((c * cell + 4, 3), h, fill="black")
    if note:
        draw.text((4, line + 5), note, fill=(90, 90, 90))
    return Image.fromarray(np.concatenate([np.asarray(top), grid], 0))


@torch.no_grad()
def save_concepts(model, batch, args, path, cell=None):
    """PNG, one row per tile: x_r, x_r with concepts, query view and key view with the concepts
    mapped into them (the paper's Fig. 3 / A.1); columns at least 112 px wide. Under each row:
    the concepts of x_r and how many both views share (the log's `shared_concepts`)."""
    was_training = model.training
    model.eval()  # running BN statistics: a few tiles need no BN groups
    dev = next(model.parameters()).device
    cell = cell or max(112, args.img_size)
    ref = reference_view(batch, args.img_size)
    labels = model.reference_labels(batch, cdata.to_device(ref, dev), dev).cpu()
    size = args.img_size // 32
    rows, captions = [], []
    for b in range(ref.shape[0]):
        tile = pictures.enlarge(pictures.to_rgb(ref[b]), cell)
        row = [tile, pictures.paint(tile, labels[b])]  # light tint + outlines: tissue readable
        seen = []
        for v in range(2):
            lab = view_masks(labels[b:b + 1], batch["ref_box"][b:b + 1], batch["boxes"][v][b:b + 1],
                             batch["flips"][v][b:b + 1], size, args.concept_ids)[0]
            row.append(pictures.paint(pictures.enlarge(pictures.to_rgb(batch["views"][v][b]),
                                                       cell), lab))
            seen.append(set(lab[lab >= 0].tolist()))
        rows.append(row)
        n_ref = len(set(labels[b][labels[b] >= 0].tolist()))
        captions.append(f"{n_ref} concepts in x_r; {len(seen[0] & seen[1])} in both views "
                        f"(contrasted), {len(seen[0] ^ seen[1])} in one view only")
    note = "one colour = one concept, the same in every column of a row (colours are per tile)"
    sheet(rows, ["reference x_r", f"concepts ({args.concept})", "query view", "key view"],
          cell, captions, note).save(path)
    model.train(was_training)
    return path


# ----------------------------------------------------------------------------- training
GEOMETRY = ("ref_box", "boxes", "flips", "ref_labels")  # what forward() reads of a batch


def concept_inputs(batch, device):
    """The crop geometry (and fh/file label maps) forward() needs, on the device. Only these:
    DDP copies every tensor it is given to the device, the batch's images included."""
    move = lambda t: t.to(device, non_blocking=True) if torch.is_tensor(t) else [move(u) for u in t]
    return {k: move(batch[k]) for k in GEOMETRY if k in batch}


def train_one_epoch(model, optimizer, trainer, run, args):
    concepts = trainer.epoch >= args.warmup_epochs
    for step, batch in trainer.steps(trainer.epoch):
        lr = ctrain.set_lr(optimizer, lr_at(args, trainer.global_step(), trainer.steps_per_epoch))
        x_q, x_k = (run.images(v) for v in batch["views"])
        feeds_ref = concepts and args.concept == "kmeans"  # b-ConCL only: x_r to the network
        ref = run.images(reference_view(batch, args.img_size)) if feeds_ref else None
        geometry = concept_inputs(batch, run.device) if concepts else None
        with run.autocast():
            loss, parts = model(x_q, x_k, geometry, ref, concepts)
        trainer.backward_step(optimizer, loss, parts)
        trainer.update(parts, lr)


def get_args(argv=None):
    p = cli.parser(__doc__)
    ctrain.add_common_args(p, batch_size=256, lr=0.03, epochs=200, weight_decay=1e-4)
    g = p.add_argument_group("moco v2 (the instance branch)")
    g.add_argument("--queue-size", type=cli.positive_int, default=16384, help="instance and concept queues")
    g.add_argument("--moco-m", type=cli.unit_float, default=0.999, help="key encoder momentum")
    g.add_argument("--temperature", type=cli.positive_float, default=0.2, help="both losses")
    g.add_argument("--dim", type=cli.positive_int, default=128, help="embedding width (instance and concept)")
    g.add_argument("--blur-kernel", type=cli.odd_kernel, default=None, help="as moco.py")
    g.add_argument("--bn-splits", type=cli.positive_int, default=None, help="as moco.py (docs/methods.md D8)")
    g = p.add_argument_group("concl")
    g.add_argument("--concept", choices=["grid", "fh", "kmeans", "file"], default="kmeans",
                   help="g-ConCL, fh-ConCL, b-ConCL, or masks from --concept-dir (bas-ConCL)")
    g.add_argument("--grid-size", type=cli.positive_int, default=5, help="g-ConCL s (best in Table 1)")
    g.add_argument("--fh-scale", type=cli.positive_int, default=500, help="fh-ConCL: scale = min_size = s")
    g.add_argument("--mask-cache", default=None, help="FH cache folder (default OUTPUT/masks); "
                   "--fh-input tile with --data-store reads maps packed beside the store first")
    g.add_argument("--fh-input", choices=["reference", "tile"], default="reference",
                   help="fh-ConCL segments the reference view x_r each step, as the paper "
                        "(the released code has no fh-ConCL); tile: FH once per original tile, "
                        "cached in --mask-cache and cropped to x_r (docs/methods.md D3; segments "
                        "1.3-1.9x coarser for the same s, no FH cost per step)")
    g.add_argument("--concept-dir", default=None, help="PNG label maps named <tile stem>.png")
    g.add_argument("--concept-threshold", type=cli.nonneg_int, default=None,
                   help="file: binarise grey maps, value >= T is concept 1, else 0 (bas-ConCL's "
                        "binary saliency; BASNet outputs are grey). Default: each value an id")
    g.add_argument("--max-concepts", type=cli.positive_int, default=64,
                   help="fh/file: keep the largest N segments of the reference view")
    g.add_argument("--num-concepts", type=cli.positive_int, default=8, help="b-ConCL K")
    g.add_argument("--cluster-stage", type=int, choices=[1, 2, 3, 4, 5], default=4,
                   help="b-ConCL clusters f_i of x_r (Table 4c): f1 the stem (stride 2, before "
                        "max-pool, OpenSelfSup's out_indices 0), f2-f5 layer1-layer4")
    g.add_argument("--concept-weight", type=cli.unit_float, default=1.0,
                   help="lambda in L = (1 - lambda) L_instance + lambda L_concept (Table 4a)")
    g.add_argument("--warmup-epochs", type=cli.nonneg_int, default=20, help="instance loss only")
    g.add_argument("--official-key-order", action="store_true",
                   help="reproduce the released code, which pools key concepts from the "
                        "shuffle-BN-permuted (wrong) image (docs/methods.md 6.7); default pairs the same image")
    g.add_argument("--vis-every", type=cli.nonneg_int, default=10, help="concept PNG every N epochs (0: off)")
    g.add_argument("--show-concepts", type=cli.nonneg_int, default=0, metavar="N",
                   help="write concepts.png for N tiles with the run's checkpoint, then exit")
    p.set_defaults(resume_keys=("concept", "queue_size", "dim"))
    args = p.parse_args(argv)
    args.version, args.schedule = "v2", "cos"
    if args.concept == "file" and not args.concept_dir:
        p.error("--concept file needs --concept-dir")
    if args.concept_threshold is not None and args.concept != "file":
        p.error("--concept-threshold applies to --concept file only")
    args.concept_ids = {"grid": args.grid_size ** 2, "kmeans": args.num_concepts}.get(
        args.concept, args.max_concepts)
    return args


def main():
    args = get_args()
    run = ctrain.Run(args, "concl")
    check_moco_args(args, run)
    if args.img_size % 32:
        raise cdata.DataError(f"--img-size {args.img_size}: use a multiple of 32 (C5 grid)")

    view = augmentation("v2", args.img_size, args.blur_kernel)
    dataset = ConceptViews(cdata.build_dataset(args), [view, view], args.seed, args)
    loader, sampler = cdata.pretrain_loader(dataset, args.batch_size, args.workers, args.seed,
                                            run.device)
    model = ConCL(args).to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.scaled_lr, momentum=0.9,
                                weight_decay=args.weight_decay)
    trainer = ctrain.Trainer(run, model, optimizer, loader, sampler, model.encoder_q[0],
                             extra_log={"chance_loss": math.log(args.queue_size + 1)})

    def shown(n):  # the sheets' tiles; --device-crop: views as training crops them (no colour ops)
        b = default_collate([dataset[i] for i in range(min(n, len(dataset)))])
        return {**b, "views": trainer.device_aug.views(b)} if "tile" in b else b
    if args.show_concepts:
        if not trainer.ckpt_path.exists():
            raise cdata.DataError(f"--show-concepts: no checkpoint in {run.out}")
        if run.main:
            print(save_concepts(model, shown(args.show_concepts), args, run.out / "concepts.png"))
        return
    vis = shown(8) if run.main else None
    run.print(f"ConCL ({args.concept}) {args.arch}: {len(dataset)} images, global batch "
              f"{run.global_batch} = {run.world} x {args.batch_size}, lr {args.scaled_lr:.4g}, "
              f"T {args.temperature}, K {args.queue_size}, lambda {args.concept_weight} after "
              f"{args.warmup_epochs} warm-up epochs, {args.concept_ids} concept ids, "
              f"{'official (shuffled)' if args.official_key_order else 'same-image'} key concepts, "
              f"output {run.out}")
    ddp_model = run.wrap(model)
    for epoch in trainer.epochs():
        train_one_epoch(ddp_model, optimizer, trainer, run, args)
        if run.main and args.vis_every and (epoch + 1) % args.vis_every == 0:
            save_concepts(model, vis, args, run.out / f"concepts_epoch{epoch:03d}.png")


if __name__ == "__main__":
    ctrain.main_guard(main)
