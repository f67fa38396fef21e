"""The tile store and the device crop (--data-store, --device-crop), measured on the CPU:

- loader CPU ms per sample (MoCo v2, two 224 px views of real tiles, collated in batches of
  32) for the default path, --device-aug and --data-store --device-crop, and the cores 8 GPUs
  at 4,000 samples/s each would need on each path;
- the device crop (common.crop) against Pillow's crop + resize: mean and max grey-level
  difference per view size and filter, float64 and float32, and label maps (mismatches);
- operations and host copies per view batch of the batched photometric ops (common.augment),
  counted by a dispatch counter (TorchDispatchMode) with the batch on the `meta` device: every
  device operation and every host-to-device / device-to-host copy shows, no GPU needed;
- packing: CPU ms per tile (one process) and the store's size for NCT-100K.

    python benchmarks/store_time.py [--samples 256] [--json out.json]

benchmarks/step_time.py runs this too and prints the same table. Nothing here is asserted.
"""
import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import default_collate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import moco  # noqa: E402
from common import crop  # noqa: E402
from common import data as cdata  # noqa: E402

NCT_100K = 100_000  # tiles of 224 x 224 x 3 bytes
# The photometric executor before its ops were folded (count_ops on that commit's apply_batch):
# one masked index/op/index_put per jitter op and position, each factor and index its own copy.
BEFORE = {"commit": "2ef7e9d", "device": 576, "h2d": 52, "d2h": 0, "host": 223}
# ... and its split (this counter on that commit's apply_batch, MoCo v2's ops): 80 were views
BEFORE_SPLIT = {"kernels": 496, "metadata": 80}


def is_metadata(func):
    """An aten op whose output aliases its input without writing it (view, reshape's
    _unsafe_view / alias, expand, permute, unsqueeze, select, slice, t, as_strided, detach,
    unbind, split, lift_fresh ...): a new tensor header on the host, no kernel launch. Read from
    the op's schema (plus _unsafe_view, reshape's view whose schema names no alias)."""
    return func.overloadpacket.__name__ in ("_unsafe_view", "_reshape_alias") or any(
        r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class OpCounter(TorchDispatchMode):
    """Counts every aten operation; `device` those touching a tensor on the counted device,
    split into `kernels` (a launch each on a GPU) and `metadata` (views: no launch), `h2d` /
    `d2h` the copies between it and the host; `names` the device kernels by name."""

    def __init__(self, device="meta"):
        super().__init__()
        self.device, self.ops, self.names = torch.device(device), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(a, torch.Tensor)]
        flat_out = [a for a in torch.utils._pytree.tree_leaves(out) if isinstance(a, torch.Tensor)]
        on = lambda ts: any(t.device.type == self.device.type for t in ts)  # noqa: E731
        off = lambda ts: any(t.device.type != self.device.type for t in ts)  # noqa: E731
        if on(flat_in) or on(flat_out):
            self.ops["device"] += 1
            if is_metadata(func):
                self.ops["metadata"] += 1
            else:
                self.ops["kernels"] += 1
                self.names[func.overloadpacket.__name__] += 1
            if off(flat_in) and on(flat_out):
                self.ops["h2d"] += 1
            if on(flat_in) and off(flat_out):
                self.ops["d2h"] += 1
        else:
            self.ops["host"] += 1
        return out


def count_ops(n=32, size=224):
    """Operations of one MoCo v2 view batch (n images of size px) in the photometric
    executor and in the device crop, on the meta device."""
    ph = moco.augmentation("v2", size).photometric
    g = torch.Generator().manual_seed(0)
    params = torch.stack([ph.sample(g) for _ in range(n)])
    x = torch.empty(n, 3, size, size, dtype=torch.uint8, device="meta")
    res = {}
    ph.apply_batch(x, params)  # warm: constants cached per device are made once
    with OpCounter() as c:
        ph.apply_batch(x, params)
    res["photometric"] = dict(c.ops)
    tiles = torch.empty(n, size, size, 3, dtype=torch.uint8, device="meta")
    boxes = torch.tensor([[10.0, 20.0, 150.0, 180.0]]).expand(n, 4)
    with OpCounter() as c:
        crop.resize_crop(tiles, boxes, size, Image.BILINEAR, torch.zeros(n, dtype=torch.bool))
    res["crop"] = dict(c.ops)
    return res


