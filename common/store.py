"""Pack a tile store: decode every tile once into one uint8 memory-mapped array.

    python -m common.store --data nct --data-root NCT-CRC-HE-100K --out nct100k.store
    torchrun --nproc_per_node=8 moco.py --data-store nct100k.store [--device-crop]

The store is a folder: `tiles.u8`, the tiles as one C-ordered uint8 array (N, H, W, 3), and
`index.json` (paths relative to the source root, labels, classes, each source file's size and
mtime, each tile's CRC-32, the command that packed it; common.data.read_store_index). Any --data
the scripts take (with --train-list, --skip-bad) packs the same tiles in the same order as the
scripts list them, so a run from the store sees the same pixels (lossless formats) and the same
views. Tiles of one size only: a folder of mixed sizes stays with the files.

Resumable: the pack fills `STORE.partial` and records its progress every few seconds; a killed
pack, rerun with the same command, continues where it stopped. Atomic: the folder is renamed to
STORE only once every tile is in and the index is written. A finished store is checked when a
script opens it (size, CRCs of a sample of tiles, the source files' sizes and mtimes, tiles
added to the source folder); `--verify`
checks every tile's CRC.
"""
import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from common import data as cdata
from common.data import DataError

SAVE_EVERY_S = 5.0  # progress is recorded at least this often


