"""Linear probe and weighted kNN on frozen backbone features: how good are the learned features?

Protocol of Ciga, Xu and Martel, "Self supervised contrastive learning for digital
histopathology" (Machine Learning with Applications 2022), sections 4.2 and 5.2-5.3: freeze the
ResNet at its pre-activation (global-pooled) layer, train one linear layer with Adam for 100
epochs at batch 128 and weight decay 1e-5 (ResNet-18; 1e-4 for larger ones), report macro F1, and
repeat with 5, 10, 20, 50 and 100% of the training labels, five random subsets each. NCT is
trained on NCT-CRC-HE-100K and tested on CRC-VAL-HE-7K as there. Alongside: the weighted kNN of
InstDisc / DINO (k=20, T=0.07, cosine) on the same features, which needs no training at all.

    python linear_probe.py --data nct --data-root /data/NCT-CRC-HE-100K \\
        --test-root /data/CRC-VAL-HE-7K --pretrained runs/moco/backbone.pth \\
        --label-fraction 5 10 20 50 100 --output-dir runs/probe-moco
    python linear_probe.py --data-store nct100k.store --test-store crc7k.store \\
        --pretrained runs/moco/backbone.pth --output-dir runs/probe-moco   # tiles from stores
    python linear_probe.py --data demo --img-size 64 --pretrained random --output-dir runs/probe

Features are computed once (eval mode, no augmentation, centre crop) and cached in
`<output-dir>/features.pt`; a rerun with the same backbone file, arch, size and data reuses them.
Outputs `metrics.json` (accuracy, macro_f1, knn_accuracy in percent for the largest fraction,
mean over runs; `by_fraction` mean/std; every run) and prints a markdown table.

Validation as Ciga et al. (section 4.2, appendix C.1): `--val-fraction 0.25` (default) holds out
a seeded, stratified quarter of the training tiles (25,000 of NCT-CRC-HE-100K, their split),
scores the probe's macro F1 on it after every epoch, and reports the test metrics of the best
validation epoch (`epoch` in every run: 1 = after the first; the first of equal scores). The
label fractions are drawn from the tiles left. The test set never chooses anything.

A healthy run: each run's probe loss (printed) is far below the chance level log(C); a
pre-trained backbone beats `--pretrained random` on every metric, and the paper finds the gap
widest with few labels (section 5.2). The 6 generated demo classes are easy: a random ResNet-18
at 64 px already gives the probe 99.0% (84.7% at 5% of the labels, 69.5 +- 8.3% at 1%, one tile
per class) and kNN 69% (chance 16.7%); 3 epochs of demo MoCo v2 (scripts/demo.sh) give 100.0%
and 66.9 +- 3.8% at 1%, but kNN 83.7% (77.0% on the 1% bank against 59.1%). On demo data the
probe cannot rank backbones and the kNN can; the numbers show that the pipeline works.

Deviations from Ciga et al. (the first two by default, the third on request):
- a parameter-free BatchNorm standardises the features before the linear layer (as MAE's linear
  probe), so one lr serves every backbone; the paper trains the linear layer alone;
- Adam lr 1e-3 (PyTorch's default): the paper does not give its lr (`--lr`);
- `--val-fraction 0` trains on all training tiles and reports the last epoch (this script's
  protocol before the validation split existed): more training tiles, nothing selected.
"""
import argparse
import copy
import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cli
from common import data as cdata
from common import train as ctrain
from common.data import DataError
from common.knn import (accuracy, available_cores, extract_features, knn_predict, macro_f1,
                         tile_loader)
from common.models import ARCHS, load_pretrained, resnet

METRICS = ("accuracy", "macro_f1", "knn_accuracy", "knn_macro_f1")


# ----------------------------------------------------------------------------- the probe
def stratified_subset(y, fraction, generator):
    """Indices of a random fraction (0, 1] of every class, at least one each; sorted."""
    keep = []
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        n = min(len(idx), max(1, round(fraction * len(idx))))
        keep.append(idx[torch.randperm(len(idx), generator=generator)[:n]])
    return torch.cat(keep).sort().values


