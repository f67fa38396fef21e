"""The fine-tuner's parts against hand-computed values: COCO AP of known geometries, the
appendix C schedules, the iteration sampler, the detector's configuration, checkpoint loading."""
import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import finetune_maskrcnn as ft
from common.data import DataError
from common.detection import (IterationSampler, build_detector, coco_metrics, d2_resize,
                              detection_lr, evaluate, gt_record, param_groups, pred_record)
from common.glands import demo_glands
from common.models import load_pretrained, resnet


def square_target(boxes, h=200, w=300):
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = 1
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "masks": masks}


def as_output(target, scores):
    return {"boxes": target["boxes"], "scores": torch.tensor(scores),
            "masks": target["masks"][:, None].float()}


def test_coco_perfect_predictions_give_100():
    t = square_target([(10, 20, 110, 120), (150, 30, 260, 90)])
    m = coco_metrics([gt_record(0, t)], [pred_record(0, as_output(t, [0.9, 0.8]))])
    for iou in ("bbox", "segm"):
        assert m[iou]["AP"] == m[iou]["AP50"] == m[iou]["AP75"] == 100.0
        assert m[iou]["APs"] is None  # no ground truth under 32^2 px: undefined, not 0


def test_coco_shifted_boxes_hand_computed():
    # Shifting a 100 x 100 square by 20 px: IoU = 80*100 / (120*100) = 0.667. It is a true
    # positive at the IoU thresholds 0.50, 0.55, 0.60, 0.65 and a miss at 0.70..0.95, so
    # AP50 = 100, AP75 = 0 and AP (mean over the 10 thresholds) = 40.
    gt = square_target([(10, 20, 110, 120)])
    shifted = square_target([(30, 20, 130, 120)])
    m = coco_metrics([gt_record(0, gt)], [pred_record(0, as_output(shifted, [0.9]))])
    for iou in ("bbox", "segm"):
        assert m[iou]["AP50"] == 100.0 and m[iou]["AP75"] == 0.0
        assert m[iou]["AP"] == pytest.approx(40.0, abs=0.01)


def test_coco_missed_object_and_no_detections():
    # One of two glands found (perfectly), nothing else: recall 1/2 at precision 1. COCO's
    # 101-point interpolated AP = 51/101 (recall points 0.00..0.50 have precision 1).
    t = square_target([(10, 20, 110, 120), (150, 30, 260, 90)])
    found = {"boxes": t["boxes"][:1], "masks": t["masks"][:1]}
    m = coco_metrics([gt_record(0, t)], [pred_record(0, as_output(found, [0.9]))])
    assert m["bbox"]["AP"] == pytest.approx(100 * 51 / 101, abs=0.01)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 200, 300)}
    m = coco_metrics([gt_record(0, t)], [pred_record(0, empty)])
    assert m["bbox"]["AP"] == 0.0 and m["segm"]["AP50"] == 0.0


def test_coco_segm_sizes_use_mask_areas():
    # A small gland (20 x 20 = 400 px < 32^2) found perfectly at score 0.5, and a false positive
    # at 0.9: a thin diagonal whose mask (120 px) is small but whose box (61 x 60) is medium.
    # COCO files a segm detection under its mask area, so for APs both detections count: the FP
    # ranks first, precision 1/2 at recall 1, APs = 50. Filed under its box area the FP would
    # be ignored in APs (100). For boxes the FP is medium, so bbox APs = 100 is right.
    gt = square_target([(10, 10, 30, 30)])
    fp = torch.zeros(200, 300)
    for i in range(60):
        fp[100 + i, 100 + i] = fp[100 + i, 101 + i] = 1
    out = {"boxes": torch.tensor([[10.0, 10, 30, 30], [100, 100, 161, 160]]),
           "scores": torch.tensor([0.5, 0.9]),
           "masks": torch.stack([gt["masks"][0].float(), fp])[:, None]}
    m = coco_metrics([gt_record(0, gt)], [pred_record(0, out)])
    assert m["segm"]["APs"] == 50.0 and m["segm"]["AP"] == 50.0
    assert m["bbox"]["APs"] == 100.0 and m["bbox"]["AP"] == 50.0


