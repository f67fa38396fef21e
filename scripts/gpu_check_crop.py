"""The device crop and the batched photometric ops on the GPU: are they exact, how long does a
view batch take, does it wait for the device?

    python scripts/gpu_check_crop.py            # on CUDA (scripts/gpu_check.sh runs it)
    python scripts/gpu_check_crop.py --cpu      # the same checks on the CPU, shrunk (< 20 s)

Checks, each one line "ok" or "FAIL" (the exit status is 1 when one fails):

1. common.crop.resize_crop against Pillow's img.resize((S, S), filter, box) (+ the mirror where
   flipped), per image, on RandomResizedCrop boxes (scale 0.02-1: shrinking and enlarging) of
   real NCT tiles when the repository's sibling `shared/samples` folder holds them, else demo
   tiles: float64 equal (0 grey levels), float32 within 2; bilinear and bicubic.
2. MoCo v2's photometric ops batched on the device (Photometric.apply_batch) against
   torchvision's tensor ops one image at a time on the CPU (apply_cpu), the same parameters:
   within 1 grey level on every pixel.
3. One view batch (crop + resize + flip + photometric ops, N x 224 px, float64 crop as
   --device-crop runs it): wall time (CUDA events; perf_counter on the CPU), and the operations
   it issues: kernels, views, host-to-device copies, device-to-host copies. On CUDA it also
   runs under torch.cuda.set_sync_debug_mode("error"): a host synchronisation is an error.

--json FILE writes the numbers.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import moco  # noqa: E402
from benchmarks.store_time import OpCounter  # noqa: E402
from common import crop  # noqa: E402
from common import data as cdata  # noqa: E402


def load_tiles(n, size=224):
    """n uint8 (size, size, 3) tiles: real NCT tiles (and their transposes) if present, else
    demo tiles."""
    folder = REPO.parent / "shared" / "samples" / "nct_crc_he"
    arrays = []
    if folder.is_dir():
        for p in cdata.find_images(folder):
            img = cdata.read_rgb(p)
            if img.size == (size, size):
                arrays += [np.asarray(img), np.asarray(img).transpose(1, 0, 2).copy()]
    source = "real NCT-CRC-HE tiles" if arrays else "demo tiles"
    if not arrays:
        from common.demo import demo_tile
        arrays = [demo_tile(i, size=size)[0] for i in range(6)]
    return np.stack([arrays[i % len(arrays)] for i in range(n)]), source


def draw_boxes(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes, flips = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n):
            top, left, h, w = cdata.crop_box(size, size, (0.02, 1.0), (3 / 4, 4 / 3))
            boxes.append((left, top, left + w, top + h))
            flips.append(bool(torch.rand(1, generator=g) < 0.5))
    return torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips)


def pillow_crops(tiles, boxes, flips, out, resample):
    res = []
    for t, b, f in zip(tiles, boxes.tolist(), flips.tolist()):
        v = Image.fromarray(t).resize((out, out), resample, box=tuple(b))
        res.append(cdata.pil_to_uint8(v.transpose(Image.FLIP_LEFT_RIGHT) if f else v))
    return torch.stack(res)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU, shrunk (a smoke test)")
    p.add_argument("--n", type=int, default=None, help="images per batch (32; --cpu: 4)")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu for the CPU version")
    device = torch.device("cpu" if a.cpu else "cuda")
    n, size = a.n or (4 if a.cpu else 32), 224
    out_sizes = (64,) if a.cpu else (64, 112, 224)
    tiles_np, source = load_tiles(n, size)
    tiles = torch.from_numpy(tiles_np).to(device)
    boxes, flips = draw_boxes(n, size)
    res, failed = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda"
                                 else "cpu"), "source": source, "n": n, "crop": {}}, []

    def report(name, ok, detail):
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failed.append(name)

    # 1. the crop against Pillow
    for out in out_sizes:
        for fname, rs in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
            want = pillow_crops(tiles_np, boxes, flips, out, rs).int()
            for dtype, limit in ((torch.float64, 0), (torch.float32, 2)):
                got = crop.resize_crop(tiles, boxes, out, rs, flips, dtype).cpu().int()
                d = (got - want).abs()
                key = f"{out} {fname} {str(dtype).split('.')[1]}"
                res["crop"][key] = (d.float().mean().item(), int(d.max()))
                report(f"crop {key}", int(d.max()) <= limit,
                       f"mean {d.float().mean().item():.5f}, max {int(d.max())} grey levels "
                       f"(limit {limit})")

    # 2. the batched photometric ops against torchvision per image
    ph = moco.augmentation("v2", size).photometric
    g = torch.Generator().manual_seed(1)
    params = torch.stack([ph.sample(g) for _ in range(n)])
    views = crop.resize_crop(tiles, boxes, size, Image.BILINEAR, flips)
    got = ph.apply_batch(views, params).cpu().int()
    views_cpu = views.cpu()
    want = torch.stack([ph.apply_cpu(views_cpu[j], params[j]) for j in range(n)]).int()
    d = (got - want).abs()
    res["photometric"] = (d.float().mean().item(), int(d.max()))
    report("photometric (MoCo v2) vs torchvision per image", int(d.max()) <= 1,
           f"mean {d.float().mean().item():.5f}, max {int(d.max())} grey levels (limit 1)")

    # 3. one view batch: time, operations, host synchronisations
    def view_batch(x=tiles):
        v = crop.resize_crop(x, boxes, size, Image.BILINEAR, flips)
        return ph.apply_batch(v, params)

    for _ in range(1 if a.cpu else 2):  # warm: kernels, cuDNN, cached constants
        view_batch()
    sync(device)
    reps = 1 if a.cpu else 20
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            start.record()
            for _ in range(reps):
                view_batch()
            end.record()
            synced = "none (sync debug mode: error)"
        except RuntimeError as e:  # a synchronising call raised
            synced = f"a host synchronisation: {e}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
        ms = start.elapsed_time(end) / reps if synced.startswith("none") else float("nan")
        report("no host synchronisation in a view batch", synced.startswith("none"), synced)
    else:
        t = time.perf_counter()
        for _ in range(reps):
            view_batch()
        ms = 1000 * (time.perf_counter() - t) / reps
    res["view_batch_ms"] = ms
    # the operations (on the CPU: on the meta device, where the host's own work is not counted)
    counted = tiles if device.type == "cuda" else torch.empty_like(tiles, device="meta")
    view_batch(counted)
    counter = OpCounter(counted.device.type)
    with counter:
        view_batch(counted)
    ops = res["ops"] = {k: counter.ops.get(k, 0) for k in ("kernels", "metadata", "h2d", "d2h")}
    report("no device-to-host copy in a view batch", ops.get("d2h", 0) == 0,
           f"{ops.get('kernels', 0)} kernels, {ops.get('metadata', 0)} views, "
           f"{ops.get('h2d', 0)} host-to-device, {ops.get('d2h', 0)} device-to-host copies")
    print(f"view batch ({n} x {size} px, crop float64 + MoCo v2 photometric) on {res['device']}: "
          f"{ms:.2f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
