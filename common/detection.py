"""The detection fine-tuner's parts: the torchvision detectors configured as the ConCL
benchmark's Detectron2 configs, an iteration-based resumable batch sampler, precise BN, COCO
evaluation with pycocotools, and pictures of the predictions.

Detectron2 -> torchvision, as ConCL's `benchmarks/detection/configs/{GlaS,CRAG}/*_R_18_FPN_1x*.yaml`
(on top of Detectron2's Base-RCNN-FPN and defaults):
- ResNet body FREEZE_AT 0 and NORM SyncBN: every layer trains, BN included. FrozenBN with random or
  self-supervised weights (Detectron2's default for ImageNet weights) sent the losses to NaN
  within two iterations here. FPN NORM SyncBN as well; box head 2 FC, mask head 4 convs, no norm.
- RGB input, ImageNet mean/std, torchvision-style strides ("_moco" configs: STRIDE_IN_1X1 False).
- MIN_SIZE_TRAIN (lo, hi) sampled as a "range" (each integer equally likely, per image),
  MIN_SIZE_TEST, MAX_SIZE 1333; horizontal flip (common.glands, per (seed, pass, image)).
- Resize as Detectron2's ResizeShortestEdge: output size rounded (torchvision floors), image
  bilinear WITH antialiasing (Detectron2 resizes uint8 images with PIL, whose bilinear filter
  widens when shrinking; torchvision's interpolate without antialias differs from PIL by 2.8 grey
  levels on average at CRAG's x0.51, with it by about 0.3), masks nearest (`D2Transform`).
- Heads initialised as Detectron2 (`d2_init`): box head FCs c2_xavier_fill (kaiming_uniform a=1,
  bias 0; torchvision: nn.Linear's default), class scores normal std 0.01, box deltas normal std
  0.001 (torchvision: nn.Linear's default), mask head convs and deconv c2_msra_fill, mask logits
  normal std 0.001 (torchvision: kaiming fan_out), every bias 0. RPN head (normal 0.01), FPN
  (kaiming_uniform a=1) and RetinaNet's heads (normal 0.01, prior 0.01) already match.
- RPN: 2000 pre-NMS / 1000 post-NMS proposals per image in training (torchvision's default 2000
  post-NMS is Detectron1's per-batch number), 1000 / 1000 at test; anchors 32..512 (one size per
  level P2-P6; RetinaNet three per octave on P3-P7), ratios 0.5-2; `anchor_sizes` scales them
  (nuclei: 8..128).
- 100 detections per image, score threshold 0.05, NMS 0.5 (RetinaNet too: torchvision's 300
  would change AP against the paper's numbers). COCO AP counts at most max(100, detections)
  detections per image (COCO's 100 when detections <= 100, as the paper; above it, as
  Detectron2's COCOEvaluator(max_dets_per_image=...), with its own AP summary).
- TEST.PRECISE_BN enabled: BN statistics recomputed over 200 training batches before testing.

Still different from Detectron2 (small effects on AP, noted for anyone comparing numbers to the
paper's): RoIAlign with aligned=False and sampling ratio 2 (Detectron2: ROIAlignV2, aligned=True,
adaptive sampling); smooth-L1 box losses with beta 1/9 in RPN and box head (Detectron2: L1,
beta 0); a two-class RetinaNet head whose background class is never a target (Detectron2: one
class), its label-0 detections dropped before scoring; the image normalised before resizing
(Detectron2 resizes uint8 and rounds, then normalises: at most half a grey level apart); masks
pasted into the image by torchvision's paste_masks_in_image (28 x 28 padded by one cell, then
bilinear per box; Detectron2: grid_sample over the box), both thresholded at 0.5.
"""
import contextlib
import io
import math

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn as nn
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from tqdm import tqdm

from common import dist as cdist
from common import glands
from common.data import IMAGENET_MEAN, IMAGENET_STD, sample_seed
from common.models import resnet
from common.train import unwrap

DETECTORS = ("maskrcnn", "retinanet")