def crop_exactness(images, draws=8, seed=0):
    """Device crop vs Pillow on RandomResizedCrop boxes (scale 0.02-1, with flips) of the
    images: {(size, filter, dtype): (mean, max)} grey levels, and label-map mismatches."""
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for size in (224, 112, 64):
        for name, rs in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
            ims, boxes, flips = [], [], []
            for _ in range(draws):
                for im in images:
                    torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
                    top, left, h, w = T.RandomResizedCrop.get_params(im, (0.02, 1), (3 / 4, 4 / 3))
                    ims.append(im)
                    boxes.append((left, top, left + w, top + h))
                    flips.append(bool(torch.rand(1, generator=g) < 0.5))
            want = []
            for im, b, f in zip(ims, boxes, flips):
                v = im.resize((size, size), rs, box=b)
                want.append(cdata.pil_to_uint8(v.transpose(Image.FLIP_LEFT_RIGHT) if f else v))
            want = torch.stack(want).int()
            tiles = torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in ims])
            for dtype in (torch.float64, torch.float32):
                got = crop.resize_crop(tiles, torch.tensor(boxes), size, rs, torch.tensor(flips),
                                       dtype).int()
                d = (got - want).abs().float()
                rows[(size, name, str(dtype).split(".")[1])] = (d.mean().item(), int(d.max()))
        maps = np.random.default_rng(size).integers(0, 4000, (len(ims), 224, 224)).astype(np.int32)
        want = np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST, box=b))
                         for m, b in zip(maps, boxes)])
        got = crop.nearest_crop(torch.from_numpy(maps), torch.tensor(boxes), size).numpy()
        rows[(size, "nearest (label maps)", "int32")] = (int((got != want).sum()), want.size)
    return rows


class TorchCalls(cdata.MultiViewDataset):
    """--device-crop's loader as it was (commit 8a2a4e9): each view's numbers drawn by the torch
    calls under fork_rng, SeedSequence's seed, the tile copied out of the map: the same
    numbers, for the before / after rows of one run."""

    def __getitem__(self, i):
        tile = self.base.tile(i)
        sample = self.draw_params(tile, i)
        sample.update(tile=torch.from_numpy(np.array(tile)), label=self.base.targets[i],
                      index=i, skipped=0)
        return sample

    def draw_params(self, tile, i):
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(
            2, np.uint64)[0] >> 1)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            out = [v.draw_params(tile.shape[:2]) for v in self.views]
        empty = lambda p: p if p is not None else torch.zeros(0, dtype=torch.float64)  # noqa
        return {"boxes": [o[0] for o in out], "flips": [o[1] for o in out],
                "photo": [empty(o[2]) for o in out], "geo": [empty(o[3]) for o in out]}


