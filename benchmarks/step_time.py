"""Training-step and data-pipeline throughput, measured as ratios within one run.

For every method: images/s of one full training step (forward of both views, loss, backward,
optimiser step; inputs already on the device, so the model is timed, not the loader) and of its
backbone-only bound for the same work (forward+backward of each online view, forward of each
target view, one SGD step), and the ratios to that bound and to MoCo v2. ConCL's extra cost is
split into its parts. The data pipeline is timed on one core: ours (one decode, two views as
uint8, normalisation on the device) against torchvision's per-image pipeline as the official
MoCo code runs it (TwoCropsTransform of a PIL Compose ending in ToTensor + Normalize).

    python benchmarks/step_time.py                 # 224 px, the default
    python benchmarks/step_time.py --quick         # seconds: 64 px, tiny batch (smoke test)
    python benchmarks/step_time.py --methods moco_v2,concl_kmeans --json out.json

Nothing here is asserted: timings belong in README, measured on a named machine.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import byol  # noqa: E402
import concl  # noqa: E402
import densecl  # noqa: E402
import mcl  # noqa: E402
import detcon  # noqa: E402
import moco  # noqa: E402
import pcl  # noqa: E402
import pixcon  # noqa: E402
import simclr  # noqa: E402
from common import data as cdata  # noqa: E402
from common import train as ctrain  # noqa: E402
from common.masks import kmeans  # noqa: E402
from common.models import resnet, resnet_maps  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device, warmup, steps):
    """Median seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def images(a, device):
    x = torch.randn(a.batch_size, 3, a.img_size, a.img_size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def sgd(params):
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)