def train_linear(x, y, num_classes, epochs, lr, weight_decay, batch_size, seed, val=None):
    """Adam on cross-entropy over cached features x (N, D) -> (classifier in eval mode, history).
    The parameter-free BatchNorm standardises each feature (batch statistics while training,
    running ones at test), so one lr serves every backbone, as MAE's linear probe.
    history: {"loss": mean loss per epoch, "val_macro_f1": per epoch ([] without val), "epoch":
    the 1-based epoch whose classifier is returned}. With val = (x_val, y_val) that is the epoch
    of the best validation macro F1 (the first of equals), as Ciga et al.; else the last one.
    Scoring in eval mode touches neither BN statistics nor the RNG: training is the same."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False),
                        nn.Linear(x.shape[1], num_classes)).to(x.device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
    hist, best = {"loss": [], "val_macro_f1": [], "epoch": epochs}, None
    for epoch in range(epochs):
        total, steps = torch.zeros((), device=x.device), 0  # summed on the device: no sync a step
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            if len(idx) < 2:  # BatchNorm needs two samples; a lone left-over row waits an epoch
                continue
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.detach(), steps + 1
        hist["loss"].append(total.item() / max(steps, 1))
        if val is not None:
            f1 = macro_f1(predict(clf.eval(), val[0]), val[1], num_classes)
            clf.train()
            if best is None or f1 > max(hist["val_macro_f1"]):
                best, hist["epoch"] = copy.deepcopy(clf.state_dict()), epoch + 1
            hist["val_macro_f1"].append(f1)
    if best is not None:
        clf.load_state_dict(best)
    return clf.eval(), hist


def split_off(x, y, fraction, seed):
    """A seeded stratified `fraction` of (x, y) held out -> (kept x, y), (held x, y)."""
    held = stratified_subset(y, fraction, torch.Generator().manual_seed(seed))
    rest = torch.ones(len(y), dtype=torch.bool).index_fill_(0, held, False)
    return (x[rest], y[rest]), (x[held], y[held])


@torch.no_grad()
def predict(clf, x, chunk=4096):
    return torch.cat([clf(c).argmax(1) for c in x.split(chunk)])


# ----------------------------------------------------------------------------- data and cache
def image_tree(args, root, flag):
    """A labelled (image, class) dataset from a class-folder tree; DataError names the flag."""
    if not root:
        raise DataError(f"--data {args.data} needs {flag} PATH")
    if not Path(root).is_dir():
        raise DataError(f"{flag} {root} is not an existing folder")
    if args.data == "nct":
        return cdata.nct_dataset(root, args.train_list if flag == "--data-root" else None,
                                 args.skip_bad)
    return labelled(cdata.folder_dataset(root, args.skip_bad), flag, root)


def labelled(ds, flag, where):
    if not ds.classes or -1 in ds.targets:
        raise DataError(f"{flag} {where}: every image must sit in a class sub-folder "
                        f"({ds.targets.count(-1)} directly under the root)")
    return ds


def test_store(args):
    """--test-store: the test tiles from a tile store; it must hold the kind of tiles the
    training set has (--data), and agree with --test-root if that is given."""
    ds = cdata.StoreTiles(args.test_store)
    index, flag = ds.index, f"--test-store {args.test_store}"
    if args.test_root and Path(args.test_root).resolve() != Path(index["root"]).resolve():
        raise DataError(f"--test-root {args.test_root} differs from the folder {flag} was "
                        f"packed from ({index['root']}); drop --test-root or pack another store")
    if index["data"] != args.data:
        raise DataError(f"{flag} holds --data {index['data']} tiles, the training tiles are "
                        f"--data {args.data}; pack the test tiles with --data {args.data}")
    return labelled(ds, flag, f"(packed from {index['root']})")


def datasets(args):
    """-> train set, test set or None (then split off --test-fraction), class names. The
    training tiles come from --data-store or the files (--data, --data-root), the test tiles
    from --test-store or --test-root: a store gives the files' pixels, so the same features."""
    if getattr(args, "device_crop", False):
        raise DataError("--device-crop: the probe draws no views to crop (it centre-crops every "
                        "tile once); drop --device-crop")
    if getattr(args, "data_store", None):  # --data, --data-root, --train-list: the store's
        train = cdata.store_dataset(args)
        labelled(train, f"--data-store {args.data_store}", f"(packed from {args.data_root})")
    elif args.data == "demo":  # different seeds: test tiles never repeat training tiles
        from common.demo import DemoTiles
        if getattr(args, "test_store", None):
            raise DataError("--test-store: --data demo generates its test tiles; drop it")
        train = DemoTiles(args.demo_size, seed=0, size=args.img_size)
        return train, DemoTiles(args.demo_test_size, seed=1, size=args.img_size), train.classes
    else:
        train = image_tree(args, args.data_root, "--data-root")
    if getattr(args, "test_store", None):
        test, flag = test_store(args), "--test-store"
    else:
        test, flag = image_tree(args, args.test_root, "--test-root") if args.test_root else None, \
            "--test-root"
    if test is not None and test.classes != train.classes:
        raise DataError(f"{flag} classes {test.classes} differ from the training classes "
                        f"{train.classes}")
    if test is not None:  # the same file in both sets would test on training tiles
        both = set(map(os.path.abspath, train.paths)) & set(map(os.path.abspath, test.paths))
        if both:
            raise DataError(f"{flag}: {len(both)} test tiles are training tiles too (e.g. "
                            f"{sorted(both)[0]}); test on other tiles")
    return train, test, train.classes


