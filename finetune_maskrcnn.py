"""Fine-tune Mask R-CNN (ResNet-18/50 + FPN) on GlaS or CRAG and report COCO AP: the transfer
benchmark of the ConCL paper (Yang et al., ECCV 2022, section 3.3, appendix C, Tables 1-3); or on
your own instance-labelled images (--data instances: nuclei, ...).

Any of our `backbone.pth` / `checkpoint.pth`, a torchvision ResNet file or a third-party
self-supervised checkpoint initialises the ResNet body; FPN and heads start random. Recipe
(appendix C and the official Detectron2 configs): global batch 16, SGD lr 0.02 (RetinaNet 0.01;
scaled linearly with the global batch), momentum 0.9, wd 1e-4 (none on BN), 1000-iteration
linear warm-up; GlaS 1x = 5k iterations with lr x0.1 at 4k, CRAG 1x = 15k with x0.1 at 10k and
13k; `--schedule 2x` doubles both. Each setting runs 5 times with different seeds; the paper
reports the mean.

    torchrun --nproc_per_node=8 finetune_maskrcnn.py --data glas --data-root /data/GlaS \\
        --pretrained runs/concl/backbone.pth --output-dir runs/ft-glas-concl     # Table 1 row
    python finetune_maskrcnn.py --data demo --max-iters 200 --batch-size 4 --img-size 128 --runs 1
    python -m common.glands convert-cpm --src CPM15 --out data/cpm --test image14 image15
    python finetune_maskrcnn.py --data instances --data-root data/cpm        # nuclei, your own

A healthy log: `loss` (sum of the RPN, box and mask losses) falls from about 2-3 to well under 1
within the first few hundred iterations and lr rises through the warm-up; a loss that jumps to
NaN early points at frozen or mis-loaded BN statistics. Outputs: `run<i>/metrics.json` (COCO AP,
AP50, AP75, APs/m/l for `bbox` and `segm`, in percent; GlaS also `testA` and `testB` alone),
`run<i>/model_final.pth`, `run<i>/log.jsonl`, `run<i>/vis/*.png` (predicted outlines in yellow
over ground truth in green, with a legend), and over the runs `metrics.json` (means),
`summary.json` (mean and std) and `results.md` (a table row per test set).
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import cli
from common import dist as cdist
from common import glands
from common import train as ctrain
from common.data import DataError, sample_seed, worker_init
from common.detection import (DETECTORS, IterationSampler, build_detector, detection_lr,
                              draw_predictions, evaluate, mean_std, param_groups, precise_bn,
                              set_mode)
from common.models import ARCHS, load_pretrained

# The official configs (ConCL benchmarks/detection/configs/{GlaS,CRAG}/*_R_18_FPN_1x.yaml):
# shortest-edge range in training, the test size, the 1x schedule, and Detectron2's RoI budgets.
# Demo: small and quick; its images hold 2-8 glands, so it also samples fewer RoIs, proposals
# and detections per image, which is what makes a CPU fine-tune take minutes, not hours.
# Instances (nuclei and other small objects; our choice, no paper): tens of images of a few
# hundred objects each, so 2000 iterations, up to 500 detections per image (COCO's 100 would cap
# recall on a CPM-15 tile of 292 nuclei) and anchors 8-128 px instead of Detectron2's 32-512:
# nuclei span 5-36 px (median 14-24) in the CPM-15 samples, and a 14 px nucleus overlaps a 32 px
# anchor at IoU 0.19, under the RPN's 0.3 negative threshold: it would get only its one
# best-matching anchor as a positive. At 8-128 it has a 16 px anchor at IoU 0.77.
MIN_EDGE = 32  # shortest edge, training and test: one cell of the backbone's stride-32 map
PAPER_HEADS = dict(rois_per_image=512, proposals=1000, detections=100)
D2_ANCHORS, NUCLEI_ANCHORS = (32, 64, 128, 256, 512), (8, 16, 32, 64, 128)
DATASETS = {
    "glas": dict(iters=5000, steps=(4000,), warmup=1000, train_sizes=(400, 522), test_size=522,
                 anchors=D2_ANCHORS, **PAPER_HEADS),
    "crag": dict(iters=15000, steps=(10000, 13000), warmup=1000, train_sizes=(768, 1024),
                 test_size=768, anchors=D2_ANCHORS, **PAPER_HEADS),
    "instances": dict(iters=2000, steps=(1500, 1800), warmup=200, train_sizes=(448, 576),
                      test_size=512, anchors=NUCLEI_ANCHORS, rois_per_image=512, proposals=1000,
                      detections=500),
    "demo": dict(iters=600, steps=(480,), warmup=50, train_sizes=(200, 256), test_size=256,
                 anchors=D2_ANCHORS, rois_per_image=64, proposals=200, detections=20),
}


def get_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=list(DATASETS), default="demo",
                   help="glas (test = testA + testB, 80 images; each also scored alone), crag, "
                        "instances (your own: DATA_ROOT/{train,test}/{images,masks}, see "
                        "README), demo (generated glands)")
    g.add_argument("--data-root", help="GlaS folder (or its parent), CRAG folder (or its parent), "
                   "instances folder")
    g.add_argument("--demo-size", type=cli.positive_int, default=64,
                   help="demo training fields (test fields: a quarter as many)")
    g.add_argument("--img-size", type=cli.positive_int, default=None,
                   help="test shortest edge (default: GlaS 522, CRAG 768, as the official "
                        "configs; instances 512, demo 256); the training range scales with it")
    g.add_argument("--train-sizes", type=cli.positive_int, nargs=2, default=None,
                   metavar=("LO", "HI"),
                   help="training shortest-edge range (default GlaS 400 522, CRAG 768 1024, "
                        "instances 448 576; Detectron2's COCO default would be 640 800 with "
                        "--img-size 800)")
    g.add_argument("--max-size", type=cli.positive_int, default=1333, help="longest edge cap")
    g.add_argument("--workers", type=cli.nonneg_int, default=4, help="loader processes per process")
    g = p.add_argument_group("model")
    g.add_argument("--detector", choices=DETECTORS, default="maskrcnn",
                   help="retinanet: the paper's Table 2 (boxes only)")
    g.add_argument("--arch", choices=ARCHS, default="resnet18", help="ResNet body")
    g.add_argument("--pretrained", default="random", help="random | PATH to a checkpoint")
    g.add_argument("--anchor-sizes", type=cli.positive_int, nargs=5, default=None, metavar="PX",
                   help="anchor size per pyramid level, P2-P6 (RetinaNet P3-P7, x1, x2^1/3, "
                        "x2^2/3 each); default 32 64 128 256 512 as Detectron2, instances 8 16 32 "
                        "64 128 (nuclei are 5-36 px: see DATASETS)")
    g.add_argument("--rois-per-image", type=cli.positive_int, default=None,
                   help="RoIs sampled per image for the box/mask heads (default 512; demo 64)")
    g.add_argument("--proposals", type=cli.positive_int, default=None,
                   help="RPN proposals kept per image after NMS (default 1000; demo 200)")
    g.add_argument("--detections", type=cli.positive_int, default=None,
                   help="detections per test image, also COCO's maxDets when above 100 (default "
                        "100; instances 500; demo 20)")
    g = p.add_argument_group("training")
    g.add_argument("--schedule", default="1x", help="0.5x, 1x, 2x, 3x, 5x: scales iterations "
                   "and lr steps (appendix C). 1x: GlaS 5000 (x0.1 at 4000), CRAG 15000 (10000, "
                   "13000), instances 2000 (1500, 1800; warm-up 200)")
    g.add_argument("--max-iters", type=cli.positive_int, default=None,
                   help="override the schedule's length (steps and warm-up scale with it): smoke "
                        "runs")
    g.add_argument("--batch-size", type=cli.positive_int, default=None, help="images per process "
                   "(default 16 / number of processes: the paper's global batch 16). The lr "
                   "scales with the global batch, the number of iterations does not")
    g.add_argument("--lr", type=cli.positive_float, default=None, help="lr at global batch 16, "
                   "scaled linearly (default 0.02 for Mask R-CNN, 0.01 for RetinaNet: the "
                   "official configs)")
    g.add_argument("--momentum", type=cli.unit_float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=cli.nonneg_float, default=1e-4,
                   help="not applied to BN parameters")
    g.add_argument("--precise-bn", type=cli.nonneg_int, default=200,
                   help="batches to recompute BN statistics over before testing (TEST.PRECISE_BN "
                        "in the official configs); 0 = off")
    g.add_argument("--runs", type=cli.positive_int, default=5, help="independent fine-tunings "
                   "(seeds seed..seed+runs-1); the paper reports the mean of 5")
    g.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of the first run")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (on CUDA; on the CPU too, as the tests' twin)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=None,
                   help="default runs/finetune_<data>_<pre-training>[_retinanet], the pre-training "
                        "named by the checkpoint's folder (runs/concl/backbone.pth -> concl)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate each run's model_final.pth again and rewrite the metrics")
    g.add_argument("--vis", type=cli.nonneg_int, default=4,
                   help="test images drawn with predictions per run")
    g.add_argument("--log-every", type=cli.positive_int, default=20,
                   help="iterations per log.jsonl line")
    g.add_argument("--ckpt-every", type=cli.positive_int, default=500,
                   help="iterations per checkpoint")
    g.add_argument("--stop-after-steps", type=cli.positive_int, default=None,
                   help=argparse.SUPPRESS)
    p.set_defaults(paper_batch=16)
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.01 if args.detector == "retinanet" else 0.02
    if args.output_dir is None:
        tag = pretraining_name(args.pretrained) + ("_retinanet" if args.detector == "retinanet" else "")
        args.output_dir = f"runs/finetune_{args.data}_{tag}"
    for k in PAPER_HEADS:
        if getattr(args, k) is None:
            setattr(args, k, DATASETS[args.data][k])
    if args.anchor_sizes is None:
        args.anchor_sizes = list(DATASETS[args.data]["anchors"])
    return args


def pretraining_name(spec):
    """runs/concl/backbone.pth -> concl; a file elsewhere -> its stem; random -> random."""
    path = Path(spec)
    if spec == "random" or path.parent.name in ("", "."):
        return path.stem
    return path.parent.name if path.stem in ("backbone", "checkpoint") else path.stem


# Flags a run's results depend on: a checkpoint or finished run written with others is refused
# rather than resumed or reported under this command's name.
RUN_KEYS = ("data", "detector", "arch", "pretrained", "schedule", "max_iters", "img_size",
            "train_sizes", "max_size", "lr", "global_batch", "momentum", "weight_decay", "seed",
            "rois_per_image", "proposals", "detections", "precise_bn", "demo_size", "amp",
            "anchor_sizes")
# --eval-only re-scores the same models on the same test set with the same test-time settings
# (its metrics are later reported under the training command's args.json): all but training's.
EVAL_KEYS = tuple(k for k in RUN_KEYS if k not in (
    "train_sizes", "lr", "global_batch", "momentum", "weight_decay", "rois_per_image", "precise_bn"))


def schedule(args):
    """(iterations, lr milestones, warm-up iterations) of the requested schedule."""
    d = DATASETS[args.data]
    try:
        f = float(args.schedule.rstrip("x"))
    except ValueError:
        raise DataError(f"--schedule {args.schedule!r}: use e.g. 0.5x, 1x, 2x") from None
    iters, steps, warmup = round(d["iters"] * f), [round(s * f) for s in d["steps"]], d["warmup"]
    if args.max_iters is not None:  # same shape, shorter
        r = args.max_iters / iters
        iters, steps, warmup = args.max_iters, [round(s * r) for s in steps], round(warmup * r)
    return iters, steps, min(warmup, iters)


def make_detector(args):
    return build_detector(args.detector, args.arch, args.train_sizes, args.img_size, args.max_size,
                          args.rois_per_image, args.proposals, args.detections, args.anchor_sizes)


def split_groups(test_set):
    """GlaS: Test A and Test B are also scored alone ({"testA": [indices], "testB": [...]})."""
    groups = {}
    for i, it in enumerate(test_set.items):
        m = re.match(r"(test[AB])_", it["name"]) if it.get("image") else None
        if m:
            groups.setdefault(m.group(1), []).append(i)
    return groups if len(groups) > 1 else {}


def to_device(images, targets, device):
    """uint8 images to [0, 1] floats on the device (the model normalises and resizes)."""
    return ([im.to(device, non_blocking=True).float().div_(255) for im in images],
            [{k: t[k].to(device) for k in ("boxes", "labels", "masks")} for t in targets])


def train_batches(loader, device):
    for images, targets in loader:
        yield to_device(images, targets, device)


def train_one_run(args, run, r, out, train_set):
    """Fine-tune one model (seed args.seed + r) into `out`, resuming from out/checkpoint.pth."""
    seed, device = args.seed + r, run.device
    train_set.seed = seed  # flips differ between runs, as everything else seeded by `seed`
    iters, steps, warmup = schedule(args)
    torch.manual_seed(sample_seed(seed, 2**31))  # heads and FPN: same on every rank
    model, body = make_detector(args)
    report = load_pretrained(body, args.pretrained)
    model = run.sync_bn(model).to(device)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.scaled_lr,
                                momentum=args.momentum)
    start, history, sums, ckpt = 0, [], {}, out / "checkpoint.pth"
    if ckpt.exists():
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        ctrain.check_resume_args(ckpt, ck["args"], args, RUN_KEYS)
        ctrain.unwrap(model).load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start, history, sums = ck["iter"], ck["history"], ck["sums"]
        run.print(f"run {r}: resumed at iteration {start} of {iters}: weights and optimiser state "
                  f"from {ckpt} (the run began from --pretrained {args.pretrained})")
    else:
        run.print(f"run {r}: ResNet body: {report}; FPN and heads random")
    if run.main:
        ctrain.atomic_write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    def save(it):
        if run.main:
            ctrain.atomic_save({"model": ctrain.unwrap(model).state_dict(),
                                "optimizer": optimizer.state_dict(), "iter": it,
                                "history": history, "sums": sums, "args": vars(args)}, ckpt)
        cdist.barrier()

    ddp = run.wrap(model)
    def batches(first, end):  # iterations first..end-1 of this run's stream
        sampler = IterationSampler(len(train_set), args.batch_size, run.world, run.rank, seed,
                                   first, end)
        return torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=glands.collate,
                                           num_workers=args.workers, pin_memory=run.cuda,
                                           worker_init_fn=worker_init)

    set_mode(ddp, True)
    bar = tqdm(total=iters, initial=start, desc=f"run {r}", disable=not run.main,
               dynamic_ncols=True, file=sys.stdout)
    t_end, run.in_loop = time.perf_counter(), True
    for it, (images, targets) in zip(range(start, iters), batches(start, iters)):
        t_data = time.perf_counter() - t_end
        torch.manual_seed(sample_seed(seed, it, run.rank))  # resize sizes, RoI sampling
        images, targets = to_device(images, targets, device)
        lr = detection_lr(args.scaled_lr, it, steps, warmup)
        ctrain.set_lr(optimizer, lr)
        with run.autocast():
            parts = ddp(images, targets)
        loss = sum(parts.values())
        # the flags and every loss part come to the host in one transfer: the step's only sync
        nonfinite, stop, got = run.agree(loss, {"loss": loss, **parts})
        values = {k: v for k, (_, v) in got.items()}
        if nonfinite:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "loss")
            kept = (f"{ckpt} holds the last good state" if ckpt.exists() else
                    "no checkpoint yet (lower --lr, or check --pretrained's BN statistics)")
            raise ctrain.NonFiniteLoss(f"run {r}: non-finite loss at iteration {it} ({shown}); "
                                       + kept)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.steps_this_run += 1
        dt, t_end = time.perf_counter() - t_end, time.perf_counter()
        for k, v in {**values, "lr": lr, "it_per_s": 1 / dt, "data_time": t_data}.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["n"] = sums.get("n", 0) + 1
        bar.update(1)
        bar.set_postfix_str(f"loss {values['loss']:.3f} lr {lr:.3g} {1 / dt:.2f} it/s")
        if (it + 1) % args.log_every == 0 or it + 1 == iters:
            n = sums.pop("n")
            rec = {"iter": it + 1, **{k: v / n for k, v in sums.items()}}
            history.append(rec)
            sums = {}
            if run.main:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if stop or (it + 1) % args.ckpt_every == 0:
            save(it + 1)
            if stop:
                bar.close()
                run.leave(f"iteration {it + 1}")
    bar.close()
    run.in_loop = False
    if start < iters:
        save(iters)
    # BN statistics from the batches after the schedule's end (smoke runs use fewer)
    n_bn = min(args.precise_bn, args.max_iters) if args.max_iters is not None else args.precise_bn
    torch.manual_seed(sample_seed(seed, iters, run.rank, 1))  # resize sizes in precise BN
    precise_bn(ddp, train_batches(batches(iters, iters + n_bn), device), n_bn, device)
    if run.main:
        ctrain.atomic_save(ctrain.unwrap(model).state_dict(), out / "model_final.pth")
    cdist.barrier()
    return model


def score_run(args, run, r, out, model, test_set):
    metrics = evaluate(model, test_set, run.device, masks=args.detector == "maskrcnn",
                       desc=f"run {r} test", groups=split_groups(test_set),
                       max_dets=args.detections)
    if run.main:
        ctrain.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        run.print(f"run {r}: " + "  ".join(f"{t} AP {m['AP']} AP50 {m['AP50']} AP75 {m['AP75']}"
                                           for t, m in metrics.items() if "AP" in m))
        if args.vis:
            draw_predictions(model, test_set, out / "vis", args.vis, run.device)
    cdist.barrier()
    return metrics


@torch.no_grad()
def flat(metrics, prefix=()):
    """{"bbox": {"AP": ..}, "testA": {"bbox": {..}}} -> {(t, k) or (group, t, k): value}."""
    out = {}
    for k, v in metrics.items():
        out.update(flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def summarise(args, run, all_metrics):
    """Mean and std over runs: metrics.json (means), summary.json, results.md (a table: the
    whole test set first, the paper's headline; then GlaS Test A and Test B alone)."""
    summary = {"runs": len(all_metrics), "pretrained": args.pretrained, "detector": args.detector,
               "arch": args.arch, "data": args.data, "schedule": args.schedule, "per_run": all_metrics}
    means, stds = {}, {}
    for key in flat(all_metrics[0]):
        m, sd = mean_std([flat(mt)[key] for mt in all_metrics])
        *path, last = key
        for tree, v in ((means, m), (stds, sd)):
            for part in path:
                tree = tree.setdefault(part, {})
            tree[last] = v
    summary["mean"], summary["std"] = means, stds
    types = [t for t in all_metrics[0] if "AP" in all_metrics[0][t]]
    cols = [(t, k) for t in types for k in ("AP", "AP50", "AP75")]
    groups = [g for g in all_metrics[0] if g not in types]
    name = Path(args.pretrained).parent.name or args.pretrained
    sched = args.schedule if args.max_iters is None else f"{args.max_iters} it"
    header = ("| pre-training | detector | schedule | test | "
              + " | ".join(f"{k}{'bb' if t == 'bbox' else 'mk'}" for t, k in cols) + " |\n"
              + "|---" * (4 + len(cols)) + "|\n")
    rows = []
    for g in [None, *groups]:
        m, sd = (means, stds) if g is None else (means[g], stds[g])
        test = ("A+B" if groups else "test") if g is None else g
        rows.append(f"| {name} | {args.detector} {args.arch} | {sched} | {test} | "
                    + " | ".join(f"{m[t][k]} ± {sd[t][k]}" for t, k in cols) + " |")
    summary["markdown"] = header + "\n".join(rows)
    out = Path(args.output_dir)
    ctrain.atomic_write_text(out / "metrics.json", json.dumps(means, indent=2))
    ctrain.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    ctrain.atomic_write_text(out / "results.md", summary["markdown"] + "\n")
    run.print(f"mean over {len(all_metrics)} run(s) (± std):\n{summary['markdown']}")


def main():
    args = get_args()
    run = ctrain.Run(args, "finetune", cudnn_benchmark=False)  # shapes vary: as Detectron2
    d = DATASETS[args.data]
    test_size = args.img_size or d["test_size"]
    derived = args.train_sizes is None
    if derived:  # the official range, scaled with the test size
        args.train_sizes = [round(s * test_size / d["test_size"]) for s in d["train_sizes"]]
    args.img_size = test_size
    lo, hi = args.train_sizes
    if not 0 < lo <= hi:
        raise DataError(f"--train-sizes {lo} {hi}: need 0 < LO <= HI")
    if min(lo, test_size) < MIN_EDGE:  # training would run, and AP stay 0 without a word
        what = (f"--img-size {test_size} (training range {lo}-{hi} px)" if derived else
                f"--img-size {test_size}" if test_size < MIN_EDGE else f"--train-sizes {lo} {hi}")
        raise DataError(f"{what}: shortest edges must be at least {MIN_EDGE} px (the backbone's "
                        f"stride; smaller, objects shrink to a pixel and AP is 0); default "
                        f"--img-size {d['test_size']}")
    args.train_sizes = list(range(lo, hi + 1))  # Detectron2 "range": every integer equally likely
    iters, steps, warmup = schedule(args)

    train_set = glands.build_gland_dataset(args.data, args.data_root, "train", True, args.seed,
                                           args.demo_size)
    test_set = glands.build_gland_dataset(args.data, args.data_root, "test", False, args.seed,
                                          args.demo_size)
    if len(train_set) < run.global_batch:
        raise DataError(f"{len(train_set)} training images are fewer than one global batch "
                        f"({run.global_batch}); lower --batch-size")
    run.print(f"{args.detector} {args.arch} from {args.pretrained} on {args.data}: "
              f"{len(train_set)} train / {len(test_set)} test images"
              f"{f' ({len(test_set.empty)} without glands)' if getattr(test_set, 'empty', None) else ''}"
              f", global batch {run.global_batch} = {run.world} x {args.batch_size}, lr "
              f"{args.scaled_lr:.4g}, {iters} iterations (x0.1 at {steps}, warm-up {warmup}), "
              f"shortest edge {lo}-{hi} (test {test_size}), {args.runs} run(s) -> {run.out}")
    args.global_batch = run.global_batch
    previous = run.out / "args.json"
    if previous.exists() and any(run.out.glob("run*/*")):  # results of another command?
        ctrain.check_resume_args(previous, json.loads(previous.read_text()), args,
                                 EVAL_KEYS if args.eval_only else RUN_KEYS)
    cdist.barrier()
    if run.main and not (args.eval_only and previous.exists()):  # the training command's args
        ctrain.atomic_write_text(previous, json.dumps(vars(args), indent=2, default=str))
    all_metrics = []
    for r in range(args.runs):
        out = run.out / f"run{r}"
        if run.main:
            out.mkdir(parents=True, exist_ok=True)
        cdist.barrier()
        if (out / "metrics.json").exists() and not args.eval_only:
            all_metrics.append(json.loads((out / "metrics.json").read_text()))
            run.print(f"run {r}: done before, metrics from {out / 'metrics.json'}")
            continue
        if args.eval_only:
            if not (out / "model_final.pth").exists():
                raise DataError(f"--eval-only: {out / 'model_final.pth'} does not exist")
            model, _ = make_detector(args)
            model.load_state_dict(torch.load(out / "model_final.pth", map_location="cpu"))
            model = model.to(run.device)
        else:
            model = train_one_run(args, run, r, out, train_set)
        all_metrics.append(score_run(args, run, r, out, model, test_set))
    if run.main:
        summarise(args, run, all_metrics)


if __name__ == "__main__":
    ctrain.main_guard(main)
