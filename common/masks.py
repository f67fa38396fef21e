"""Region masks shared by the mask-based methods (ConCL, DetCon): batched cosine k-means on
feature maps, Felzenszwalb-Huttenlocher segments with an on-disk cache, and grids."""
import os
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from common.data import DataError


def one_hot(labels, k, dtype):
    """F.one_hot without its range check, which reads the labels' min and max back to the host
    on the CPU (not on CUDA); ids outside [0, k) get an all-zero row."""
    return (labels.unsqueeze(-1) == torch.arange(k, device=labels.device)).to(dtype)


@torch.no_grad()
def kmeans(x, k, iters=10):
    """Cosine k-means per item of a batch, on the device.

    x: (B, N, D) features -> (B, N) labels in [0, min(k, N)). Initialised by greedy k-means++
    on the cosine distance, so well-separated clusters are found (ConCL's random init with replacement
    can start two centroids on one cluster, pitfall P16); a cluster left empty is re-seeded with
    the point farthest from its centroid. Randomness comes from torch's global RNG.

    Always fp32, also inside bf16 autocast (--amp): bf16 similarities (8 bits of mantissa) change
    the partition of most images. A fixed number of iterations and no data-dependent Python
    branches: no host synchronisation (torch.multinomial would check its input with one).
    """
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1)
        B, N, _ = x.shape
        k = min(k, N)
        rows = torch.arange(B, device=x.device)
        centres = x[rows, torch.randint(N, (B,), device=x.device)].unsqueeze(1)   # (B, 1, D)
        dist = 1 - (x @ centres.transpose(1, 2)).squeeze(2)                       # (B, N)
        trials = 2 + int(np.log(k))  # greedy k-means++ (as scikit-learn): best of a few draws
        for _ in range(1, k):
            # `trials` draws without replacement, P ~ dist^2: the largest p / Exp(1) (no sync)
            p = dist.clamp_min(0) ** 2 + 1e-12
            cand = (p / torch.empty_like(p).exponential_()).topk(trials, 1).indices  # (B, L)
            cand_dist = torch.minimum(dist.unsqueeze(2),
                                      1 - x @ x[rows[:, None], cand].transpose(1, 2))  # (B, N, L)
            best = (cand_dist.clamp_min(0) ** 2).sum(1).argmin(1)                   # (B,)
            centres = torch.cat([centres, x[rows, cand[rows, best]].unsqueeze(1)], 1)
            dist = cand_dist[rows, :, best]
        for _ in range(iters):
            sim = x @ centres.transpose(1, 2)                                     # (B, N, k)
            labels = sim.argmax(2)
            onehot = one_hot(labels, k, x.dtype)
            centres = F.normalize(onehot.transpose(1, 2) @ x, dim=-1)             # (B, k, D)
            # an empty cluster takes the least similar point of its item: the j-th empty
            # cluster the j-th least similar (computed for all, kept where empty)
            empty = onehot.sum(1) == 0                                            # (B, k)
            far = sim.gather(2, labels.unsqueeze(2)).squeeze(2).argsort(1)        # (B, N)
            nth = (empty.long().cumsum(1) - 1).clamp(0, N - 1)                    # (B, k)
            centres = torch.where(empty.unsqueeze(2), x[rows[:, None], far.gather(1, nth)], centres)
        return (x @ centres.transpose(1, 2)).argmax(2)


def grid_labels(size, g):
    """(size, size) int64 map of a g x g grid, cell id = row * g + col."""
    idx = torch.arange(size) * g // size
    return idx[:, None] * g + idx[None, :]


def felzenszwalb(img, scale, min_size, sigma=0.8):
    """FH segments of an RGB uint8 array as consecutive int32 ids 0..n-1 (never uint8: ids of
    256 and more would wrap onto other segments, pitfall P15)."""
    from skimage.segmentation import felzenszwalb as fh
    seg = fh(np.asarray(img), scale=scale, sigma=sigma, min_size=min_size)
    return np.unique(seg, return_inverse=True)[1].reshape(seg.shape).astype(np.int32)