class FixedDetector(nn.Module):
    """Stands in for a detector in `evaluate`: returns the given output for each test image."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.calls = outputs, 0
        self.transform, self.train_sizes, self.test_size = argparse.Namespace(), (64,), 64

    def forward(self, images):
        self.calls += 1
        return [self.outputs[self.calls - 1]]


def test_evaluate_scores_test_images_without_glands():
    # GlaS/CRAG test sets may hold an image with no gland: no ground truth, and every detection
    # on it is a false positive. Image 0: one gland found at score 0.5; image 1: empty, one
    # detection at 0.9 (and one of RetinaNet's background-label detections, which must not
    # count). Precision 1/2 at recall 1 -> AP50 = 50.
    t = square_target([(10, 20, 110, 120)])
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 200, 300, dtype=torch.uint8)}
    image = torch.zeros(3, 200, 300, dtype=torch.uint8)
    hit = {**as_output(t, [0.5]), "labels": torch.tensor([1])}
    fp = {**as_output(square_target([(50, 50, 150, 150), (0, 0, 9, 9)]), [0.9, 0.95]),
          "labels": torch.tensor([1, 0])}
    m = evaluate(FixedDetector([hit, fp]), [(image, t), (image, empty)], "cpu")
    assert m["bbox"]["AP50"] == 50.0 and m["segm"]["AP50"] == 50.0
    # GlaS Test A / Test B: each group scored alone, the whole set stays at the top level
    m = evaluate(FixedDetector([hit, fp]), [(image, t), (image, empty)], "cpu",
                 groups={"testA": [0], "testB": [1]})
    assert m["bbox"]["AP50"] == 50.0 and m["testA"]["bbox"]["AP50"] == 100.0
    assert m["testB"]["segm"]["AP50"] is None  # no ground truth there: undefined (COCO's -1)


def test_coco_counts_more_than_100_detections_when_asked():
    # 150 small glands found perfectly: COCO's default maxDets 100 caps recall at 100/150
    # (AP = 100 * 67/101: recall points 0.00..0.66); nuclei images need max_dets >= 150.
    boxes = [(10 * (i % 15), 10 * (i // 15), 10 * (i % 15) + 8, 10 * (i // 15) + 8) for i in range(150)]
    t = square_target(boxes, h=110, w=160)
    out = as_output(t, [0.9] * 150)
    assert coco_metrics([gt_record(0, t)], [pred_record(0, out)])["bbox"]["AP50"] == \
        pytest.approx(100 * 67 / 101, abs=0.01)
    m = coco_metrics([gt_record(0, t)], [pred_record(0, out)], max_dets=150)["bbox"]
    assert m["AP50"] == m["AP"] == 100  # AP over 0.50:0.95 too (pycocotools' summarize: -1)


def schedule_of(data, schedule, max_iters=None):
    return ft.schedule(argparse.Namespace(data=data, schedule=schedule, max_iters=max_iters))


def test_schedules_match_appendix_c():
    assert schedule_of("glas", "1x") == (5000, [4000], 1000)
    assert schedule_of("glas", "0.5x") == (2500, [2000], 1000)
    assert schedule_of("glas", "2x") == (10000, [8000], 1000)
    assert schedule_of("crag", "1x") == (15000, [10000, 13000], 1000)
    assert schedule_of("crag", "0.5x") == (7500, [5000, 6500], 1000)
    assert schedule_of("crag", "2x") == (30000, [20000, 26000], 1000)
    assert schedule_of("glas", "1x", max_iters=50) == (50, [40], 10)
    with pytest.raises(DataError, match="--schedule"):
        schedule_of("glas", "long")


def test_detection_lr_warmup_and_steps():
    # Detectron2 WarmupMultiStepLR: factor 0.001 at 0 rising linearly to 1 at warm-up's end.
    assert detection_lr(0.02, 0, [4000], 1000) == pytest.approx(0.02 * 0.001)
    assert detection_lr(0.02, 500, [4000], 1000) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert detection_lr(0.02, 1000, [4000], 1000) == pytest.approx(0.02)
    assert detection_lr(0.02, 3999, [4000], 1000) == pytest.approx(0.02)
    assert detection_lr(0.02, 4000, [4000], 1000) == pytest.approx(0.002)
    assert detection_lr(0.02, 13000, [10000, 13000], 1000) == pytest.approx(0.0002)


def test_iteration_sampler_is_global_and_resumable():
    n, iters = 10, 7
    one = list(IterationSampler(n, 4, 1, 0, seed=3, start=0, total=iters))
    two = [list(IterationSampler(n, 2, 2, r, seed=3, start=0, total=iters)) for r in range(2)]
    for t in range(iters):  # two processes of 2 = one process of 4, batch for batch
        assert two[0][t] + two[1][t] == one[t]
    stream = [key for b in one for key in b]
    for p in range(len(stream) // n):  # every pass over the data is a permutation, tagged p
        assert sorted(i for i, _ in stream[p * n:(p + 1) * n]) == list(range(n))
        assert {q for _, q in stream[p * n:(p + 1) * n]} == {p}
    assert list(IterationSampler(n, 4, 1, 0, seed=3, start=4, total=iters)) == one[4:]
    assert one != list(IterationSampler(n, 4, 1, 0, seed=4, start=0, total=iters))


def test_detector_trains_every_layer_with_real_bn():
    model, body = build_detector("maskrcnn", "resnet18", (100, 128), 128)
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    frozen = [m for m in model.modules() if isinstance(m, torchvision.ops.FrozenBatchNorm2d)]
    assert not frozen and len(bn) == 20 + 8  # ResNet-18 body (20) + FPN lateral/output (4 + 4)
    assert all(p.requires_grad for p in model.parameters())
    assert body is model.backbone.body
    groups = param_groups(model, 1e-4)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for m in bn for p in m.parameters()}
    retina, _ = build_detector("retinanet", "resnet18", (100, 128), 128)
    assert retina.detections_per_img == 100


def test_load_pretrained_prefix_styles(tmp_path):
    src = resnet("resnet18")
    sd = src.state_dict()
    styles = {
        "backbone.pth": sd,  # ours
        "torchvision.pth": {**sd, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)},
        "moco_official.pth": {"arch": "resnet18", "state_dict": {
            **{f"module.encoder_q.{k}": v for k, v in sd.items()},
            **{f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in sd.items()}}},
        "ours_checkpoint.pth": {"model": {f"encoder_q.0.{k}": v for k, v in sd.items()},
                                "epoch": 3},
        "compiled_ddp.pth": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
        "openselfsup.pth": {"state_dict": {f"backbone.{k}": v for k, v in sd.items()}},
        "encoder.pth": {"state_dict": {f"encoder.{k}": v for k, v in sd.items()}},
        "byol_ours.pth": {"model": {**{f"online.0.{k}": v for k, v in sd.items()},
                                    **{f"target.0.{k}": torch.zeros_like(v) for k, v in sd.items()}}},
        # two complete encoders under names outside the preferred list: the twin must lose
        # whatever the set order of the prefixes (it used to depend on PYTHONHASHSEED)
        "mocov3.pth": {"state_dict": {
            **{f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in sd.items()},
            **{f"module.base_encoder.{k}": v for k, v in sd.items()}}},
        # DINO evaluates its teacher (eval_linear.py, eval_knn.py), not the student
        "dino.pth": {"student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()},
                     "teacher": {f"backbone.{k}": v for k, v in sd.items()}},
    }
    for name, obj in styles.items():
        torch.save(obj, tmp_path / name)
        net = resnet("resnet18")
        report = load_pretrained(net, str(tmp_path / name))
        assert report.startswith("loaded 120 backbone tensors"), (name, report)
        for k, v in sd.items():  # the encoder each method evaluates, never the zeroed twin
            assert torch.equal(net.state_dict()[k], v), (name, k)


def test_load_pretrained_refuses_foreign(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(DataError, match="r50.pth.*wrong --arch"):
        load_pretrained(resnet("resnet18"), str(tmp_path / "r50.pth"))
    torch.save({"state_dict": nn.Linear(3, 4).state_dict()}, tmp_path / "linear.pth")
    with pytest.raises(DataError, match="linear.pth.*holds 0 of"):
        load_pretrained(resnet("resnet18"), str(tmp_path / "linear.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(DataError, match="text.pth: not a PyTorch checkpoint"):
        load_pretrained(resnet("resnet18"), str(tmp_path / "text.pth"))
    with pytest.raises(DataError, match="no such file"):
        load_pretrained(resnet("resnet18"), str(tmp_path / "missing.pth"))
    net = resnet("resnet18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert "random" in load_pretrained(net, "random")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_resize_is_detectron2s_antialiased_pil_resize():
    # Detectron2 resizes uint8 images with PIL's bilinear filter, which widens when shrinking;
    # torchvision's interpolate does not (issue 12: 2.8 grey levels apart at CRAG's x0.51).
    # Shortest edge 256 -> 131 (x0.51): the long edge 300 * 131/256 = 153.5 rounds to 154.
    rgb, label = demo_glands(0, 0, 256)
    rgb = np.ascontiguousarray(np.concatenate([rgb, rgb[:, :44]], 1))  # 256 x 300
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()
    target = {"boxes": torch.tensor([[0.0, 0, 300, 256]]),
              "masks": torch.ones(1, 256, 300, dtype=torch.uint8)}
    out, target = d2_resize(x, 131, 1333, target)
    assert out.shape == (3, 131, 154) and target["masks"].shape == (1, 131, 154)
    assert target["boxes"].tolist() == [[0, 0, 154, 131]]
    pil = np.asarray(Image.fromarray(rgb).resize((154, 131), Image.BILINEAR), np.float32)
    ours = out.permute(1, 2, 0).numpy()
    plain = torch.nn.functional.interpolate(x[None], size=(131, 154), mode="bilinear",
                                            align_corners=False)[0].permute(1, 2, 0).numpy()
    # 0.28 here, most of it PIL's rounding to uint8 (0.25 on average); without antialiasing 0.92
    # on these smooth demo fields (2.8 on CRAG's real tissue)
    assert np.abs(ours - pil).mean() < 0.35 and np.abs(plain - pil).mean() > 0.8
    assert d2_resize(x, 512, 400)[0].shape == (3, 341, 400)  # the long edge capped: 256*400/300


def test_heads_initialised_as_detectron2():
    torch.manual_seed(0)
    model, _ = build_detector("maskrcnn", "resnet18", (64,), 64, anchor_sizes=(8, 16, 32, 64, 128))
    h = model.roi_heads
    assert h.box_predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert h.box_predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    logits = h.mask_predictor.mask_fcn_logits.weight
    assert logits.std().item() == pytest.approx(0.001, rel=0.1)
    for fc in (h.box_head.fc6, h.box_head.fc7):  # c2_xavier_fill: uniform, bound sqrt(3/fan_in)
        bound = (3 / fc.weight.shape[1]) ** 0.5
        assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.99 * bound
    deconv = h.mask_predictor.conv5_mask.weight  # c2_msra_fill: std sqrt(2 / fan_out)
    assert deconv.std().item() == pytest.approx((2 / (deconv.shape[0] * 4)) ** 0.5, rel=0.05)
    biases = [h.box_head.fc6.bias, h.box_predictor.cls_score.bias, h.box_predictor.bbox_pred.bias,
              h.mask_predictor.conv5_mask.bias, h.mask_predictor.mask_fcn_logits.bias]
    biases += [m.bias for m in h.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert all(not b.any() for b in biases)
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    retina, _ = build_detector("retinanet", "resnet18", (64,), 64, anchor_sizes=(8, 16, 32, 64, 128))
    assert retina.anchor_generator.sizes[0] == (8, 10, 12)  # x2^(1/3), x2^(2/3), truncated


def test_glas_test_a_and_b_reported_beside_the_combined_set(tmp_path):
    items = [{"name": n, "image": f"{n}.bmp"} for n in ("testA_1", "testA_2", "testB_1")]
    groups = ft.split_groups(argparse.Namespace(items=items))
    assert groups == {"testA": [0, 1], "testB": [2]}
    assert ft.split_groups(argparse.Namespace(items=items[:2])) == {}  # one group: no split
    ap = lambda v: {"bbox": {"AP": v, "AP50": v + 1, "AP75": v - 1}}
    runs = [{**ap(10), "testA": ap(12), "testB": ap(6)}, {**ap(20), "testA": ap(22), "testB": ap(16)}]
    args = argparse.Namespace(pretrained="runs/concl/backbone.pth", detector="retinanet",
                              arch="resnet18", data="glas", schedule="1x", max_iters=None,
                              output_dir=str(tmp_path))
    ft.summarise(args, argparse.Namespace(print=lambda *a: None), runs)
    means = json.loads((tmp_path / "metrics.json").read_text())
    assert means["bbox"]["AP"] == 15 and means["testA"]["bbox"]["AP50"] == 18
    assert means["testB"]["bbox"]["AP75"] == 10
    rows = (tmp_path / "results.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[3] for r in rows] == ["A+B", "testA", "testB"]
    assert rows[0].startswith("| concl | retinanet resnet18 | 1x | A+B | 15.0 ± 7.071 | 16.0 ± ")


@pytest.mark.parametrize("kind", ["maskrcnn", "retinanet"])
def test_boxes_are_decoded_in_fp32_under_bf16_autocast(kind):
    # torchvision makes anchors in the feature maps' dtype and decodes in the deltas' dtype: under
    # bf16 autocast a 500 px field's corners land on 2-4 px steps. Both must be float32 here.
    from torchvision.models.detection.image_list import ImageList
    model, _ = build_detector(kind, "resnet18", (400,), 522)
    images = ImageList(torch.zeros(1, 3, 256, 384), [(256, 384)])
    maps = [torch.zeros(1, 1, 256 // s, 384 // s, dtype=torch.bfloat16) for s in (4, 8, 16, 32, 64)]
    gen = model.rpn.anchor_generator if kind == "maskrcnn" else model.anchor_generator
    with torch.autocast("cpu", dtype=torch.bfloat16):
        anchors = gen(images, maps)[0]
    exact = gen(images, [m.float() for m in maps])[0]
    assert anchors.dtype == torch.float32 and torch.equal(anchors, exact)
    assert (anchors - anchors.bfloat16().float()).abs().max() >= 1  # what bf16 would lose
    coders = [model.rpn.box_coder, model.roi_heads.box_coder] if kind == "maskrcnn" else [model.box_coder]
    g = torch.Generator().manual_seed(0)
    deltas = (0.3 * torch.randn(len(exact), 4, generator=g)).bfloat16()
    for coder in coders:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            boxes = coder.decode(deltas, [exact])
        assert boxes.dtype == torch.float32
        torch.testing.assert_close(boxes, coder.decode(deltas.float(), [exact]), rtol=0, atol=1e-4)
    if kind == "maskrcnn":  # the RPN ranks its proposals by float32 objectness
        with torch.autocast("cpu", dtype=torch.bfloat16):
            objectness, _ = model.rpn.head([torch.randn(1, 256, 4, 4)])
        assert objectness[0].dtype == torch.float32