def fingerprint(ds):
    """What identifies a dataset's pixels and labels for the cache: its files (or demo seed)."""
    if not hasattr(ds, "paths"):
        return f"demo n={ds.n} seed={ds.seed}"
    h = hashlib.sha1("\n".join(f"{p}\t{y}" for p, y in zip(ds.paths, ds.targets)).encode())
    return f"{len(ds)} files sha1={h.hexdigest()}"


def cache_key(args, train, test):
    if args.pretrained == "random":
        weights = f"random seed={args.seed}"
    else:
        st = os.stat(args.pretrained)
        weights = f"{Path(args.pretrained).resolve()} mtime={st.st_mtime_ns} size={st.st_size}"
    return {"weights": weights, "arch": args.arch, "img_size": args.img_size,
            "train": fingerprint(train), "test": fingerprint(test) if test is not None else None}


def stale(feats, backbone, train_set, args, device, n=8):
    """Re-extract the first n training tiles and compare with the cache: a spot check that
    catches a checkpoint rewritten in place with the same size and mtime (the cache key) or a
    changed first image. Cosine similarity, not exact values: another batch size may pick other
    GPU kernels (TF32) and move features by 1e-3."""
    first = torch.utils.data.Subset(train_set, range(min(n, len(train_set))))
    x, y = extract_features(backbone, tile_loader(first, args.img_size, n, 0), device, False)
    cx, cy = feats["train"][0][:len(y)], feats["train"][1][:len(y)]
    if torch.equal(y, cy) and torch.nn.functional.cosine_similarity(x, cx).min() > 0.999:
        return False
    print("note: cached features differ from a fresh extraction: recomputing")
    return True


