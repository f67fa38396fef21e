"""Mask R-CNN fine-tuning throughput at the GlaS training size, and what a schedule costs.

One training iteration (resize, forward, losses, backward, SGD step) of finetune_maskrcnn.py's
detector on GlaS-sized fields (775 x 522, shortest edge 522 as the top of the training range;
demo glands drawn at that size), against its backbone-only bound (ResNet + FPN forward and
backward on the same resized batch): the ratio is what the RPN and the box and mask heads add.
Also: test-time ms per image (100 detections, masks pasted at full size) and COCO evaluation.

    python benchmarks/finetune_time.py                  # paper heads (512 RoIs, 1000 proposals)
    python benchmarks/finetune_time.py --quick          # seconds: smaller fields and budgets

Nothing here is asserted: timings belong in README, measured on a named machine.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.step_time import machine, sync, time_it  # noqa: E402
from common.detection import (build_detector, coco_metrics, gt_record, pred_record,  # noqa: E402
                              set_mode)
from common.glands import demo_glands, instances  # noqa: E402


def fields(n, w, h, device):
    """GlaS-sized demo fields (the square field cropped to w x h) with their targets."""
    out = []
    for i in range(n):
        img, label = demo_glands(i, 0, max(w, h))
        img, label = img[:h, :w], label[:h, :w]
        masks, boxes, _ = instances(label)
        out.append((torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255).to(device),
                    {"boxes": torch.from_numpy(boxes).to(device),
                     "labels": torch.ones(len(boxes), dtype=torch.int64, device=device),
                     "masks": torch.from_numpy(masks).to(device)}))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=2, help="images per process (Detectron2's "
                   "16 on 8 GPUs is 2 per GPU)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, nargs=2, default=(775, 522), metavar=("W", "H"))
    p.add_argument("--rois-per-image", type=int, default=512)
    p.add_argument("--proposals", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="388 x 261 fields, 64 RoIs, 200 "
                   "proposals, 1 + 2 steps; flags given beside it win")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args()
    if a.quick:  # new defaults, then parse again: what the command line says explicitly wins
        p.set_defaults(size=(388, 261), rois_per_image=64, proposals=200, warmup=1, steps=2)
        a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    w, h = a.size
    model, _ = build_detector("maskrcnn", a.arch, [h], h, rois_per_image=a.rois_per_image,
                              proposals=a.proposals)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # tiny lr: stay finite
    batch = fields(a.batch_size, w, h, device)
    images, targets = [b[0] for b in batch], [b[1] for b in batch]

    def step():
        set_mode(model, True)
        loss = sum(model(images, [dict(t) for t in targets]).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def backbone_step():
        x, _ = model.transform(images)
        loss = sum(f.float().mean() for f in model.backbone(x.tensors).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    print(f"# Mask R-CNN {a.arch}-FPN fine-tuning: {machine(device)}")
    print(f"# {a.batch_size} fields of {w} x {h} per step, {a.rois_per_image} RoIs and "
          f"{a.proposals} proposals per image, median of {a.steps} steps\n")
    t_step = time_it(step, device, a.warmup, a.steps)
    t_bound = time_it(backbone_step, device, a.warmup, a.steps)

    set_mode(model, False)
    test = fields(4, w, h, device)
    outs, times = [], []
    with torch.no_grad():
        model([test[0][0]])
        for img, _ in test:
            sync(device)
            t = time.perf_counter()
            outs.append(model([img])[0])
            sync(device)
            times.append(time.perf_counter() - t)
    t_test = statistics.median(times)
    gts = [gt_record(i, {k: v.cpu() for k, v in t.items()}) for i, (_, t) in enumerate(test)]
    t = time.perf_counter()
    preds = [pred_record(i, o) for i, o in enumerate(outs)]
    coco_metrics(gts, preds)
    t_eval = (time.perf_counter() - t) / len(test)

    ims = a.batch_size / t_step
    res = {"machine": machine(device), "args": vars(a), "step_s": t_step, "bound_s": t_bound,
           "img_per_s": ims, "test_s_per_image": t_test, "coco_s_per_image": t_eval}
    print("| | value |\n|---|---|")
    print(f"| training step ({a.batch_size} images) | {t_step:.2f} s |")
    print(f"| images/s in training | {ims:.2f} |")
    print(f"| backbone + FPN only (forward + backward) | {t_bound:.2f} s |")
    print(f"| step / backbone-only bound | {t_step / t_bound:.2f}x |")
    print(f"| test, per image (up to 100 detections with masks) | {t_test:.2f} s |")
    print(f"| RLE encoding + COCO evaluation, per image | {1000 * t_eval:.0f} ms |")
    # The schedules of appendix C at global batch 16, at this machine's speed per process.
    # CRAG's fields are larger (shortest edge up to 1024): the backbone's share grows with the
    # pixels, the heads' (per RoI) does not.
    for name, iters, scale in (("GlaS 1x", 5000, 1.0), ("CRAG 1x", 15000, 1024 * 1027 / (w * h))):
        step = t_bound * scale + (t_step - t_bound)
        hours = iters * 16 / a.batch_size * step / 3600
        res[name] = hours
        print(f"| {name}: {iters} iterations x 16 images, one process at this speed | "
              f"{hours:.0f} h{' (backbone share scaled to 1024 x 1027 px)' if scale != 1 else ''} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
