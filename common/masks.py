"""Region masks shared by the mask-based methods (ConCL, DetCon): batched cosine k-means on
feature maps, Felzenszwalb-Huttenlocher segments with an on-disk cache (or packed beside a
tile store), and grids."""
import json
import os
import sys
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
    share it; `python -m common.masks` fills it for a whole dataset beforehand.

    store: a --data-store path or None. When that store has maps packed for (scale, min_size)
    (`python -m common.masks --data-store STORE ...`, `PackedFH`), `load` and `__call__` read
    them, keyed by the tile's path relative to the data root as the store's index lists it, and
    never touch the per-tile files; `packed` is then the PackedFH, else None."""

    def __init__(self, folder, scale, min_size, store=None, sigma=0.8):
        self.root = Path(folder)
        self.folder = self.root / f"fh_s{scale}_m{min_size}_g{sigma}"
        self.scale, self.min_size, self.sigma = scale, min_size, sigma
        # --data-store: its packed maps for these parameters, if packed (checked: one error
        # naming the command to rerun for an unfinished, truncated, stale or foreign pack)
        self.packed = PackedFH.open(store, scale, min_size, sigma) if store else None
        if self.packed is not None:
            return  # the folder is only needed for a key the pack lacks (created then)
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

    def has(self, key):
        """Whether the map of `key` is at hand (packed, or a per-tile file; a file is checked
        against the image's pixels only when loaded)."""
        return (self.packed is not None and key in self.packed) or self.path(key).exists()

    def load(self, key, img):
        """-> (int32 (H, W) label map of img, whether it had to be computed now). img: a PIL RGB
        image or a zero-argument callable returning one, called only when the pack (if any)
        lacks the map: a per-tile file is checked against the image's pixels."""
        if self.packed is not None:
            seg = self.packed.get(key)
            if seg is not None:
                return seg, False
        if callable(img):
            img = img()
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
        """key: a unique name for the image (`FHCache.key`); img: PIL RGB (or a callable
        returning it, see `load`) -> int32 (H, W) ids."""
        return self.load(key, img)[0]


# ---------------------------------------------------------------------------------------------
# FH maps packed beside a tile store: STORE/fh-<scale>-<min_size>.npy, one memory-mapped int
# array (N, H, W) in the store's tile order (int16 where the ids surely fit, else int32; never
# uint8, docs/methods.md P15), and STORE/fh-<scale>-<min_size>.json, its index (parameters, the
# digest of the store's tiles it was computed from, a CRC-32 per map, the command). Packed by
# `python -m common.masks --data-store STORE --fh-scale S --fh-min-size M` in
# STORE/fh-<scale>-<min_size>.partial, resumable; the index is written last.

FH_PACK_VERSION = 1


def pack_paths(store, scale, min_size):
    """(maps .npy, index .json, partial folder) of a store's pack for (scale, min_size)."""
    base = Path(store) / f"fh-{scale}-{min_size}"
    return base.with_suffix(".npy"), base.with_suffix(".json"), base.with_suffix(".partial")


def pack_command(store, scale, min_size):
    return (f"python -m common.masks --data-store {Path(store).resolve()} --fh-scale {scale} "
            f"--fh-min-size {min_size}")


def tiles_digest(index):
    """What a pack was computed from: the store's tile size, paths and tile CRCs."""
    import hashlib
    blob = json.dumps([index["height"], index["width"], index["paths"], index["crc32"]])
    return hashlib.sha1(blob.encode()).hexdigest()


def _npy_header(path):
    """(shape, dtype, data offset) of a .npy file; ValueError if it is not one."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError("Fortran order")
        return shape, dtype, f.tell()


class PackedFH:
    """A store's packed FH maps for (scale, min_size), checked when opened: the index, the
    parameters, the store's tiles (a repacked store makes the pack stale), the array's size and
    the CRC of 17 maps spread over it; each problem is one DataError naming the command that
    packs the maps again (it replaces a stale or broken pack). `get(key)` -> int32 (H, W)."""

    @classmethod
    def open(cls, store, scale, min_size, sigma=0.8):
        """The pack, or None when the store has none for these parameters."""
        from common.data import read_store_index
        sindex = read_store_index(store)
        maps, index_path, partial = pack_paths(store, scale, min_size)
        cmd = pack_command(store, scale, min_size)
        if not index_path.exists():
            if partial.is_dir() or maps.exists():
                raise DataError(f"--data-store {store}: the FH maps {maps.name} are not "
                                f"finished; rerun to complete them: {cmd}")
            return None
        return cls(store, sindex, scale, min_size, sigma)

    def __init__(self, store, sindex, scale, min_size, sigma):
        self.maps_path, index_path, _ = pack_paths(store, scale, min_size)
        self.command = cmd = pack_command(store, scale, min_size)
        where = f"--data-store {store}: {index_path.name}"
        try:
            index = json.loads(index_path.read_text())
            if index.get("version") != FH_PACK_VERSION:
                raise ValueError(f"format version {index.get('version')}, expected "
                                 f"{FH_PACK_VERSION}")
            n, crc = index["count"], index["crc32"]
            if len(crc) != n:
                raise ValueError(f"{len(crc)} CRCs for {n} maps")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where} is unreadable ({e}); pack the maps again: {cmd}") from None
        asked = {"scale": scale, "min_size": min_size, "sigma": sigma}
        held = {k: index.get(k) for k in asked}
        if held != asked:
            raise DataError(f"{where} holds maps of another store or other parameters ({held}, "
                            f"not {asked}); pack the maps again: {cmd}")
        if index.get("tiles") != tiles_digest(sindex) or n != sindex["count"]:
            raise DataError(f"{where} is stale: the store's tiles changed since the maps were "
                            f"packed; pack the maps again: {cmd}")
        shape = (n, sindex["height"], sindex["width"])
        try:
            got, dtype, offset = _npy_header(self.maps_path)
            size = self.maps_path.stat().st_size
        except (OSError, ValueError) as e:
            raise DataError(f"--data-store {store}: {self.maps_path.name} is unreadable "
                            f"({e}); pack the maps again: {cmd}") from None
        need = offset + int(np.prod(shape)) * dtype.itemsize
        if got != shape or dtype.str != index.get("dtype") or size != need:
            raise DataError(f"--data-store {store}: {self.maps_path.name} is truncated or not "
                            f"this index's ({size} bytes of {need}, {got} {dtype} for {shape} "
                            f"{index.get('dtype')}); pack the maps again: {cmd}")
        self.index, self.shape, self.dtype, self.offset = index, shape, dtype, offset
        self.rows = {p: i for i, p in enumerate(sindex["paths"])}
        self._maps = None
        for i in sorted({k * (n - 1) // 16 for k in range(17)}) if n else []:
            if zlib.crc32(np.ascontiguousarray(self.maps[i]).tobytes()) != crc[i]:
                raise DataError(f"--data-store {store}: FH map {i} ({sindex['paths'][i]}) in "
                                f"{self.maps_path.name} does not match its CRC; pack the maps "
                                f"again: {cmd}")

    @property
    def maps(self):
        if self._maps is None:  # opened in each process (a memmap must not be pickled)
            self._maps = np.memmap(self.maps_path, self.dtype, "r", offset=self.offset,
                                   shape=self.shape)
        return self._maps

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def __contains__(self, key):
        return str(key) in self.rows

    def __len__(self):
        return self.shape[0]

    def get(self, key):
        """int32 (H, W) map of the tile `key` (its path relative to the data root), or None."""
        i = self.rows.get(str(key))
        return None if i is None else self.maps[i].astype(np.int32)


_packjob = None  # ((maps file, dtype, offset, shape), store tiles, scale, min_size, sigma)


def _init_pack(job):
    global _packjob
    _packjob = (job, None)


def _pack_one(i):
    """FH map of store tile i into the pack's memory map (this process's own) -> (i, CRC-32)."""
    global _packjob
    (file, dtype, offset, shape, tiles, scale, min_size, sigma), mm = _packjob
    if mm is None:
        mm = np.memmap(file, dtype, "r+", offset=offset, shape=shape)
        _packjob = (_packjob[0], mm)
    seg = felzenszwalb(tiles.tile(i), scale, min_size, sigma)
    if seg.max() > np.iinfo(dtype).max:
        raise DataError(f"{tiles.index['paths'][i]}: {seg.max() + 1} FH segments do not fit "
                        f"{np.dtype(dtype).name}")
    mm[i] = seg
    return i, zlib.crc32(np.ascontiguousarray(mm[i]).tobytes())


def pack_maps(store, scale, min_size, workers, sigma=0.8):
    """Pack (or finish packing) the FH maps of every tile of `store` -> the maps' path."""
    import shutil
    import time

    from tqdm import tqdm

    from common import data as cdata
    from common.store import _save_progress, fill
    tiles = cdata.StoreTiles(store)
    maps, index_path, partial = pack_paths(store, scale, min_size)
    n, h, w = tiles.shape[:3]
    plan = {"version": FH_PACK_VERSION, "scale": scale, "min_size": min_size, "sigma": sigma,
            "count": n, "height": h, "width": w, "tiles": tiles_digest(tiles.index),
            # ids < pixels, and every segment has >= min_size pixels: int16 where that surely
            # fits (with a factor 2 to spare), else int32; never uint8 (docs/methods.md P15)
            "dtype": np.dtype(np.int16 if min(h * w, 2 * h * w // min_size + 2) < 2 ** 15
                              else np.int32).str,
            "command": pack_command(store, scale, min_size)}
    if (partial / "index.json").exists() and maps.exists() and not index_path.exists():
        os.replace(partial / "index.json", index_path)  # stopped between the last two renames
        shutil.rmtree(partial)
    if index_path.exists() or maps.exists():
        try:
            done = PackedFH.open(store, scale, min_size, sigma)
        except DataError as e:
            done = None
            print(f"note: replacing the packed maps ({str(e).split(';')[0]})")
        if done is not None and done.index.get("dtype") == plan["dtype"]:
            print(f"{maps} is complete and up to date ({n} maps); nothing to do")
            return maps
        if not partial.is_dir():  # a finished or broken pack: the index goes first
            index_path.unlink(missing_ok=True)
            maps.unlink(missing_ok=True)
    shape, dtype = (n, h, w), np.dtype(plan["dtype"])
    crc = None
    if partial.is_dir():
        try:
            if json.loads((partial / "plan.json").read_text()) == plan:
                crc = np.load(partial / "progress.npy")
                got, _, offset = _npy_header(partial / "maps.npy")
                if len(crc) != n or got != shape or (partial / "maps.npy").stat().st_size != \
                        offset + n * h * w * dtype.itemsize:
                    crc = None
        except (OSError, ValueError):
            crc = None
        if crc is None:
            print(f"note: {partial} is from another pack or damaged: starting afresh")
            shutil.rmtree(partial)
    if crc is None:
        try:
            partial.mkdir()
        except OSError as e:
            raise DataError(f"--data-store {store}: cannot write the FH maps beside the store "
                            f"({e.strerror or e}); pack them where the store is writable") from None
        np.lib.format.open_memmap(partial / "maps.npy", "w+", dtype, shape).flush()
        with open(partial / "maps.npy", "r+b") as f:
            try:  # reserve the space now: a full disk would otherwise kill a worker (SIGBUS)
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                shutil.rmtree(partial, ignore_errors=True)
                raise DataError(f"cannot reserve {n * h * w * dtype.itemsize / 1e9:.2f} GB for "
                                f"the FH maps in {store} ({e.strerror or e}): free space") from None
        crc = np.full(n, -1, dtype=np.int64)
        _save_progress(partial, crc)
        (partial / "plan.json.tmp").write_text(json.dumps(plan))
        os.replace(partial / "plan.json.tmp", partial / "plan.json")
    _, _, offset = _npy_header(partial / "maps.npy")
    mm = np.memmap(partial / "maps.npy", dtype, "r+", offset=offset, shape=shape)
    todo = np.flatnonzero(crc < 0).tolist()
    job = (str(partial / "maps.npy"), dtype, offset, shape, tiles, scale, min_size, sigma)
    workers = min(workers, os.cpu_count() or 1)
    print(f"{n} tiles of {w}x{h} in {store}: FH maps (scale {scale}, min_size {min_size}) into "
          f"{maps.name}, {len(todo)} to compute with {max(workers, 1)} processes", flush=True)
    bar = tqdm(total=n, initial=n - len(todo), unit="map", desc=f"packing {maps.name}",
               dynamic_ncols=True, file=sys.stdout, disable=not todo)
    t0, cpu0 = time.perf_counter(), _cpu()
    # fill() forks with processes > 0; one worker is this process, as before
    fill(mm, crc, todo, partial, _pack_one, _init_pack, job, workers if workers > 1 else 0, 8, bar)
    del mm
    dt, cpu = time.perf_counter() - t0, _cpu() - cpu0
    with open(partial / "index.json", "w") as f:
        json.dump({**plan, "crc32": crc.tolist()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial / "maps.npy", maps)  # then the index: it marks the pack finished
    os.replace(partial / "index.json", index_path)
    shutil.rmtree(partial)
    print(f"{maps}: {n} maps ({n * h * w * dtype.itemsize / 2**30:.2f} GiB, {dtype.name}); "
          f"{len(todo) / max(dt, 1e-9):.1f} maps/s, {1000 * cpu / max(len(todo), 1):.0f} ms CPU "
          f"per map; detcon.py --masks fh / concl.py --concept fh --fh-input tile with "
          f"--data-store {store} read them", flush=True)
    return maps


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
    import multiprocessing
    import time

    from tqdm import tqdm

    from common import cli
    from common import data as cdata
    p = cli.parser("Fill the FH mask cache that concl.py --concept fh and detcon.py --masks fh "
                   "read, for a whole dataset, with worker processes; a rerun resumes. Every "
                   "entry is checked against its image as training checks it (size and a CRC of "
                   "the pixels): a stale, swapped or unreadable file is recomputed. With "
                   "--data-store STORE and no --mask-cache, packs the maps beside the store "
                   "instead (STORE/fh-<scale>-<min_size>.npy and .json), which training with "
                   "that --data-store reads.\n\n")
    p.prog = "python -m common.masks"
    cdata.add_data_args(p)
    p.add_argument("--mask-cache", help="cache folder (the training's --mask-cache); without it, "
                   "--data-store STORE packs the maps beside the store instead: one memory-mapped "
                   "array STORE/fh-<scale>-<min_size>.npy that training with --data-store STORE "
                   "reads (resumable, checked)")
    p.add_argument("--fh-scale", type=cli.positive_int, default=1000,
                   help="Felzenszwalb scale; default 1000 as DetCon (fh-ConCL: 500)")
    p.add_argument("--fh-min-size", type=cli.positive_int, default=1000,
                   help="Felzenszwalb min_size; default 1000 as DetCon (fh-ConCL: = scale)")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="--data demo: the tiles' seed")
    args = p.parse_args(argv)
    if not args.mask_cache:
        if not args.data_store:
            p.error("--mask-cache DIR is required (or --data-store STORE, to pack the maps "
                    "beside the store)")
        pack_maps(args.data_store, args.fh_scale, args.fh_min_size, args.workers)
        return
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