def _size(path):
    """(width, height) from the header (the full reader for files PIL cannot identify)."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - 16-bit RGB TIFF and the like: decode it
        return cdata.read_rgb(path).size


def plan(args):
    """What to pack, as the scripts list it: the dataset of the flags, one tile size."""
    if args.data == "demo":
        raise DataError("--data demo tiles are generated, not read: there is nothing to pack")
    ds = cdata.build_dataset(args)
    root = Path(args.data_root).resolve()
    with ThreadPoolExecutor(16) as pool:
        sizes = list(pool.map(_size, ds.paths, chunksize=64))
    counts = Counter(sizes)
    if len(counts) > 1:
        shown = ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts.most_common(4))
        raise DataError(f"{root}: a store holds tiles of one size, these {len(sizes)} come in "
                        f"{len(counts)} sizes ({shown}{', ...' if len(counts) > 4 else ''}); "
                        "train from the files (without --data-store)")
    (w, h), = counts
    stats = [os.stat(p) for p in ds.paths]
    argv = ["python", "-m", "common.store", "--data", args.data, "--data-root", str(root)]
    argv += ["--train-list", str(Path(args.train_list).resolve())] if args.train_list else []
    argv += ["--skip-bad"] if args.skip_bad else []
    command = " ".join(shlex.quote(a) for a in argv + ["--out", str(Path(args.out).resolve())])
    return {"version": cdata.STORE_VERSION, "data": args.data, "root": str(root),
            "train_list": str(Path(args.train_list).resolve()) if args.train_list else None,
            "train_list_sha1": hashlib.sha1(Path(args.train_list).read_bytes()).hexdigest()
            if args.train_list else None,  # a changed list makes the store stale
            "count": len(ds), "height": h, "width": w, "classes": list(ds.classes),
            # relative to the (resolved) root without resolving the files: a file may be a
            # symlink to elsewhere, as datasets often are on a cluster
            "paths": [Path(os.path.relpath(os.path.abspath(p), os.path.abspath(args.data_root)))
                      .as_posix() for p in ds.paths],
            "labels": list(ds.targets), "file_sizes": [s.st_size for s in stats],
            "file_mtimes_ns": [s.st_mtime_ns for s in stats],
            "left_out": list(ds.left_out), "command": command}


def _same_plan(a, b):
    keys = ("version", "root", "count", "height", "width", "paths", "labels", "file_sizes",
            "file_mtimes_ns")
    return all(a.get(k) == b.get(k) for k in keys)


_job = None  # (tiles file, shape, root, paths) in each decoding process


def _init(job):
    global _job
    _job = (job, None)


def _decode(i):
    """Decode tile i into the store's memory map (this process's own mapping) -> (i, CRC-32)."""
    global _job
    (file, shape, root, paths), mm = _job
    if mm is None:
        mm = np.memmap(file, np.uint8, "r+", shape=shape)
        _job = (_job[0], mm)
    a = np.asarray(cdata.read_rgb(Path(root) / paths[i]), dtype=np.uint8)
    if a.shape != shape[1:]:
        raise DataError(f"{paths[i]}: decoded as {a.shape[1]}x{a.shape[0]}, its header said "
                        f"{shape[2]}x{shape[1]}")
    mm[i] = a
    return i, zlib.crc32(a.tobytes())


def _save_progress(partial, crc):
    tmp = partial / "progress.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, crc)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, partial / "progress.npy")


def fill(mm, crc, todo, partial, work, init, job, workers, chunksize, bar):
    """The resumable parallel fill of a pack (tiles here, FH maps in common.masks): `work(i)` ->
    (i, CRC-32 of the entry it wrote into the memory map `mm`) for every i in todo, in `workers`
    forked processes set up by init(job) (none: in this one); the CRCs land in crc (-1: not yet),
    and the entries, then the record of which are done, are flushed every SAVE_EVERY_S and at the
    end, also when interrupted: a rerun continues where this stopped."""
    import multiprocessing
    t_saved = time.monotonic()
    pool = multiprocessing.get_context("fork").Pool(workers, init, (job,)) if workers > 0 else None
    try:
        if pool is None:
            init(job)
            results = map(work, todo)
        else:
            results = pool.imap_unordered(work, todo, chunksize=chunksize)
        for i, c in results:
            crc[i] = c
            bar.update(1)
            if time.monotonic() - t_saved > SAVE_EVERY_S:  # the entries first, then the record
                mm.flush()
                _save_progress(partial, crc)
                t_saved = time.monotonic()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        mm.flush()
        _save_progress(partial, crc)


def pack(args):
    """Pack (or finish packing) args.out; -> the store's path."""
    from tqdm import tqdm
    out = Path(args.out)
    p = plan(args)
    if out.exists():
        try:
            old = cdata.StoreTiles(out, check_sources=False).index
        except DataError as e:
            reason = str(e).split(";")[0]
            raise DataError(f"--out {out} exists and is not a usable store ({reason}); delete "
                            "it or choose another --out") from None
        if _same_plan(old, p):
            print(f"{out} is complete and up to date ({p['count']} tiles); nothing to do")
            return out
        raise DataError(f"--out {out} exists and is a store of other tiles; delete it or "
                        "choose another --out")
    partial = out.with_name(out.name + ".partial")
    n, shape = p["count"], (p["count"], p["height"], p["width"], 3)
    crc = None
    if partial.is_dir():
        try:
            if _same_plan(json.loads((partial / "plan.json").read_text()), p):
                crc = np.load(partial / "progress.npy")
                nbytes = (partial / "tiles.u8").stat().st_size
                if len(crc) != n or nbytes != n * shape[1] * shape[2] * 3:
                    crc = None
        except (OSError, ValueError):
            crc = None
        if crc is None:
            print(f"note: {partial} is from another pack or damaged: starting afresh")
            shutil.rmtree(partial)
    if crc is None:
        partial.mkdir(parents=True)
        with open(partial / "tiles.u8", "wb") as f:
            try:  # reserve the space now: a full disk would otherwise kill a worker (SIGBUS)
                os.posix_fallocate(f.fileno(), 0, n * shape[1] * shape[2] * 3)
            except OSError as e:
                shutil.rmtree(partial, ignore_errors=True)
                raise cdata.DataError(
                    f"cannot reserve {n * shape[1] * shape[2] * 3 / 1e9:.2f} GB for the store in "
                    f"{out.parent} ({e.strerror or e}): free space or choose another --out")
        crc = np.full(n, -1, dtype=np.int64)
        _save_progress(partial, crc)
        (partial / "plan.json.tmp").write_text(json.dumps(p))
        os.replace(partial / "plan.json.tmp", partial / "plan.json")
    todo = np.flatnonzero(crc < 0).tolist()
    mm = np.memmap(partial / "tiles.u8", np.uint8, "r+", shape=shape)
    job = (str(partial / "tiles.u8"), shape, p["root"], p["paths"])
    workers = min(args.workers, os.cpu_count() or 1)
    bar = tqdm(total=n, initial=n - len(todo), unit="tile", desc=f"packing {out.name}",
               dynamic_ncols=True, file=sys.stdout, disable=not todo)
    fill(mm, crc, todo, partial, _decode, _init, job, workers, 32, bar)
    del mm
    index = {**p, "crc32": crc.tolist()}
    with open(partial / "index.json", "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    for name in ("progress.npy", "plan.json"):
        (partial / name).unlink()
    os.replace(partial, out)
    size = n * shape[1] * shape[2] * 3
    print(f"{out}: {n} tiles of {shape[2]}x{shape[1]} ({size / 2**30:.2f} GiB); train with "
          f"--data-store {out}")
    return out


def verify(path):
    """Every tile's CRC against the index -> number of bad tiles (named, up to ten)."""
    from tqdm import tqdm
    ds = cdata.StoreTiles(path, check_sources=False)
    bad = [i for i in tqdm(range(len(ds)), unit="tile", desc="verifying", file=sys.stdout)
           if zlib.crc32(ds.tile(i).tobytes()) != ds.index["crc32"][i]]
    for i in bad[:10]:
        print(f"bad tile {i}: {ds.index['paths'][i]}")
    print(f"{path}: {len(ds) - len(bad)} of {len(ds)} tiles match their CRC")
    return len(bad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Layout, resume and checks: see the module docstring.")
    g = p.add_argument_group("tiles (as the pre-training scripts take them)")
    g.add_argument("--data", choices=["nct", "folder"], default="nct")
    g.add_argument("--data-root", help="dataset folder")
    g.add_argument("--train-list", help="image list (CLASS/file.tif per line), --data nct")
    g.add_argument("--skip-bad", action="store_true", help="leave unreadable images out")
    p.add_argument("--out", help="the store's folder (created; STORE.partial while packing)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes (0: in this process)")
    p.add_argument("--verify", metavar="STORE", help="check every tile of STORE against its CRC")
    args = p.parse_args(argv)
    try:
        if args.verify:
            return 1 if verify(args.verify) else 0
        if not args.out:
            p.error("--out STORE is required")
        args.data_store, args.device_crop = None, False
        pack(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