def loader_ms(paths, store_path, samples=256, batch=32):
    """CPU ms per sample of one process building and collating batches: files (default: PIL
    crops and photometric ops), --device-aug (PIL crops, parameters), --data-store
    --device-crop (tile gather and parameters only)."""
    torch.set_num_threads(1)
    view = moco.augmentation("v2", 224)
    files = cdata.ImageList(paths, [0] * len(paths), ["x"])
    default = cdata.MultiViewDataset(files, [view, view])
    device_aug = cdata.MultiViewDataset(files, [view, view])
    device_aug.device_aug = True
    st = cdata.StoreTiles(store_path)
    device_crop = cdata.MultiViewDataset(st, [view, view])
    device_crop.device_aug = device_crop.device_crop = True
    torch_calls = TorchCalls(st, [view, view])
    torch_calls.device_aug = torch_calls.device_crop = True
    batches = max(1, samples // batch)

    def timed(ds):
        n = len(ds)
        default_collate([ds[i % n] for i in range(batch)])  # warm
        t = time.process_time()
        for b in range(batches):
            default_collate([ds[(b * batch + i) % n] for i in range(batch)])
        return 1000 * (time.process_time() - t) / (batches * batch)

    res = {"default": timed(default), "--device-aug": timed(device_aug)}
    store = {"--data-store --device-crop, before (torch calls, tile copied)": torch_calls,
             "--data-store --device-crop": device_crop}
    rounds = {name: [] for name in store}
    for _ in range(5):  # interleaved, the least disturbed round of each (a shared machine)
        for name, ds in store.items():
            rounds[name].append(timed(ds))
    return {**res, **{name: min(r) for name, r in rounds.items()}}


def packing(paths, out):
    """CPU ms per tile of one packing process (decode, copy into the map, CRC)."""
    from common import store
    args = argparse.Namespace(data="folder", data_root=str(Path(paths[0]).parent.parent),
                              train_list=None, skip_bad=False, out=str(out), workers=0,
                              data_store=None, device_crop=False)
    t = time.process_time()
    store.pack(args)
    return 1000 * (time.process_time() - t) / len(paths)


def measure(samples=256):
    """Everything above on real tiles (the samples beside the repo, else demo tiles); a few
    samples (step_time --quick) shrink every part to a smoke test."""
    n_tiles, draws = min(256, max(32, samples)), 8 if samples >= 64 else 1
    folder = REPO.parent / "shared" / "samples" / "nct_crc_he"
    real = [p for p in cdata.find_images(folder)
            if cdata.read_rgb(p).size == (224, 224)] if folder.is_dir() else []
    if real:
        arrays = [np.asarray(cdata.read_rgb(p)) for p in real]
        source = f"{len(real)} real NCT-CRC-HE tiles (224 px TIFF), each also transposed"
        arrays += [a.transpose(1, 0, 2).copy() for a in arrays]
    else:
        from common.demo import demo_tile
        arrays, source = [demo_tile(i)[0] for i in range(6)], "demo tiles"
    res = {"source": source, "ops": count_ops()}
    res["crop"] = crop_exactness([Image.fromarray(a) for a in arrays], draws)
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(n_tiles):  # TIFF like NCT's, in one class folder
            p = Path(d) / "src" / "x" / f"t{i:04d}.tif"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arrays[i % len(arrays)]).save(p)
            paths.append(p)
        out = Path(d) / "tiles.store"
        res["pack_ms_per_tile"] = packing(paths, out)
        res["loader_ms"] = loader_ms(paths, out, samples)
    res["nct100k_bytes"] = NCT_100K * 224 * 224 * 3
    return res


def report(res):
    print(f"\n### Tile store and device crop (CPU time, {res['source']})\n")
    print("| loader path (MoCo v2, two 224 px views, collated by 32) | CPU ms / sample | "
          "cores for 8 GPUs x 4,000 samples/s |\n|---|---|---|")
    for k, v in res["loader_ms"].items():
        print(f"| {k} | {v:.3f} | {v * 32:.0f} |")
    print("\n| view size | filter | dtype | mean abs diff vs Pillow (grey levels) | max |\n"
          "|---|---|---|---|---|")
    for (size, name, dtype), (a, b) in res["crop"].items():
        if name.startswith("nearest"):
            print(f"| {size} | {name} | {dtype} | {a} mismatched of {b} pixels | |")
        else:
            print(f"| {size} | {name} | {dtype} | {a:.4f} | {b} |")
    print("\n| one view batch (32 x 224 px), meta device | device ops | of which kernels | "
          "metadata only (views) | host-to-device copies | device-to-host (syncs) | host-side "
          "torch ops |\n|---|---|---|---|---|---|---|")
    b = {**BEFORE, **BEFORE_SPLIT}
    print(f"| photometric ops before (commit {b['commit']}) | {b['device']} | {b['kernels']} | "
          f"{b['metadata']} | {b['h2d']} | {b.get('d2h', 0)} | {b['host']} |")
    for k, v in res["ops"].items():
        print(f"| {k} | {v.get('device', 0)} | {v.get('kernels', 0)} | {v.get('metadata', 0)} | "
              f"{v.get('h2d', 0)} | {v.get('d2h', 0)} | {v.get('host', 0)} |")
    gib = res["nct100k_bytes"] / 2**30
    print(f"\nPacking: {res['pack_ms_per_tile']:.2f} CPU ms per tile (one process): NCT-100K "
          f"~{res['pack_ms_per_tile'] * NCT_100K / 1000 / 60:.1f} CPU-minutes; store "
          f"{res['nct100k_bytes'] / 1e9:.2f} GB ({gib:.2f} GiB) + index")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--json")
    a = p.parse_args()
    res = measure(a.samples)
    report(res)
    if a.json:
        Path(a.json).write_text(json.dumps({**res, "crop": {" ".join(map(str, k)): v for k, v
                                                            in res["crop"].items()}}, indent=1))


if __name__ == "__main__":
    main()