# ----------------------------------------------------------------------------- main
def get_args(argv=None):
    p = cli.parser(__doc__)
    cdata.add_data_args(p)
    p.set_defaults(demo_size=600)
    p.add_argument("--test-root", help="test tree (CRC-VAL-HE-7K for nct); default: a seeded "
                   "stratified --test-fraction of --data-root is held out")
    p.add_argument("--test-store", metavar="STORE",
                   help="the test tiles from a tile store packed by `python -m common.store` "
                        "from the test tree (as --data-store for the training tiles); the same "
                        "pixels, so the same features and metrics as --test-root")
    acts = p._option_string_actions  # the probe's own words for the shared data flags
    acts["--data-store"].help = ("the training tiles from a tile store packed by `python -m "
                                 "common.store` (--data, --data-root and --train-list are read "
                                 "from it): the same pixels, so the same features and metrics "
                                 "as the files, without decoding them")
    acts["--device-crop"].help = argparse.SUPPRESS  # pre-training only: the probe has no views
    p.add_argument("--test-fraction", type=cli.positive_float, default=0.2,
                   help="without --test-root, in (0, 1); Ciga et al. hold out 0.25 of the tiles "
                        "for testing and another 0.25 of all (--val-fraction 0.333 of the rest) "
                        "for validation")
    p.add_argument("--val-fraction", type=cli.unit_float, default=0.25,
                   help="stratified share of the training tiles held out for validation; the "
                        "test metrics of the best validation macro-F1 epoch are reported, as Ciga "
                        "et al. (25,000 of NCT-CRC-HE-100K). 0 = train on all, report the last "
                        "epoch")
    p.add_argument("--demo-test-size", type=cli.int_at_least(6), default=300,
                   help="--data demo test tiles (at least one per class)")
    p.add_argument("--pretrained", default="random", help="random | PATH to a checkpoint")
    p.add_argument("--arch", choices=ARCHS, default="resnet18", help="backbone")
    p.add_argument("--img-size", type=cli.int_at_least(32), default=224,
                   help="shorter side, then centre crop (ResNet stride 32: at least 32)")
    p.add_argument("--batch-size", type=cli.int_at_least(2), default=128,
                   help="probe batch, as the paper (BN: at least 2); also the feature-extraction "
                        "batch")
    p.add_argument("--probe-epochs", type=cli.positive_int, default=100, help="as the paper")
    p.add_argument("--lr", type=cli.positive_float, default=1e-3,
                   help="Adam lr; the paper gives none: PyTorch's Adam value, ample for 100 "
                        "epochs on BN-standardised features")
    p.add_argument("--weight-decay", type=cli.nonneg_float, default=None,
                   help="Adam (L2) weight decay; default 1e-5 for resnet18, 1e-4 otherwise, as "
                        "the paper")
    p.add_argument("--label-fraction", type=cli.positive_float, nargs="+", default=[100.0],
                   help="percent of the training labels, in (0, 100]; the paper's sweep is "
                        "5 10 20 50 100")
    p.add_argument("--runs", type=cli.positive_int, default=5,
                   help="random subsets (and seeds) per fraction, as the paper")
    p.add_argument("--knn-k", type=cli.positive_int, default=20,
                   help="neighbours (InstDisc, DINO)")
    p.add_argument("--knn-t", type=cli.positive_float, default=0.07,
                   help="vote temperature (InstDisc, DINO)")
    p.add_argument("--output-dir", default="runs/linear_probe",
                   help="features.pt (cache), metrics.json, args.json")
    p.add_argument("--seed", type=cli.nonneg_int, default=0,
                   help="seeds the splits, the subsets, the probe and --pretrained random")
    args = p.parse_args(argv)
    if args.weight_decay is None:
        args.weight_decay = 1e-5 if args.arch == "resnet18" else 1e-4
    args.label_fraction = sorted(set(args.label_fraction))
    if args.label_fraction[-1] > 100:
        p.error(f"argument --label-fraction: percentages are at most 100, got "
                f"{args.label_fraction[-1]:g}")
    if args.test_fraction >= 1:
        p.error(f"argument --test-fraction: expected a number < 1, got {args.test_fraction:g}")
    if args.val_fraction >= 1:
        p.error(f"argument --val-fraction: expected a number < 1, got {args.val_fraction:g}")
    if args.data == "demo" and args.demo_size < 6:
        p.error(f"argument --demo-size: --data demo needs at least 6 (one per class), got "
                f"{args.demo_size}")
    args.script = "linear_probe"
    return args