def prepare(model, device):
    """As Run.wrap does on CUDA: channels_last weights to match the channels_last inputs."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def bn_splits(a):
    return max(1, a.batch_size // 32)  # moco.check_moco_args: BN always sees 32 images


def autocast(a, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.amp and device.type == "cuda")


# ----------------------------------------------------------------------------- methods
def train_step(model, opt, forward, a, device):
    def step():
        with autocast(a, device):
            loss = forward()[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bound(a, device, online_views, target_views, to_layer3_views=0):
    """The backbone-only work of a method: forward+backward per online view, forward per
    target view (and per view that only needs C4, like b-ConCL's reference), one SGD step."""
    net_o, net_t = prepare(resnet(a.arch), device), prepare(resnet(a.arch), device)
    opt = sgd(net_o.parameters())
    xs = [images(a, device) for _ in range(max(online_views, target_views, to_layer3_views))]

    def step():
        with autocast(a, device):
            loss = sum(net_o(x).float().mean() for x in xs[:online_views])
            with torch.no_grad():
                for x in xs[:target_views]:
                    net_t(x)
                for x in xs[:to_layer3_views]:
                    resnet_maps(net_t, x, upto=4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def moco_entry(version):
    def build(a, device):
        model = prepare(moco.MoCo(a.arch, version, K=a.queue, T=0.07 if version == "v1" else 0.2,
                                  bn_splits=bn_splits(a)), device)
        xq, xk = images(a, device), images(a, device)
        return train_step(model, sgd(model.parameters()), lambda: model(xq, xk), a, device)
    return build, lambda a, device: bound(a, device, 1, 1)


def concl_batch(a, device, concept):
    g = torch.Generator().manual_seed(0)
    B, S = a.batch_size, a.img_size
    def boxes():
        lo = torch.randint(0, S // 3, (B, 2), generator=g).float()
        return torch.cat([lo, lo + torch.randint(S // 2, 2 * S // 3, (B, 1), generator=g).float()
                          .expand(B, 2)], 1)
    bq, bk = boxes(), boxes()
    batch = {"boxes": [bq, bk], "flips": [torch.rand(B, generator=g) < 0.5] * 2,
             "ref_box": torch.stack([concl.union_box([p, q]) for p, q in zip(bq, bk)])}
    if concept == "fh":  # FH maps come from the cache through the loader: not the step's work
        batch["ref_labels"] = torch.randint(0, 12, (B, S // 16, S // 16), generator=g)
    return batch


def concl_args(a, concept):
    return argparse.Namespace(arch=a.arch, init="openselfsup", dim=128, queue_size=a.queue, moco_m=0.999,
                              temperature=0.2, bn_splits=bn_splits(a), concept=concept, grid_size=5,
                              num_concepts=8, cluster_stage=4, img_size=a.img_size,
                              concept_weight=1.0, official_key_order=False,
                              concept_ids={"grid": 25, "kmeans": 8}.get(concept, 64))


def concl_entry(concept):
    def build(a, device):
        model = prepare(concl.ConCL(concl_args(a, concept)), device)
        xq, xk, xr = images(a, device), images(a, device), images(a, device)
        batch = concl_batch(a, device, concept)
        ref = xr if concept == "kmeans" else None
        return train_step(model, sgd(model.parameters()),
                          lambda: model(xq, xk, batch, ref, True), a, device)
    # b-ConCL's reference view is a third, target-only forward up to layer3
    return build, lambda a, device: bound(a, device, 1, 1, int(concept == "kmeans"))


def simclr_build(a, device):
    model = prepare(simclr.SimCLR(a.arch), device)
    x1, x2 = images(a, device), images(a, device)
    opt = ctrain.LARS(ctrain.lars_param_groups(model, 1e-6), lr=0.1)  # the method's optimiser
    return train_step(model, opt, lambda: model(x1, x2), a, device)


def byol_build(a, device):
    model = prepare(byol.BYOL(a.arch), device)
    x1, x2 = images(a, device), images(a, device)
    opt = ctrain.LARS(ctrain.lars_param_groups(model, 1.5e-6), lr=0.1)
    step = train_step(model, opt, lambda: model(x1, x2), a, device)

    def step_and_ema():
        step()
        model.momentum_update(0.996)  # after the optimiser step, as byol.train_one_epoch
    return step_and_ema


def densecl_build(a, device):
    args = argparse.Namespace(arch=a.arch, init="openselfsup", dim=128, queue_size=a.queue, moco_m=0.999,
                              temperature=0.2, bn_splits=bn_splits(a))
    model = prepare(densecl.DenseCL(args), device)
    xq, xk = images(a, device), images(a, device)
    return train_step(model, sgd(model.parameters()), lambda: model(xq, xk, 0.5), a, device)


def pixcon_entry(match):
    def build(a, device):
        model = prepare(pixcon.PixCon(a.arch, K=a.queue, match=match), device)
        x1, x2 = images(a, device), images(a, device)
        g, B, S = torch.Generator().manual_seed(0), a.batch_size, a.img_size
        boxes = []
        for _ in range(2):  # crops of a 1.5 S tile that mostly overlap
            lo = torch.randint(0, S // 2, (B, 2), generator=g).float()
            boxes.append(torch.cat([lo, lo + torch.randint(S // 2, S, (B, 1), generator=g)
                                    .float().expand(B, 2)], 1).to(device))
        flips = [(torch.rand(B, generator=g) < 0.5).to(device) for _ in range(2)]
        opt = sgd([p for p in model.parameters() if p.requires_grad])
        step = train_step(model, opt, lambda: model(x1, x2, boxes, flips, 0), a, device)

        def step_and_ema():
            step()
            model.momentum_update(0.99)  # after the optimiser step, as pixcon.train_one_epoch
        return step_and_ema
    # BYOL's work: both views through the online and the target network
    return build, lambda a, device: bound(a, device, 2, 2)


def detcon_entry(variant):
    def build(a, device):
        args = detcon.get_args(["--variant", variant, "--img-size", str(a.img_size), "--arch", a.arch])
        model = prepare(detcon.DetConS(args) if variant == "S" else detcon.DetConB(args), device)
        x1, x2 = images(a, device), images(a, device)
        g, cells_n = torch.Generator().manual_seed(0), (a.img_size // 32) ** 2
        # ~12 masks per view (FH on NCT tiles); cells and draws come from the loader
        cells = [torch.randint(0, 12, (a.batch_size, cells_n), generator=g) for _ in range(2)]
        ids = [torch.stack([detcon.sample_masks(c, 16) for c in cv]).to(device) for cv in cells]
        cells = [c.to(device) for c in cells]
        opt = ctrain.LARS(ctrain.lars_param_groups(model, args.weight_decay), lr=0.1)
        step = train_step(model, opt, lambda: model(x1, x2, cells, ids), a, device)

        def step_and_ema():
            step()
            if variant == "B":
                model.momentum_update(0.996)  # after the optimiser step, as detcon.train_one_epoch
        return step_and_ema
    # the parents' work: SimCLR's two online views, BYOL's two online and two target views
    return build, lambda a, device: bound(a, device, 2, 0 if variant == "S" else 2)


def detcon_flops(batch, size):
    """FLOPs of one training step of SimCLR, BYOL and DetCon on the meta device (no compute):
    the paper's appendix A.2 accounting, independent of the machine's load."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = torch.device("meta")
    x1, x2 = (torch.empty(batch, 3, size, size, device=meta) for _ in range(2))
    cells = [torch.randint(0, 12, (batch, (size // 32) ** 2)) for _ in range(2)]
    ids = [torch.stack([detcon.sample_masks(c, 16) for c in cv]).to(meta) for cv in cells]
    cells = [c.to(meta) for c in cells]
    nets = {"simclr": (simclr.SimCLR, ()), "byol": (byol.BYOL, ()),
            "detcon_S": (detcon.DetConS, (detcon.get_args(["--variant", "S"]),)),
            "detcon_B": (detcon.DetConB, (detcon.get_args(["--variant", "B"]),))}
    res = {}
    for name, (cls, args) in nets.items():
        with meta:
            model = cls(*args)
        with FlopCounterMode(display=False) as counter:
            model(x1, x2, *([cells, ids] if name.startswith("detcon") else []))[0].backward()
        res[name] = counter.get_total_flops()
    return res


def detcon_report(a, out):
    """DetCon against its parent in the same run (the paper's FLOPs: +5.3% S, +11.6% B) and
    the FH precompute's tiles/s on one core."""
    m = out["methods"]
    pairs = [(k, b, f) for k, b, f in (("detcon_S", "simclr", 1.053), ("detcon_B", "byol", 1.116))
             if k in m and b in m]
    if pairs:
        print("\n| DetCon | step / parent's step | parent | paper's FLOPs ratio |\n|---|---|---|---|")
        for k, b, f in pairs:
            out[f"{k}_vs_{b}"] = m[k]["step_s"] / m[b]["step_s"]
            print(f"| {k} | {out[f'{k}_vs_{b}']:.3f}x | {b} | {f:.3f}x |")
    if not any(k.startswith("detcon") for k in m):
        return
    batch = a.batch_size if a.quick else 1024
    fl = detcon_flops(batch, a.img_size)
    out["detcon_flops"] = fl
    print(f"\n# FLOPs of one step (matmuls and convolutions, forward + backward; meta device), "
          f"global batch {batch}, {a.img_size} px: DetCon_S / SimCLR {fl['detcon_S'] / fl['simclr']:.3f}x, "
          f"DetCon_B / BYOL {fl['detcon_B'] / fl['byol']:.3f}x (paper, ResNet-50: 1.053x, 1.116x)")
    from common.masks import FHCache
    with tempfile.TemporaryDirectory() as d:
        paths, source = tiles(d, n=8 if a.quick else 32)
        cache = FHCache(Path(d) / "cache", 1000, 1000)
        t = time.perf_counter()
        for p in paths:
            cache.load(p.name, cdata.read_rgb(p))
        rate = len(paths) / (time.perf_counter() - t)
    out["fh_tiles_per_s_per_core"] = rate
    print(f"\n# FH precompute (scale = min_size = 1000, read + segment + write), one core, "
          f"{source}: {rate:.1f} tiles/s")


def mcl_entry(levels=3):
    """MCL's step: 2 x S views assembled into both branches' montage batches (the permutations
    are part of the step), EMA after the optimiser step. S drops where the batch does not split
    into S levels (--quick's 8: S = 2). Its bound is BYOL's work at the branch's B + B/4 + B/16
    images: the appendix's 1.3125x, without FPN and head."""
    def n_levels(a):
        return next(s for s in (levels, 2, 1) if a.batch_size % 4 ** (s - 1) == 0)

    def build(a, device):
        S = n_levels(a)
        model = prepare(mcl.MCL(a.arch, S), device)
        views = [images(a, device) for _ in range(2 * S)]
        opt = ctrain.LARS(ctrain.lars_param_groups(model, 1e-5), lr=0.1)

        def forward():
            x_q, l_q = mcl.assemble(views[:S], S)
            x_k, l_k = mcl.assemble(views[S:], S)
            return model(x_q, l_q, x_k, l_k)
        step = train_step(model, opt, forward, a, device)

        def step_and_ema():
            step()
            model.momentum_update(0.99)  # after the optimiser step, as mcl.train_one_epoch
        return step_and_ema

    def build_bound(a, device):
        S = n_levels(a)
        n = sum(c // 4 ** i for i, c in enumerate(mcl.slot_counts(a.batch_size, S)))
        return bound(argparse.Namespace(**{**vars(a), "batch_size": n}), device, 2, 2)
    return build, build_bound


def mcl_report(out):
    """MCL against BYOL in the same run (the appendix's accounting: 1.3125x the online cost for
    S = 3; target at most 1.40x with the FPN and the head)."""
    m = out["methods"]
    if "mcl" in m and "byol" in m:
        out["mcl_vs_byol"] = m["mcl"]["step_s"] / m["byol"]["step_s"]
        print(f"\n# MCL step / BYOL step: {out['mcl_vs_byol']:.3f}x (appendix accounting 1.3125x)")


# name -> (build the method's step, build its backbone-only bound: online, target views)
METHODS = {"moco_v2": moco_entry("v2"), "moco_v1": moco_entry("v1"),
           "simclr": (simclr_build, lambda a, device: bound(a, device, 2, 0)),
           "byol": (byol_build, lambda a, device: bound(a, device, 2, 2)),
           "detcon_S": detcon_entry("S"), "detcon_B": detcon_entry("B"),
           "densecl": (densecl_build, lambda a, device: bound(a, device, 1, 1)),
           "concl_grid": concl_entry("grid"), "concl_fh": concl_entry("fh"),
           "concl_kmeans": concl_entry("kmeans"), "mcl": mcl_entry(),
           "pixcon_sim": pixcon_entry("sim"), "pixcon_coord": pixcon_entry("coord"),
           "pixcon_sr": pixcon_entry("sr")}


# ----------------------------------------------------------------------------- PCL v2
PCL_NCT = (100_000, (20000, 35000, 50000))  # NCT-CRC-HE-100K tiles, ConCL's granularities


def pcl_args(a, ks):
    return argparse.Namespace(arch=a.arch, init="openselfsup", dim=128, queue_size=a.queue, moco_m=0.999,
                              temperature=0.2, bn_splits=bn_splits(a), pcl_r=min(16384, a.queue),
                              num_clusters=list(ks))


def pcl_build(a, device):
    """A clustered epoch's step: MoCo v2 plus ProtoNCE at the three NCT granularities, here
    against random prototypes (the step's work does not depend on what the E-step found)."""
    n, ks = PCL_NCT
    model = pcl.PCL(pcl_args(a, ks), n)
    g = torch.Generator().manual_seed(0)
    for c, k in zip(model.clusters, ks):
        c.im2cluster.copy_(torch.randint(k, (n,), generator=g))
        c.prototypes.copy_(F.normalize(torch.randn(k, 128, generator=g), dim=1))
        c.phi.fill_(0.2)
    model = prepare(model, device)
    xq, xk = images(a, device), images(a, device)
    index = torch.randint(n, (a.batch_size,), generator=g).to(device)
    return train_step(model, sgd(model.parameters()), lambda: model(xq, xk, index), a, device)


METHODS["pcl"] = (pcl_build, lambda a, device: bound(a, device, 1, 1))


def kmeans_flops(n, ks, dim=128, iters=20, redo=5):
    """FLOPs (2 x multiply-adds) of the E-step's k-means: per restart the D^2 seeding (about one
    assignment pass), `iters` Lloyd assignments and the final one, 2 N k D each; the centroid
    updates (N D) and phi (N) are negligible."""
    return sum(redo * (iters + 2) * 2 * n * k * dim for k in ks)


def pcl_e_step(a, device, out):
    """The E-step's cost per epoch at NCT scale: k-means (3 granularities, 20 iterations, best
    of 5) timed at a reduced scale s (N s points, k s clusters: FLOPs scale by s^2) and
    extrapolated by its FLOP count; the embedding pass as N eval forwards of the momentum encoder
    at this run's batch and size. Model time only, as the step times (the E-step's loader reads
    every tile once more: one centre crop each)."""
    n, ks = PCL_NCT
    s = 0.005 if a.quick else (1.0 if device.type == "cuda" else 0.03)
    n_r, ks_r = int(n * s), [max(2, int(k * s)) for k in ks]
    x = F.normalize(torch.randn(n_r, 128, device=device), dim=1)

    def cluster():
        for i, k in enumerate(ks_r):
            _, labels, d2 = pcl.kmeans(x, k, seed=i)
            pcl.concentration(d2.sqrt(), labels, k, 0.2)
    t_km = time_it(cluster, device, 0 if a.quick else 1, 1)
    flops_r, flops = kmeans_flops(n_r, ks_r), kmeans_flops(n, ks)
    t_km_nct = t_km * flops / flops_r
    enc = prepare(moco.MoCo(a.arch, "v2", K=a.queue, bn_splits=bn_splits(a)).encoder_k.eval(), device)
    xi = images(a, device)

    def embed():
        with torch.no_grad(), autocast(a, device):
            enc(xi)
    t_embed_nct = time_it(embed, device, a.warmup, a.steps) / a.batch_size * n
    res = {"scale": s, "kmeans_s_measured": t_km, "kmeans_tflop_measured": flops_r / 1e12,
           "kmeans_tflop_nct": flops / 1e12, "kmeans_s_nct": t_km_nct, "embed_s_nct": t_embed_nct}
    m = out["methods"]
    print(f"\n# PCL v2 E-step per epoch at NCT scale ({n} x 128 embeddings, k = "
          f"{' '.join(map(str, ks))}), k-means timed at scale {s} ({n_r} points, k = "
          f"{' '.join(map(str, ks_r))}, {flops_r / 1e12:.3g} TFLOP) and extrapolated by FLOPs\n")
    print("| E-step part | FLOPs at NCT scale | s per epoch at NCT scale |\n|---|---|---|")
    # pcl.e_step runs granularity i on process i % world: on 3+ processes the largest alone counts
    t_km_par = t_km_nct * kmeans_flops(n, ks[-1:]) / flops
    res["kmeans_s_nct_largest_alone"] = t_km_par
    print(f"| k-means + phi (20 iterations, best of 5, fp32), one device | {flops / 1e12:.0f} TFLOP "
          f"| {t_km_nct:.1f} (on 3+ processes, k = {ks[-1]} alone: {t_km_par:.1f}) |")
    print(f"| embedding {n} tiles ({a.img_size} px, eval forward, batch {a.batch_size}) | | "
          f"{t_embed_nct:.1f} |")
    if "pcl" in m and "moco_v2" in m:
        moco_epoch = m["moco_v2"]["step_s"] / a.batch_size * n
        pcl_epoch = m["pcl"]["step_s"] / a.batch_size * n + t_km_nct + t_embed_nct
        res.update(moco_epoch_s=moco_epoch, pcl_epoch_s=pcl_epoch, pcl_vs_moco_epoch=pcl_epoch / moco_epoch,
                   pcl_vs_moco_step=m["pcl"]["step_s"] / m["moco_v2"]["step_s"])
        print(f"| clustered epoch: {n // a.batch_size} PCL steps + E-step, vs MoCo v2's epoch | | "
              f"{pcl_epoch:.1f} vs {moco_epoch:.1f}: {pcl_epoch / moco_epoch:.2f}x (step alone "
              f"{res['pcl_vs_moco_step']:.2f}x; paper, faiss on 8 GPUs: 137.0 / 59.6 s = 2.30x) |")
    out["pcl_e_step"] = res


def concl_split(a, device):
    """ms of b-ConCL's extra parts, each timed alone at the step's batch and size."""
    model = concl.ConCL(concl_args(a, "kmeans")).to(device)
    xr = images(a, device)
    batch = concl_batch(a, device, "kmeans")
    with torch.no_grad():
        f4 = resnet_maps(model.encoder_k[0], xr, upto=4)[-1]
        labels = kmeans(f4.flatten(2).transpose(1, 2), 8).view(f4.shape[0], *f4.shape[2:])
    size, dev = a.img_size // 32, device
    c5 = torch.randn(a.batch_size, 512, size * size, device=device)
    rb, bq = batch["ref_box"].to(dev), batch["boxes"][0].to(dev)
    lq = concl.view_masks(labels, rb, bq, batch["flips"][0], size).flatten(1)

    def ref_forward():
        with torch.no_grad(), autocast(a, device):
            resnet_maps(model.encoder_k[0], xr, upto=4)

    parts = {
        "reference forward (to layer3)": ref_forward,
        "k-means (K=8, 10 iterations)": lambda: kmeans(f4.flatten(2).transpose(1, 2), 8),
        "mapping into both views": lambda: [concl.view_masks(labels, rb, b.to(dev), f, size)
                                            for b, f in zip(batch["boxes"], batch["flips"])],
        "pooling + head + concept loss": lambda: concl.info_nce(
            *[F.normalize(model.encoder_q[1](p), dim=1)
              for p in concl.shared_prototypes(c5, c5, lq, lq)[:2]],
            model.concept_queue, 0.2).backward(),
    }
    return {k: 1000 * time_it(fn, device, a.warmup, a.steps) for k, fn in parts.items()}


# ----------------------------------------------------------------------------- data pipeline
def tiles(folder, n=64):
    """224 x 224 TIFF tiles like NCT's: the real samples beside the repo, else demo tiles."""
    samples = REPO.parent / "shared" / "samples" / "nct_crc_he"
    real = cdata.find_images(samples) if samples.is_dir() else []
    if real:
        arrays = [np.asarray(cdata.read_rgb(p)) for p in real]
        source = f"{len(real)} real CRC-VAL-HE-7K tiles"
    else:
        try:
            from common.demo import demo_tile
            arrays = [demo_tile(i)[0] for i in range(6)]
            source = "demo tiles"
        except ImportError:  # noise compresses worse than tissue: decode times are an upper bound
            rng = np.random.default_rng(0)
            arrays = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(6)]
            source = "random-noise tiles (common.demo missing)"
    paths = []
    for i in range(n):
        p = Path(folder) / f"t{i}.tif"
        Image.fromarray(arrays[i % len(arrays)]).save(p)
        paths.append(p)
    return paths, source


def device_executor(dataset, device, n=64, reps=3):
    """--device-aug's executor: ms per sample (both views) of the photometric ops, batched."""
    from torch.utils.data import default_collate
    from common.augment import DeviceAugment
    aug = DeviceAugment(dataset, device)
    batch = default_collate([dataset[i % len(dataset)] for i in range(n)])
    batch["views"] = [v.to(device) for v in batch["views"]]
    aug(batch)
    sync(device)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    t = clock()
    for _ in range(reps):
        aug(batch)
    sync(device)
    return 1000 * (clock() - t) / reps / n


def loader_rate(dataset, workers, samples, batch=32):
    """Samples/s out of a DataLoader with `workers` processes (after its first batch)."""
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=samples + batch,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler,
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)
    t, n = time.perf_counter(), 0
    for b in it:
        n += len(b["index"])
    return n / (time.perf_counter() - t)


def data_pipeline(a, device=torch.device("cpu")):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        paths, source = tiles(d)
        view = moco.augmentation("v2", 224)
        ours = cdata.MultiViewDataset(cdata.ImageList(paths, [0] * len(paths), ["x"]),
                                      [view, view])
        def per_image(blur):
            return T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0)),
                              T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                              T.RandomGrayscale(p=0.2), T.RandomApply([blur], p=0.5),
                              T.RandomHorizontalFlip(), T.ToTensor(),
                              T.Normalize(cdata.IMAGENET_MEAN, cdata.IMAGENET_STD)])

        def two_crops(base):
            def load(i):
                with open(paths[i % len(paths)], "rb") as f:
                    img = Image.open(f).convert("RGB")
                return base(img), base(img)
            return load

        def per_sample(fn):  # CPU time of this (one-thread) process: robust to shared cores
            for i in range(10):
                fn(i)
            t = time.process_time()
            for i in range(a.samples):
                fn(i)
            return 1000 * (time.process_time() - t) / a.samples

        res = {"source": source,
               "ours_ms": per_sample(lambda i: ours[i % len(ours)]),
               "torchvision_ms": per_sample(two_crops(per_image(T.GaussianBlur(23, (0.1, 2.0))))),
               "official_moco_ms": per_sample(two_crops(per_image(cdata.GaussianBlur((0.1, 2.0)))))}
        # --device-aug: the workers decode, crop, flip and draw the parameters (uint8 out); the
        # photometric ops run batched on the device (common.augment)
        dev = cdata.MultiViewDataset(cdata.ImageList(paths, [0] * len(paths), ["x"]), [view, view])
        res["device_exec_ms"] = device_executor(  # sets dev.device_aug
            dev, device, *((8, 1) if a.quick else (64, 3)))
        res["device_loader_ms"] = per_sample(lambda i: dev[i % len(dev)])
        res["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, one core"
        res["workers"] = a.data_workers
        res["rate_ours"] = loader_rate(ours, a.data_workers, a.samples)
        res["rate_device_aug"] = loader_rate(dev, a.data_workers, a.samples)
        batch = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8)
        t = time.perf_counter()
        for _ in range(5):
            cdata.to_device(batch, torch.device("cpu"))
        res["normalise_ms"] = 1000 * (time.perf_counter() - t) / 5 / 64 * 2  # two views
        img = cdata.read_rgb(paths[0])
        blur = {}
        for s in (0.1, 1.0, 2.0):
            x = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=s)), np.int16)
            y = np.asarray(T.functional.gaussian_blur(img, 23, s), np.int16)
            blur[s] = (int(np.abs(x - y).max()), float(np.abs(x - y).mean()))
        res["blur_diff"] = blur
        res["blur_pil_ms"] = per_sample(lambda i: img.filter(ImageFilter.GaussianBlur(radius=1.0)))
        res["blur_tv_ms"] = per_sample(lambda i: T.functional.gaussian_blur(img, 23, 1.0))
    return res


# ----------------------------------------------------------------------------- main
def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln)
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 64 on CUDA")
    p.add_argument("--queue", type=int, default=16384)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--samples", type=int, default=200, help="data pipeline samples")
    p.add_argument("--data-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader processes for the data pipeline's samples/s")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--quick", action="store_true",
                   help="64 px, batch 8, 1 + 2 steps, 50 samples, queue 64 (flags given win)")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args()
    if a.quick:  # --quick's sizes for what was not given on the command line
        p.set_defaults(img_size=64, batch_size=8, warmup=1, steps=2, samples=50, queue=64)
        a = p.parse_args()
    unknown = set(a.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.batch_size = a.batch_size or (64 if device.type == "cuda" else 32)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    print(f"# step time: {machine(device)}")
    print(f"# {a.arch}, {a.img_size} px, batch {a.batch_size}, median of {a.steps} steps\n")

    # The first training steps of a process are ~10x slow (one-off library and allocator set-up);
    # pay that here, or it lands on whichever method runs first when --warmup is small.
    time_it(bound(a, device, 1, 1), device, 1, 1)
    rows, out = [], {"machine": machine(device), "args": vars(a), "methods": {}}
    for name in a.methods.split(","):
        build, build_bound = METHODS[name]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time_it(build(a, device), device, a.warmup, a.steps)
        # CPU allocations have no per-method peak counter (the process RSS only ever grows)
        mem = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda"
               else "n/a (CUDA only)")
        tb = time_it(build_bound(a, device), device, a.warmup, a.steps)
        out["methods"][name] = {"step_s": t, "bound_s": tb, "img_per_s": a.batch_size / t}
        rows.append((name, t, tb, mem))
    base = out["methods"].get("moco_v2", {}).get("step_s")
    print("| method | img/s | step (s) | backbone-only bound (s) | step / bound | step / MoCo v2 | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for name, t, tb, mem in rows:
        vs = f"{t / base:.2f}x" if base else "n/a"
        print(f"| {name} | {a.batch_size / t:.1f} | {t:.3f} | {tb:.3f} | {t / tb:.2f}x | {vs} | {mem} |")

    detcon_report(a, out)
    mcl_report(out)
    if "pcl" in out["methods"]:
        pcl_e_step(a, device, out)

    if "concl_kmeans" in out["methods"]:
        split = concl_split(a, device)
        out["concl_split_ms"] = split
        print("\n| b-ConCL extra part | ms per step |\n|---|---|")
        for k, v in split.items():
            print(f"| {k} | {v:.1f} |")

    d = data_pipeline(a, device)
    out["data"] = d
    print(f"\n# data pipeline, one core, two 224 px views per sample ({d['source']}); CPU "
          "time (GPU: wall time for the --device-aug executor)\n")
    print("| pipeline | ms per sample |\n|---|---|")
    print(f"| ours: decode once, two views as uint8 | {d['ours_ms']:.2f} |")
    print(f"| + normalisation (on the GPU in training; here CPU) | {d['normalise_ms']:.2f} |")
    print(f"| torchvision per-image v2 pipeline (T.GaussianBlur 23, ToTensor, Normalize) x 2 | "
          f"{d['torchvision_ms']:.2f} |")
    print(f"| the same with PIL blur, i.e. the official MoCo loader | {d['official_moco_ms']:.2f} |")
    print(f"| ratio torchvision / ours | {d['torchvision_ms'] / d['ours_ms']:.2f}x |")
    print(f"| ratio official MoCo / ours | {d['official_moco_ms'] / d['ours_ms']:.2f}x |")
    print(f"| --device-aug loader: decode, crop, flip, draw the parameters (uint8) | "
          f"{d['device_loader_ms']:.2f} |")
    print(f"| --device-aug executor, both views batched by 64 ({d['device_name']}) | "
          f"{d['device_exec_ms']:.2f} |")
    print(f"| ratio of the loader's CPU work, ours / --device-aug | "
          f"{d['ours_ms'] / d['device_loader_ms']:.1f}x |")
    print(f"\n# full loader, {d['workers']} worker processes (samples/s, both views; shared "
          f"cores are noisy)\n\n| ours | --device-aug (loader only) |\n|---|---|\n"
          f"| {d['rate_ours']:.0f} | {d['rate_device_aug']:.0f} |")
    print(f"\n# blur alone, one 224 px tile ({d['source']}): PIL GaussianBlur(radius=sigma) (ours, as the official "
          "MoCo code) vs torchvision gaussian_blur(23, sigma)\n")
    print("| | PIL | torchvision 23 px | ratio |\n|---|---|---|---|")
    print(f"| ms per image (sigma 1.0) | {d['blur_pil_ms']:.2f} | {d['blur_tv_ms']:.2f} | "
          f"{d['blur_tv_ms'] / d['blur_pil_ms']:.1f}x |")
    print("\n| sigma | max abs pixel difference | mean abs difference |\n|---|---|---|")
    for s, (m, mean) in d["blur_diff"].items():
        print(f"| {s} | {m} | {mean:.2f} |")
    from benchmarks import store_time  # the tile store and the device crop (--data-store)
    out["store"] = store_time.measure(a.samples)
    store_time.report(out["store"])
    out["store"]["crop"] = {" ".join(map(str, k)): v for k, v in out["store"]["crop"].items()}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