class FHCache:
    """FH label maps computed once per image and kept as 16-bit PNGs (a few KB each; a 224 x 224
    tile has fewer than 2^16 pixels, so ids fit), one file per `key` (see `FHCache.key`: the
    image's path relative to the data root, so same-named tiles in different folders stay
    apart). Each file records the size and a CRC-32 of the image's pixels it was computed from;
    a hit that does not match the image (a replaced or resized tile, a torn write) is recomputed.
    Safe to fill from several loader workers and processes (atomic renames). ConCL and DetCon
    share it; `python -m common.masks` fills it for a whole dataset beforehand."""

    def __init__(self, folder, scale, min_size, sigma=0.8):
        self.root = Path(folder)
        self.folder = self.root / f"fh_s{scale}_m{min_size}_g{sigma}"
        self.scale, self.min_size, self.sigma = scale, min_size, sigma
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise DataError(f"--mask-cache {self.root}: not a writable folder "
                            f"({e.strerror or e})") from None

    @staticmethod
    def key(base, i, data_root=None, seed=0):
        """The cache key of item i of an (image, label) dataset: its path relative to data_root
        (posix, extension kept), or `demo-seed<seed>/<i>` for generated tiles without paths."""
        paths = getattr(base, "paths", None)
        if not paths:
            return f"demo-seed{seed}/{i:06d}"
        p = Path(paths[i])
        try:
            return p.relative_to(data_root).as_posix() if data_root else p.name
        except ValueError:  # not under the root (should not happen): the absolute path
            return p.resolve().as_posix().lstrip("/")

    def path(self, key):
        return self.folder / (str(key) + ".png")

    @staticmethod
    def fingerprint(img):
        """'WxH:crc32' of an RGB image's pixels: what a cached map must have been computed from."""
        a = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
        return f"{a.shape[1]}x{a.shape[0]}:{zlib.crc32(a.tobytes()):08x}"

    def load(self, key, img):
        """-> (int32 (H, W) label map of img, whether it had to be computed now)."""
        path, fp = self.path(key), self.fingerprint(img)
        if path.exists():
            try:
                with Image.open(path) as im:
                    if im.text.get("source") == fp:
                        return np.asarray(im, dtype=np.int32), False
            except (OSError, ValueError):
                pass  # unreadable: recompute
        seg = felzenszwalb(img, self.scale, self.min_size, self.sigma)
        if seg.max() >= 2 ** 16:
            raise DataError(f"{key}: {seg.max() + 1} FH segments do not fit a 16-bit PNG")
        info = PngInfo()
        info.add_text("source", fp)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        Image.fromarray(seg.astype(np.uint16)).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
        return seg, True

    def __call__(self, key, img):
        """key: a unique name for the image (`FHCache.key`); img: PIL RGB -> int32 (H, W) ids."""
        return self.load(key, img)[0]


# ---------------------------------------------------------------------------------------------
# Precompute: fill the cache for a whole dataset before training (a cluster job then never runs
# FH inside the training loop).

_job = None  # (dataset, cache, data_root, seed) in each worker process


def _init_worker(job):
    global _job
    _job = job


def _fill(i):
    """Check entry i as training does (it must match its image's size and pixels) and compute
    it if missing or not -> 0 valid, 1 computed (was missing), 2 recomputed (stale, swapped or
    unreadable)."""
    base, cache, root, seed = _job
    img = base.load(i)[0] if hasattr(base, "load") else base[i][0]
    key = FHCache.key(base, i, root, seed)
    existed = cache.path(key).exists()
    return cache.load(key, img)[1] * (1 + existed)


def precompute(argv=None):
    import argparse
    import multiprocessing
    import time

    from tqdm import tqdm

    from common import cli
    from common import data as cdata
    p = cli.parser("Fill the FH mask cache that concl.py --concept fh and detcon.py --masks fh "
                   "read, for a whole dataset, with worker processes; a rerun resumes. Every "
                   "entry is checked against its image as training checks it (size and a CRC of "
                   "the pixels): a stale, swapped or unreadable file is recomputed.\n\n")
    p.prog = "python -m common.masks"
    cdata.add_data_args(p)
    p.add_argument("--mask-cache", required=True, help="cache folder (the training's --mask-cache)")
    p.add_argument("--fh-scale", type=cli.positive_int, default=1000,
                   help="Felzenszwalb scale; default 1000 as DetCon (fh-ConCL: 500)")
    p.add_argument("--fh-min-size", type=cli.positive_int, default=1000,
                   help="Felzenszwalb min_size; default 1000 as DetCon (fh-ConCL: = scale)")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="--data demo: the tiles' seed")
    args = p.parse_args(argv)
    base = cdata.build_dataset(args)
    cache = FHCache(args.mask_cache, args.fh_scale, args.fh_min_size)
    n = len(base)
    print(f"{n} tiles: checking the cache {cache.folder} against them and computing what is "
          f"missing or stale, with {max(args.workers, 1)} processes", flush=True)
    job, t0, cpu0, counts = (base, cache, args.data_root, args.seed), time.perf_counter(), _cpu(), [0, 0, 0]
    bar = tqdm(total=n, unit="tile", dynamic_ncols=True)
    if args.workers > 1:
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ctx.Pool(args.workers, _init_worker, (job,)) as pool:
            for c in pool.imap_unordered(_fill, range(n), chunksize=8):
                counts[c] += 1
                bar.update(1)
    else:
        _init_worker(job)
        for i in range(n):
            counts[_fill(i)] += 1
            bar.update(1)
    bar.close()
    dt, cpu = time.perf_counter() - t0, _cpu() - cpu0
    print(f"{counts[0]} already cached and valid; computed {counts[1]} missing and {counts[2]} "
          f"stale, swapped or unreadable; {n / max(dt, 1e-9):.1f} tiles/s in {dt:.1f} s, "
          f"{1000 * cpu / max(n, 1):.0f} ms CPU per tile checked or computed", flush=True)


def _cpu():
    """CPU seconds of this process and its finished workers (a busy machine's wall clock lies)."""
    import resource
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


if __name__ == "__main__":
    from common.train import main_guard
    main_guard(precompute)