def main(argv=None):
    args = get_args(argv)
    out = Path(args.output_dir)
    ctrain.claim_output_dir(out, "linear_probe")  # another script's run folder is refused
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.workers > available_cores():  # tile_loader caps them; say so once
        print(f"note: --workers {args.workers} capped at the {available_cores()} available cores")
    train_set, test_set, classes = datasets(args)
    torch.manual_seed(args.seed)  # the weights of --pretrained random
    backbone = resnet(args.arch)
    load_report = load_pretrained(backbone, args.pretrained)
    print(f"{args.arch}: {load_report}")
    loaded = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.to(device)
    ctrain.make_run_folder(out)  # removed again by main_guard if the start fails

    key, cache = cache_key(args, train_set, test_set), out / "features.pt"
    try:
        feats = torch.load(cache, weights_only=True)
    except Exception:  # noqa: BLE001 - absent or unreadable: recompute
        feats = None
    if feats is not None and feats.get("key") == key and not stale(feats, backbone, train_set,
                                                                   args, device):
        print(f"reusing cached features from {cache} (its first tiles re-checked)")
    else:
        feats = {"key": key}
        for name, ds in (("train", train_set), ("test", test_set)):
            if ds is not None:
                loader = tile_loader(ds, args.img_size, args.batch_size, args.workers)
                feats[name] = extract_features(backbone, loader, device)
        ctrain.atomic_save(feats, cache)
        print(f"features of {len(train_set)} + {len(test_set or [])} tiles cached in {cache}")
    # from here on the folder is this script's (`script` in args.json): others refuse it
    ctrain.atomic_write_text(out / "args.json", json.dumps(vars(args), indent=2, default=str))
    train_x, train_y = feats["train"]
    if test_set is None:  # one held-out split for all runs, seeded by --seed only
        (train_x, train_y), (test_x, test_y) = split_off(train_x, train_y, args.test_fraction,
                                                         args.seed)
    else:
        test_x, test_y = feats["test"]
    val = None
    if args.val_fraction > 0:  # likewise one validation split, from the tiles left
        (train_x, train_y), val = split_off(train_x, train_y, args.val_fraction,
                                            cdata.sample_seed(args.seed, 1))
        val = tuple(t.to(device) for t in val)
    C, present = len(classes), len(train_y.unique())
    print(f"{len(train_y)} train / {len(val[1]) if val else 0} validation / {len(test_y)} test "
          f"tiles, {present} of {C} classes present, {train_x.shape[1]}-d features; chance: "
          f"accuracy {100 / present:.1f}%, probe loss log({present}) {math.log(present):.3f}; "
          f"Adam lr {args.lr:g}, wd {args.weight_decay:g}, {args.probe_epochs} epochs, batch "
          f"{args.batch_size}; reporting the " + ("best validation epoch" if val else "last epoch"))

    runs, test_x = [], test_x.to(device)
    for frac in args.label_fraction:
        for r in range(args.runs):
            seed = cdata.sample_seed(args.seed, round(frac * 1000), r)
            idx = stratified_subset(train_y, frac / 100, torch.Generator().manual_seed(seed))
            x, y = train_x[idx].to(device), train_y[idx].to(device)
            clf, hist = train_linear(x, y, C, args.probe_epochs, args.lr, args.weight_decay,
                                     args.batch_size, seed, val)
            pred = predict(clf, test_x).cpu()
            knn = knn_predict(x, y, test_x, C, args.knn_k, args.knn_t).cpu()
            e = hist["epoch"]
            loss = hist["loss"][e - 1]
            res = {"label_fraction": frac, "run": r, "seed": seed, "num_train": len(idx),
                   "epoch": e, "probe_loss": loss,
                   "val_macro_f1": hist["val_macro_f1"][e - 1] if val else None,
                   "accuracy": accuracy(pred, test_y), "macro_f1": macro_f1(pred, test_y, C),
                   "knn_accuracy": accuracy(knn, test_y), "knn_macro_f1": macro_f1(knn, test_y, C)}
            runs.append(res)
            chosen = f"epoch {e} (val macro F1 {res['val_macro_f1']:.2f})  " if val else ""
            print(f"{frac:g}% run {r}: {len(idx)} tiles  {chosen}probe loss {loss:.3f}  " +
                  "  ".join(f"{m} {res[m]:.2f}" for m in METRICS), flush=True)

    for k, v in backbone.state_dict().items():  # eval mode + no_grad: must hold bit for bit
        if not torch.equal(v.cpu(), loaded[k]):
            raise RuntimeError(f"backbone tensor {k} changed during the probe")

    by_fraction = {}
    for frac in args.label_fraction:
        vals = {m: torch.tensor([r[m] for r in runs if r["label_fraction"] == frac],
                                dtype=torch.float64) for m in METRICS}
        by_fraction[f"{frac:g}"] = {m: {"mean": v.mean().item(),
                                        "std": v.std().item() if len(v) > 1 else 0.0}
                                    for m, v in vals.items()}
    top = by_fraction[f"{max(args.label_fraction):g}"]
    metrics = {**{m: top[m]["mean"] for m in METRICS}, "label_fraction": max(args.label_fraction),
               "pretrained": args.pretrained, "arch": args.arch, "load_report": load_report,
               "data": args.data, "classes": list(classes), "num_train": len(train_y),
               "num_val": len(val[1]) if val else 0, "num_test": len(test_y),
               "by_fraction": by_fraction, "runs": runs}
    ctrain.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))

    table = ["| labels | runs | accuracy | macro F1 | kNN accuracy | kNN macro F1 |",
             "|---|---|---|---|---|---|"]
    for frac, s in by_fraction.items():
        table.append(f"| {frac}% | {args.runs} | " + " | ".join(
            f"{s[m]['mean']:.2f} ± {s[m]['std']:.2f}" for m in METRICS) + " |")
    print(f"{args.pretrained} ({args.arch}) on {args.data}, mean ± std over runs:")
    print("\n".join(table))
    print(f"-> {out / 'metrics.json'}")


if __name__ == "__main__":
    ctrain.main_guard(main)