# ---------------------------------------------------------------------------------------------
# Boxes in fp32 under --amp. torchvision makes its anchors in the feature maps' dtype and decodes
# boxes in the deltas' dtype: under bf16 autocast both are bf16, whose 8-bit mantissa puts box
# corners on 2-4 px steps on a 500 px field, and ties the RPN's objectness ranking.

class FP32Anchors(AnchorGenerator):
    """Anchors in float32 whatever the feature maps' dtype (only their shapes are used)."""

    def forward(self, image_list, feature_maps):
        shapes = [torch.empty((1,) * f.dim(), device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)


class FP32BoxCoder(BoxCoder):
    """Decodes (and encodes) boxes in float32 with autocast off: torchvision's casts the
    reference boxes to the deltas' dtype."""

    def decode_single(self, rel_codes, boxes):
        with torch.autocast(rel_codes.device.type, enabled=False):
            return super().decode_single(rel_codes.float(), boxes.float())

    def encode_single(self, reference_boxes, proposals):
        with torch.autocast(proposals.device.type, enabled=False):
            return super().encode_single(reference_boxes.float(), proposals.float())


def _float_outputs(module, inputs, outputs):
    """Forward hook: the RPN head's objectness and deltas (lists of maps) in float32."""
    return tuple([t.float() for t in o] for o in outputs)


def fp32_boxes(model):
    """Every box a detector decodes, and the RPN's ranking of its proposals, in float32."""
    for owner in (model, getattr(model, "rpn", None), getattr(model, "roi_heads", None)):
        if owner is not None and isinstance(getattr(owner, "box_coder", None), BoxCoder):
            old = owner.box_coder
            owner.box_coder = FP32BoxCoder(old.weights, old.bbox_xform_clip)
    if hasattr(model, "rpn"):
        model.rpn.head.register_forward_hook(_float_outputs)
    return model


D2_ANCHORS = (32, 64, 128, 256, 512)  # Detectron2's ANCHOR_GENERATOR.SIZES, one per level


def build_detector(kind, arch, train_sizes, test_size, max_size=1333, rois_per_image=512,
                   proposals=1000, detections=100, anchor_sizes=D2_ANCHORS):
    """-> (detector, its ResNet body). One foreground class (gland, nucleus): label 1.

    rois_per_image (ROI_HEADS.BATCH_SIZE_PER_IMAGE), proposals (RPN post-NMS top-k, training and
    test) and detections (TEST.DETECTIONS_PER_IMAGE) are Detectron2's defaults; the heads' cost
    grows with them (the 4-conv mask head on every positive RoI dominates a CPU step).
    anchor_sizes: one base size per pyramid level (Mask R-CNN P2-P6; RetinaNet P3-P7, each with
    x2^(1/3) and x2^(2/3) as Detectron2's RetinaNet)."""
    body = resnet(arch)
    c5 = body.feature_dim  # 512 (R18) or 2048 (R50)
    common = dict(min_size=tuple(train_sizes), max_size=max_size, image_mean=IMAGENET_MEAN,
                  image_std=IMAGENET_STD)
    ratios = ((0.5, 1.0, 2.0),) * len(anchor_sizes)
    if kind == "maskrcnn":
        fpn = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                              [c5 // 8, c5 // 4, c5 // 2, c5], 256, norm_layer=nn.BatchNorm2d)
        model = MaskRCNN(fpn, num_classes=2, rpn_post_nms_top_n_train=proposals,
                         rpn_post_nms_top_n_test=proposals, box_batch_size_per_image=rois_per_image,
                         box_detections_per_img=detections,
                         rpn_anchor_generator=FP32Anchors(tuple((a,) for a in anchor_sizes),
                                                          ratios), **common)
    elif kind == "retinanet":  # Detectron2's RetinaNet: P3-P5 from C3-C5, P6/P7 from C5
        fpn = BackboneWithFPN(body, {f"layer{i}": str(i - 2) for i in range(2, 5)},
                              [c5 // 4, c5 // 2, c5], 256, extra_blocks=LastLevelP6P7(c5, 256),
                              norm_layer=nn.BatchNorm2d)
        sizes = tuple((a, int(a * 2 ** (1 / 3)), int(a * 2 ** (2 / 3))) for a in anchor_sizes)
        model = RetinaNet(fpn, num_classes=2, detections_per_img=detections,
                          anchor_generator=FP32Anchors(sizes, ratios), **common)
    else:
        raise ValueError(f"--detector {kind!r}: choose from {', '.join(DETECTORS)}")
    model.transform = D2Transform(**common)
    d2_init(model)
    fp32_boxes(model)
    model.train_sizes, model.test_size = tuple(train_sizes), test_size
    return model, fpn.body


def d2_resize(image, short, max_size, target=None):
    """Detectron2's ResizeShortestEdge on a (C, H, W) float image: shortest edge to `short`,
    longest capped at max_size, sizes rounded; bilinear with antialiasing (PIL's filter, which
    Detectron2 uses on uint8 images), masks nearest, boxes scaled with the image."""
    h, w = image.shape[-2:]
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                        antialias=True)[0]
    if target is not None:
        if "masks" in target:
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
    return out, target


class D2Transform(GeneralizedRCNNTransform):
    """torchvision's normalise-resize-batch with Detectron2's resize (see d2_resize). The
    training size is drawn as torchvision draws it (torch's RNG, seeded per step)."""

    def resize(self, image, target=None):
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        return d2_resize(image, short, self.max_size, target)


def d2_init(model):
    """Detectron2's initialisation of the RoI heads (module docstring); RPN, FPN and RetinaNet's
    heads are initialised as Detectron2 by torchvision already."""
    heads = getattr(model, "roi_heads", None)
    if heads is None:  # RetinaNet
        return
    for fc in (heads.box_head.fc6, heads.box_head.fc7):  # c2_xavier_fill
        nn.init.kaiming_uniform_(fc.weight, a=1)
        nn.init.zeros_(fc.bias)
    pred = heads.box_predictor
    for layer, std in ((pred.cls_score, 0.01), (pred.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    convs = [m for m in heads.mask_head.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs + [heads.mask_predictor.conv5_mask]:  # c2_msra_fill
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    nn.init.normal_(heads.mask_predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(heads.mask_predictor.mask_fcn_logits.bias)


def set_mode(model, train):
    """train(): random shortest edge from the training range; eval(): the test size."""
    m = unwrap(model)
    m.train(train)
    m.transform.min_size = m.train_sizes if train else (m.test_size,)


def detection_lr(base_lr, it, milestones, warmup_iters, warmup_factor=1e-3, gamma=0.1):
    """Detectron2's WarmupMultiStepLR: linear warm-up from warmup_factor * lr over warmup_iters,
    then x gamma at each milestone. A function of the iteration, so resume needs no state."""
    lr = base_lr * gamma ** sum(it >= m for m in milestones)
    if it < warmup_iters:
        alpha = it / warmup_iters
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def param_groups(model, weight_decay):
    """Detectron2's default WEIGHT_DECAY_NORM = 0: no decay on normalisation parameters."""
    norm, rest = [], []
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if p.requires_grad:
                (norm if isinstance(mod, nn.modules.batchnorm._NormBase) else rest).append(p)
    return [dict(params=rest, weight_decay=weight_decay), dict(params=norm, weight_decay=0.0)]


class IterationSampler(torch.utils.data.Sampler):
    """Batches of (index, pass) for iterations start..total-1 of an iteration-based schedule.

    The global index stream is a concatenation of passes over the data, each a permutation
    seeded from (seed, pass); iteration t takes stream positions [t*G, (t+1)*G) for global batch
    G, and this rank its own slice. Batches depend only on (seed, t, rank): a resumed run sees
    exactly what the interrupted one would have, whatever the number of workers. The pass plays
    the epoch's part in the dataset's augmentation seed (seed, pass, index).
    """

    def __init__(self, n, batch_size, world, rank, seed, start, total):
        self.n, self.b, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.start, self.total = seed, start, total

    def __iter__(self):
        perm = (None, None)
        for t in range(self.start, self.total):
            batch = []
            for pos in range((t * self.world + self.rank) * self.b,
                             (t * self.world + self.rank + 1) * self.b):
                if perm[0] != pos // self.n:
                    g = torch.Generator().manual_seed(sample_seed(self.seed, pos // self.n))
                    perm = (pos // self.n, torch.randperm(self.n, generator=g).tolist())
                batch.append((perm[1][pos % self.n], pos // self.n))
            yield batch

    def __len__(self):
        return self.total - self.start


@torch.no_grad()
def precise_bn(model, batches, num_iters, device):
    """Recompute BN running statistics as the exact average over `num_iters` training batches
    (Detectron2 TEST.PRECISE_BN, NUM_ITER 200): the EMA kept during training lags weights that
    moved fast, which hurts a short fine-tuning schedule. Forward through the backbone + FPN only:
    the heads have no BN."""
    m = unwrap(model)
    bns = [b for b in m.backbone.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    if not bns or num_iters <= 0:
        return
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative average: every batch weighs the same
    set_mode(model, True)
    for _, (images, _) in zip(range(num_iters), batches):
        x, _ = m.transform([im.to(device) for im in images])
        m.backbone(x.tensors)
    for b, mom in zip(bns, momenta):
        b.momentum = mom


# ---------------------------------------------------------------------------------------------
# COCO evaluation

def encode_masks(masks):
    """(N, H, W) bool -> list of COCO RLEs (counts as str, JSON-ready)."""
    rles = mask_util.encode(np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def gt_record(image_id, target):
    """Ground truth of one test image, compact (RLE masks) for COCO evaluation."""
    masks = target["masks"].numpy().astype(bool)
    h, w = masks.shape[1:]
    return {"image_id": image_id, "height": h, "width": w,
            "boxes": target["boxes"].numpy().tolist(),
            "areas": masks.sum((1, 2)).tolist(), "rles": encode_masks(masks)}


def pred_record(image_id, output, mask_threshold=0.5):
    """Detections of one image: boxes (x0, y0, x1, y1), scores, and RLE masks at 0.5. Only the
    gland class (label 1) counts: RetinaNet's sigmoid head also scores label 0 (background)."""
    keep = output["labels"] == 1 if "labels" in output else slice(None)
    rec = {"image_id": image_id, "boxes": output["boxes"][keep].cpu().tolist(),
           "scores": output["scores"][keep].cpu().tolist()}
    if "masks" in output:  # (N, 1, H, W) probabilities pasted into the image
        rec["rles"] = encode_masks((output["masks"][keep, 0] > mask_threshold).cpu().numpy())
    return rec


def _xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def summarize(ev):
    """COCOeval.summarize's six AP numbers, all at the last maxDets (pycocotools' own summarize
    takes AP over IoU 0.50:0.95 at a hard-coded 100, which is -1 once maxDets is raised)."""
    precision = ev.eval["precision"][..., -1]  # (IoU, recall, class, area) at maxDets[-1]
    iou = list(np.round(ev.params.iouThrs, 2))
    stats = []
    for t, a in ((None, 0), (0.5, 0), (0.75, 0), (None, 1), (None, 2), (None, 3)):
        p = precision[:, :, :, a] if t is None else precision[iou.index(t), :, :, a]
        stats.append(p[p > -1].mean() if (p > -1).any() else -1)
    return stats


def coco_metrics(gts, preds, iou_types=("bbox", "segm"), max_dets=100):
    """COCO AP family in percent for each iou type, from gt_record / pred_record lists.

    Areas for the S/M/L split are mask areas for both ground truth and detections in `segm`, as
    COCO and Detectron2 (a segm detection must not carry its box, or pycocotools takes the box
    area and files a thin mask under the wrong size). A metric with no ground truth
    in its size range is None (COCO reports -1). No detections at all gives zeros. At most
    max(100, max_dets) detections per image count (COCO's 100 caps recall on images of
    hundreds of nuclei; Detectron2's COCOEvaluator takes max_dets_per_image for the same).
    """
    anns, images = [], []
    for g in gts:
        images.append({"id": g["image_id"], "height": g["height"], "width": g["width"]})
        for b, a, r in zip(g["boxes"], g["areas"], g["rles"]):
            anns.append({"id": len(anns) + 1, "image_id": g["image_id"], "category_id": 1,
                         "bbox": _xywh(b), "area": a, "segmentation": r, "iscrowd": 0})
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": anns,
                       "categories": [{"id": 1, "name": "gland"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    out = {}
    for iou_type in iou_types:
        dets = []
        for p in preds:
            for i, (b, s) in enumerate(zip(p["boxes"], p["scores"])):
                d = {"image_id": p["image_id"], "category_id": 1, "score": s}
                if iou_type == "segm":
                    d["segmentation"] = p["rles"][i]
                else:
                    d["bbox"] = _xywh(b)
                dets.append(d)
        if not dets:
            out[iou_type] = {k: 0.0 for k in STAT_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
            ev.params.maxDets = [1, 10, max(100, max_dets)]
            ev.evaluate()
            ev.accumulate()
        out[iou_type] = {k: (None if v < 0 else round(100 * float(v), 3))
                         for k, v in zip(STAT_NAMES, summarize(ev))}
    return out


@torch.no_grad()
def evaluate(model, dataset, device, masks=True, desc="test", groups=None, max_dets=100):
    """COCO metrics of `model` on `dataset`: each rank runs its share, every rank scores all.
    groups: {name: [dataset indices]} also scored on their own, under metrics[name] (GlaS
    testA, testB); the top level stays the whole test set."""
    set_mode(model, False)
    rank, world = cdist.get_rank(), cdist.get_world_size()
    gts, preds = [], []
    ids = range(rank, len(dataset), world)
    for i in tqdm(ids, desc=desc, disable=rank != 0, leave=False, dynamic_ncols=True):
        image, target = dataset[i]
        out = unwrap(model)([image.to(device).float().div_(255)])[0]
        gts.append(gt_record(i, target))
        preds.append(pred_record(i, out))
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (gts, preds))
        gts = [g for part in gathered for g in part[0]]
        preds = [p for part in gathered for p in part[1]]
    types = ("bbox", "segm") if masks else ("bbox",)
    metrics = coco_metrics(gts, preds, types, max_dets)
    for name, idx in (groups or {}).items():
        keep = set(idx)
        metrics[name] = coco_metrics([g for g in gts if g["image_id"] in keep],
                                     [p for p in preds if p["image_id"] in keep], types, max_dets)
    return metrics


def draw_predictions(model, test_set, folder, n, device, score=0.5):
    """The first n test images as folder/<name>.png: predicted outlines (score >= 0.5) over the
    ground truth, with a legend (glands.draw_detections). RetinaNet: box outlines."""
    folder.mkdir(exist_ok=True)
    set_mode(model, False)
    for i in range(min(n, len(test_set))):
        image, target = test_set[i]
        o = unwrap(model)([image.to(device).float().div_(255)])[0]
        rgb = image.permute(1, 2, 0).numpy()
        keep = (o["scores"] >= score) & (o["labels"] == 1)  # RetinaNet also scores label 0
        if "masks" in o:
            pred = (o["masks"][keep, 0] > 0.5).cpu().numpy()
        else:  # RetinaNet: boxes as filled outlines
            pred = np.zeros((int(keep.sum()), *rgb.shape[:2]), bool)
            for j, (x0, y0, x1, y1) in enumerate(o["boxes"][keep].round().int().tolist()):
                pred[j, y0:y1, x0:x1] = True
        picture = glands.draw_detections(rgb, target["masks"].numpy().astype(bool), pred,
                                         o["boxes"][keep].tolist(), o["scores"][keep].tolist(),
                                         score)
        picture.save(folder / f"{target.get('name', i)}.png")


def mean_std(values):
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return round(m, 3), round(sd, 3)
