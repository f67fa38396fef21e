"""Pre-training data: NCT-CRC-HE-100K, any folder of images, the embedded demo tiles, and the
multi-view wrapper that carries each view's crop box and flip.

Images leave the loader as uint8 CHW tensors; `to_device` normalises them on the device. That
keeps float conversion and normalisation off the CPU workers and sends a quarter of the bytes.

Augmentation is per sample and seeded from (seed, epoch, index): a sample looks the same in any
worker, with any number of workers, and after a resume in the middle of an epoch. The photometric
ops are described per view by common.augment.Photometric and run here, per image, or with
--device-aug batched on the training device from parameters drawn here. With a tile store
(--data-store, packed by common.store) and --device-crop, the loader only gathers the stored
tiles and draws every view's numbers; common.augment crops (common.crop) and augments on the
device. The data path reads one way: files or store -> parameters (here; the seeds, boxes and
the loader's fast draws are common.draws) -> device views (common.augment, common.crop); this
module imports neither of the last two.
"""
import atexit
import functools
import json
import multiprocessing
import signal
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from common import dist as cdist
from common.draws import crop_box, draw_views, sample_seed
from common.cli import nonneg_int, positive_int

# Our label order (alphabetical, as MedMNIST, eva and the Zenodo folders); ConCL's lists use
# another order, which only matters for their *_labeled.txt files (docs/datasets.md 1).
NCT_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(Exception):
    """Bad input: the message is one line that names the culprit."""


# ---------------------------------------------------------------------------------------------
# Reading images

def _to_rgb_array(a):
    """Any integer/float, grey/grey+alpha/RGB/RGBA array -> uint8 (H, W, 3)."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.max(initial=0) > 255):
        a = (a.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = (a.clip(0, 1) * 255).round().astype(np.uint8)
    else:
        a = a.clip(0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"unsupported image shape {a.shape}")
    if a.shape[2] in (2, 4):  # alpha: composite over white, so transparent borders read as glass
        alpha = a[..., -1:].astype(np.float32) / 255.0
        a = (a[..., :-1] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def read_rgb(path):
    """PIL RGB image from any common format, 16-bit and alpha included; DataError if unreadable."""
    try:
        with Image.open(path) as im:
            if im.mode == "RGB":
                im.load()
                return im.copy()
            if im.mode in ("L", "LA", "RGBA", "P", "PA", "CMYK", "YCbCr"):
                im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
            return Image.fromarray(_to_rgb_array(np.array(im)))
    except Exception as pil_error:  # PIL cannot do e.g. 16-bit RGB TIFF: try tifffile/imageio
        try:
            import skimage.io
            return Image.fromarray(_to_rgb_array(skimage.io.imread(path)))
        except Exception:
            reason = str(pil_error).replace(str(path), "").strip(" :'") or type(pil_error).__name__
            raise DataError(f"unreadable image {path}: {reason}") from None


def _header_error(path):
    """None if the file's header reads as an image, else the reason. Only the header: PIL opens
    lazily. Files PIL cannot identify get the full read_rgb fallback (16-bit RGB TIFF, ...)."""
    try:
        with Image.open(path) as im:
            if im.width > 0 and im.height > 0:
                return None
    except Exception:  # noqa: BLE001 - any failure sends it to the fallback reader
        pass
    try:
        read_rgb(path)
        return None
    except DataError as e:
        return str(e)


def check_headers(paths, skip_bad=False, root=None):
    """Open every file's header (threads; a progress bar past a few thousand files) before any
    training, so that a bad file is named now and not at whatever hour the sampler draws it.
    -> (readable paths, names of the unreadable ones). Unreadable files: one DataError naming
    them all, or with skip_bad a note naming the first ten, and they are left out."""
    errors = _node_header_errors(paths)
    bad = [str(Path(p).relative_to(root)) if root else str(p)
           for p, e in zip(paths, errors) if e is not None]
    if not bad:
        return list(paths), []
    where = f" under {root}" if root else ""
    shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    if not skip_bad:
        raise DataError(f"{len(bad)} of {len(paths)} files{where} are not readable images: "
                        f"{shown}; fix or remove them, or pass --skip-bad to leave them out")
    if len(bad) == len(paths):
        raise DataError(f"--skip-bad: none of the {len(paths)} files{where} is a readable image")
    if cdist.get_rank() == 0:
        print(f"--skip-bad: left out {len(bad)} unreadable files{where}: {shown}", flush=True)
    return [p for p, e in zip(paths, errors) if e is None], bad


def _node_header_errors(paths):
    """_header_error of every path, read once per node: local rank 0 opens the files and every
    rank takes its node's answer (collective: every rank builds the same dataset). Each node
    reads its own copy, so node-local data copies are checked too."""
    import os
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    local = int(os.environ.get("LOCAL_RANK", "0")) if cdist.is_dist() else 0
    errors = [None] * len(paths)
    if local == 0:
        with ThreadPoolExecutor(16) as pool:
            errors = list(tqdm(pool.map(_header_error, paths, chunksize=64), total=len(paths),
                               desc="checking image headers", disable=len(paths) < 5000,
                               leave=False, file=sys.stdout))
    if cdist.is_dist():  # the node's local rank 0, found by host name (whatever the numbering;
        # containers that give every node the same host name would need another node key)
        import socket
        found = [None] * cdist.get_world_size()
        mine = {i: e for i, e in enumerate(errors) if e is not None} if local == 0 else None
        torch.distributed.all_gather_object(found, (socket.gethostname(), local, mine))
        node = next(f[2] for f in found if f[:2] == (socket.gethostname(), 0))
        errors = [node.get(i) for i in range(len(paths))]
    return errors


def find_images(root):
    return sorted(p for p in Path(root).rglob("*")
                  if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not p.name.startswith("._"))


# ---------------------------------------------------------------------------------------------
# Datasets: (PIL RGB image, label) pairs

class ImageList(torch.utils.data.Dataset):
    """Images from a list of paths. With skip_bad an unreadable image is replaced by the next
    readable one (deterministically) and counted in the sample's `skipped` field."""

    def __init__(self, paths, labels, classes, skip_bad=False, left_out=()):
        self.paths, self.targets, self.classes = [str(p) for p in paths], list(labels), classes
        self.skip_bad, self.left_out = skip_bad, list(left_out)  # unreadable files left out

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        """-> (image, label, number of unreadable images skipped to get it)."""
        for skipped in range(len(self)):
            j = (i + skipped) % len(self)
            try:
                return read_rgb(self.paths[j]), self.targets[j], skipped
            except DataError as e:
                if not self.skip_bad:
                    raise
                print(f"warning: skipping {e}", file=sys.stderr)
        raise DataError("--skip-bad: no readable image in the dataset")

    def __getitem__(self, i):
        return self.load(i)[:2]


def nct_dataset(root, train_list=None, skip_bad=False):
    """NCT-CRC-HE-100K / -NONORM / CRC-VAL-HE-7K. The class of a tile is its nearest ancestor
    folder named after a class: the official zips nest inconsistently (docs/datasets.md 1)."""
    root = Path(root)
    found = {}
    for p in find_images(root):
        cls = next((a.name for a in p.relative_to(root).parents if a.name in NCT_CLASSES), None)
        if cls is not None:
            found[f"{cls}/{p.name}"] = (p, NCT_CLASSES.index(cls))
    if not found:
        raise DataError(f"--data nct: no image under {root} sits in a folder named after an NCT "
                        f"class ({', '.join(NCT_CLASSES)}); use --data folder for other layouts")
    if train_list:
        keys = _read_list(train_list)
        missing = [k for k in keys if k not in found]
        if missing:
            raise DataError(f"--train-list {train_list}: {len(missing)} of {len(keys)} entries "
                            f"not found under {root}, e.g. {missing[0]}")
        items = [found[k] for k in keys]
    else:
        items = [found[k] for k in sorted(found)]
    good, bad = check_headers([p for p, _ in items], skip_bad, root)
    good = set(good)
    items = [(p, y) for p, y in items if p in good]
    return ImageList([p for p, _ in items], [y for _, y in items], list(NCT_CLASSES), skip_bad,
                     left_out=bad)


def _read_list(path):
    """ConCL-style list (`MUS/MUS-SNSFKSAN.tif` or `... label`, CRLF or LF) -> 'CLASS/file'."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"--train-list {path}: {e.strerror}") from None
    keys = ["/".join(Path(ln.split()[0].replace("\\", "/")).parts[-2:]) for ln in lines if ln.strip()]
    if not keys:
        raise DataError(f"--train-list {path} is empty")
    return keys


def folder_dataset(root, skip_bad=False):
    """Any folder of images, searched recursively. Images inside first-level sub-folders take
    the sub-folder as class (probes can use it); images directly under the root get label -1."""
    root = Path(root)
    paths = find_images(root)
    if not paths:
        raise DataError(f"no images ({' '.join(IMAGE_EXTS)}) under {root}")
    paths, bad = check_headers(paths, skip_bad, root)
    tops = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None
            for p in paths]
    classes = sorted({t for t in tops if t is not None})
    labels = [classes.index(t) if t is not None else -1 for t in tops]
    return ImageList(paths, labels, classes, skip_bad, left_out=bad)


# ---------------------------------------------------------------------------------------------
# A tile store: every tile decoded once (python -m common.store) into one uint8 memory-mapped
# array (N, H, W, 3) `tiles.u8` beside `index.json` (paths relative to the source root, labels,
# classes, each source file's size and mtime, each tile's CRC-32, the command that packed it).

STORE_VERSION = 1


def store_command(index_or_root):
    """The command that (re)packs a store: the one recorded in its index, else a template."""
    cmd = index_or_root.get("command") if isinstance(index_or_root, dict) else None
    return cmd or f"python -m common.store --data nct --data-root DIR --out {index_or_root}"


def read_store_index(path):
    """A finished store's index (dict), checked against its tiles file's size; DataError naming
    what to rerun for a missing, unfinished, unreadable or truncated store."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if not path.is_dir():
        if partial.is_dir():
            try:
                cmd = json.loads((partial / "plan.json").read_text())["command"]
            except (OSError, ValueError, KeyError):
                cmd = store_command(path)
            raise DataError(f"--data-store {path} is not finished ({partial} holds a pack in "
                            f"progress); rerun to complete it: {cmd}")
        raise DataError(f"--data-store {path} does not exist; pack it first: {store_command(path)}")
    try:
        index = json.loads((path / "index.json").read_text())
        if index.get("version") != STORE_VERSION:
            raise ValueError(f"format version {index.get('version')}, expected {STORE_VERSION}")
        n, h, w = index["count"], index["height"], index["width"]
        for key in ("paths", "labels", "crc32", "file_sizes", "file_mtimes_ns"):
            if len(index[key]) != n:
                raise ValueError(f"{len(index[key])} {key} for {n} tiles")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--data-store {path}: unreadable index.json ({e}); delete {path} and "
                        f"pack it again: {store_command(path)}") from None
    size = (path / "tiles.u8").stat().st_size if (path / "tiles.u8").exists() else 0
    if size != n * h * w * 3:
        raise DataError(f"--data-store {path} is truncated: tiles.u8 has {size} bytes, {n} tiles "
                        f"of {w}x{h} need {n * h * w * 3}; delete {path} and pack it again: "
                        f"{store_command(index)}")
    return index


class StoreTiles(torch.utils.data.Dataset):
    """(PIL RGB image, label) items read from a tile store, as ImageList reads them from the
    files: the same pixels (lossless formats), so the same views. `tile(i)` is the uint8
    (H, W, 3) array itself (a view of the memory map: --device-crop gathers these). Opening
    checks the index, the file's size, the CRC of 17 tiles spread over the store and, when the
    source folder is there, every source file's size and mtime and the folder's listing (a
    stale store, with tiles changed, gone or added since packing, is named)."""

    def __init__(self, path, check_sources=True):
        self.path = Path(path)
        index = read_store_index(self.path)
        self.index, self.command = index, store_command(index)
        self.root = Path(index["root"])
        self.paths = [str(self.root / p) for p in index["paths"]]
        self.targets, self.classes = list(index["labels"]), list(index["classes"])
        self.left_out = list(index.get("left_out", []))
        self.shape = (index["count"], index["height"], index["width"], 3)
        self._tiles, self.device_crop = None, False
        n = len(self)
        for i in sorted({k * (n - 1) // 16 for k in range(17)}) if n else []:
            if zlib.crc32(self.tile(i).tobytes()) != index["crc32"][i]:
                raise DataError(f"--data-store {self.path} is corrupt: tile {i} "
                                f"({index['paths'][i]}) does not match its CRC; delete "
                                f"{self.path} and pack it again: {self.command}")
        if check_sources and self.root.is_dir():
            self._check_sources()

    def _check_sources(self):
        changed = []
        for rel, size, mtime in zip(self.index["paths"], self.index["file_sizes"],
                                    self.index["file_mtimes_ns"]):
            try:
                st = (self.root / rel).stat()
                if st.st_size != size or st.st_mtime_ns != mtime:
                    changed.append(rel)
            except OSError:
                changed.append(rel)
        if changed:
            raise DataError(f"--data-store {self.path} is stale: {len(changed)} of {len(self)} "
                            f"source files under {self.root} changed or went since packing "
                            f"(e.g. {changed[0]}); delete {self.path} and pack it again: "
                            f"{self.command}")
        added, listed = self._added(), self.index.get("train_list")
        if added and listed:
            raise DataError(f"--data-store {self.path} is stale: --train-list {listed} changed "
                            f"since packing; delete {self.path} and pack it again: "
                            f"{self.command}")
        if added:
            raise DataError(f"--data-store {self.path} is stale: {len(added)} image files under "
                            f"{self.root} are not in it (added since packing, e.g. {added[0]}); "
                            f"delete {self.path} and pack it again: {self.command}")

    def _added(self):
        """Tiles the packer's listing would take now and did not then: the source folder listed
        again as the packer lists it (one directory walk, as cheap as the size checks above),
        or with --train-list a changed list (its SHA-1, recorded by newer packs)."""
        import hashlib
        import os
        index = self.index
        if index.get("train_list"):
            try:
                now = hashlib.sha1(Path(index["train_list"]).read_bytes()).hexdigest()
            except OSError:
                return []  # the list is not on this node: nothing to compare
            was = index.get("train_list_sha1")
            return ["the list"] if was and now != was else []

        def key(rel):  # nct: the tile's CLASS/name, as nct_dataset keys (and de-duplicates) it
            rel = Path(rel)
            if index["data"] != "nct":
                return rel.as_posix()
            cls = next((a.name for a in rel.parents if a.name in NCT_CLASSES), None)
            return cls and f"{cls}/{rel.name}"
        known = {key(r) for r in list(index["paths"]) + list(index.get("left_out", []))}
        added = []
        # find_images' listing at a twentieth of its cost (os.walk reads the file types from the
        # directory, no stat per file: ~2 us a file); a candidate is confirmed as it would be
        for folder, _, names in os.walk(self.root):  # symlinked folders not followed, as rglob
            for name in names:
                if name.lower().endswith(IMAGE_EXTS) and not name.startswith("._"):
                    rel = Path(os.path.relpath(os.path.join(folder, name), self.root))
                    k = key(rel)
                    if k is not None and k not in known and (self.root / rel).is_file():
                        added.append(k)
        return sorted(added)

    @property
    def tiles(self):
        if self._tiles is None:  # opened in each process (a memmap must not be pickled)
            # read-only, shared: a copy-on-write ("c") map would be a private writable mapping,
            # which Linux charges in full to every process (an NCT store of 15 GB in each rank
            # and loader worker; a store larger than RAM + swap cannot even be opened)
            self._tiles = np.memmap(self.path / "tiles.u8", np.uint8, "r", shape=self.shape)
        return self._tiles

    def __getstate__(self):
        return {**self.__dict__, "_tiles": None}

    def __len__(self):
        return self.shape[0]

    def tile(self, i):
        return self.tiles[i]

    def load(self, i):
        return Image.fromarray(np.asarray(self.tile(i)), "RGB"), self.targets[i], 0

    def __getitem__(self, i):
        return self.load(i)[:2]


def store_dataset(args):
    """--data-store: the store's tiles; --data, --data-root and --train-list become the store's
    (given ones must agree), --device-crop switches on --device-aug."""
    ds = StoreTiles(args.data_store)
    index = ds.index
    for flag, attr, value in (("--data-root", "data_root", index["root"]),
                              ("--train-list", "train_list", index.get("train_list"))):
        given = getattr(args, attr, None)
        if given and (not value or Path(given).resolve() != Path(value).resolve()):
            raise DataError(f"{flag} {given} differs from the one --data-store {args.data_store} "
                            f"was packed from ({value}); drop {flag} or pack another store")
        setattr(args, attr, value)
    args.data = index["data"]
    if getattr(args, "device_crop", False):  # read by common.augment.DeviceAugment
        args.device_aug = ds.device_crop = True
    return ds


def build_dataset(args):
    """The (image, label) dataset the flags name; DataError with one clear line otherwise."""
    if getattr(args, "data_store", None):
        return store_dataset(args)
    if getattr(args, "device_crop", False):
        raise DataError("--device-crop needs --data-store STORE (pack one with "
                        "python -m common.store --data ... --out STORE)")
    if args.data == "demo":
        from common.demo import DemoTiles
        return DemoTiles(n=args.demo_size, seed=args.seed)
    if not args.data_root:
        raise DataError(f"--data {args.data} needs --data-root PATH")
    root = Path(args.data_root)
    if not root.exists():
        raise DataError(f"--data-root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    if args.data == "nct":
        return nct_dataset(root, args.train_list, args.skip_bad)
    return folder_dataset(root, args.skip_bad)


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=["nct", "folder", "demo"], default="demo",
                   help="nct: NCT-CRC-HE-100K class folders; folder: any image tree; "
                        "demo: embedded tiles, no download")
    g.add_argument("--data-root", help="dataset folder (nct, folder)")
    g.add_argument("--train-list", help="image list (CLASS/file.tif per line) restricting --data "
                   "nct; ConCL pre-trained on an 80,000-tile list (data/NCT/meta/train.txt)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images (counted in the log) instead of stopping")
    g.add_argument("--demo-size", type=positive_int, default=480, help="number of --data demo tiles")
    g.add_argument("--data-store", metavar="STORE",
                   help="train from a tile store packed once by `python -m common.store` (every "
                        "tile decoded into one uint8 memory-mapped array): --data, --data-root "
                        "and --train-list are read from it; the views are the same")
    g.add_argument("--device-crop", action="store_true",
                   help="with --data-store: the loader only gathers uint8 tiles and draws the "
                        "views' parameters (the same numbers); crop, resize (Pillow's filter "
                        "weights, common.crop), flip and the photometric ops run on the training "
                        "device. Implies --device-aug")
    g.add_argument("--workers", type=nonneg_int, default=8,
                   help="data loader processes per training process (GPU); 0 = load in the "
                        "training process")
    return g


# ---------------------------------------------------------------------------------------------
# Views

def pil_to_uint8(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class GaussianBlur:
    """Gaussian blur with sigma ~ U(sigma), drawn from torch's RNG.

    kernel=None applies PIL's GaussianBlur(radius=sigma), exactly what the official MoCo and
    OpenSelfSup (ConCL's NCT recipes) code does. docs/methods.md 0.4 suggests torchvision's 23-px
    kernel everywhere instead (kernel=23): on real NCT tiles the two differ by < 1 grey level
    on average (up to ~30 at sharp edges; PIL approximates the Gaussian with box blurs) and the
    exact kernel costs 5-6x more CPU (11 vs 2 ms at 224 px, one core).
    """

    def __init__(self, sigma=(0.1, 2.0), kernel=None):
        self.sigma, self.kernel = sigma, kernel

    def __call__(self, img):
        lo, hi = self.sigma  # a range of one value (common.augment: a drawn sigma) draws nothing
        s = float(lo) if lo == hi else float(torch.empty(1).uniform_(lo, hi))
        if self.kernel:
            return T.functional.gaussian_blur(img, self.kernel, s)
        return img.filter(ImageFilter.GaussianBlur(radius=s))

    def __repr__(self):
        return f"GaussianBlur(sigma={self.sigma}, kernel={self.kernel or 'PIL'})"


class Solarize:
    """Pixels >= threshold become 255 - x (BYOL view 2)."""

    def __init__(self, threshold=128):
        self.threshold = threshold

    def __call__(self, img):
        return T.functional.solarize(img, self.threshold)


class View:
    """One augmented view: RandomResizedCrop and horizontal flip with their geometry recorded,
    any further geometric ops (`geometric`, on the PIL view: SimCLR histo's rotations), then the
    method's photometric ops: a common.augment.Photometric description (or any callable on PIL).

    Returns (uint8 CHW tensor, box (x0, y0, x1, y1) in original-image pixels, flipped). The flip
    is drawn before the photometric ops; they are pointwise or symmetric, so the distribution
    equals the usual crop-colour-blur-flip order. `draw` also returns the photometric parameters
    and can leave the ops to the device (--device-aug, common.augment).

    `geometric` is a callable on PIL or, to run on the device as well (--device-crop), an object
    with `sample()` -> (G,) float64 parameters drawn from torch's RNG, `apply_pil(img, params)`
    and `apply_batch(x, params)` ((N, C, S, S) uint8 on the device, (N, G)): the same pixels.
    """

    def __init__(self, size, scale, ratio=(3 / 4, 4 / 3), flip_p=0.5, photometric=None,
                 interpolation=Image.BILINEAR, geometric=None):
        self.size, self.scale, self.ratio, self.flip_p = size, scale, ratio, flip_p
        self.photometric, self.interpolation, self.geometric = photometric, interpolation, geometric

    def __call__(self, img):
        return self.draw(img)[:3]

    def draw(self, img, apply_photometric=True):
        """-> (uint8 CHW, box, flipped, photometric parameters: common.augment vector or None).
        The same random numbers are drawn whether the photometric ops are applied or not."""
        top, left, h, w = crop_box(img.height, img.width, self.scale, self.ratio)
        box = (left, top, left + w, top + h)
        out = img.resize((self.size, self.size), self.interpolation, box=box)
        flip = bool(torch.rand(1) < self.flip_p)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        g = self.geometric
        if hasattr(g, "sample"):  # parameters drawn first, so draw_params draws the same
            out = g.apply_pil(out, g.sample())
        elif g is not None:
            out = g(out)
        params, ph = None, self.photometric
        if hasattr(ph, "sample"):  # a common.augment.Photometric description
            params = ph.sample()
            if apply_photometric:
                out = ph.apply_cpu(out, params)
        elif ph is not None:  # any callable on PIL: CPU only
            out = ph(out)
        return pil_to_uint8(out), torch.tensor(box, dtype=torch.float32), flip, params

    def draw_params(self, size):
        """draw()'s random numbers without its pixels (--device-crop: common.crop does the crop
        on the device) for an image of size (H, W): -> (box, flipped, photometric parameters or
        None, geometric parameters or None). The same calls in the same order as draw(), so the
        same numbers."""
        g = self.geometric
        if g is not None and not hasattr(g, "sample"):
            raise DataError(f"--device-crop: this view has further geometric ops "
                            f"({g}) that run on PIL only; run without --device-crop")
        top, left, h, w = crop_box(*size, self.scale, self.ratio)
        flip = bool(torch.rand(1) < self.flip_p)
        geo = g.sample() if g is not None else None
        params = self.photometric.sample() if hasattr(self.photometric, "sample") else None
        box = torch.from_numpy(np.array((left, top, left + w, top + h), dtype=np.float32))
        return box, flip, params, geo

    def __repr__(self):
        return (f"View(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"flip_p={self.flip_p}, geometric={self.geometric}, "
                f"photometric={self.photometric})")


class _Probe:
    """Photometric.sample's draws, both ways (the self-check below)."""

    def sample(self):
        return torch.tensor(torch.rand(9, dtype=torch.float64).tolist()
                            + torch.randperm(4).tolist(), dtype=torch.float64)

    def vector(self, u, order):
        return torch.tensor(u + order, dtype=torch.float64)


@functools.lru_cache(maxsize=1)
def _words_agree():
    """Once per process: draw_views equals the torch calls on 64 seeds (a torch whose kernels
    draw otherwise keeps the torch calls: the numbers never change, only their cost)."""
    views = [View(24, (0.08, 1.0), photometric=_Probe()), View(24, (0.9, 1.0), (0.5, 2.0), 0.3)]
    for seed in range(64):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(seed, 1, 2))
            want = [v.draw_params((40, 300)) for v in views]
        got = draw_views(views, (40, 300), sample_seed(seed, 1, 2))
        if any(not torch.equal(a[0], b[0]) or a[1] != b[1] or
               (a[2] is not None and not torch.equal(a[2], b[2])) for a, b in zip(want, got)):
            return False
    return True


def _fast_views(views):
    """Whether draw_views can draw these views: plain Views (no further geometric ops, no
    draw_params of their own) whose photometric ops are a description with `vector` or none
    drawn, default dtype float32 (crop_box's tensors), and this torch's kernels draw as
    draw_views reads them (_words_agree)."""
    return torch.get_default_dtype() == torch.float32 and all(
        type(v).draw_params is View.draw_params and v.geometric is None
        and (not hasattr(v.photometric, "sample") or hasattr(v.photometric, "vector"))
        for v in views) and _words_agree()


class MultiViewDataset(torch.utils.data.Dataset):
    """Applies one View per entry of `views` to the same decoded image.

    Sample: {"views": [uint8 CHW]*V, "boxes": [(4,)]*V, "flips": [bool]*V, "label", "index",
    "skipped"}; with device_aug (set by --device-aug, common.augment.DeviceAugment) the views
    leave without their photometric ops and "photo": [(P,) parameters]*V carries them.
    Randomness comes from (seed, epoch, index) only; call set_epoch before each epoch's iterator
    is created: set_epoch is called in the main process each epoch and, in the (persistent)
    workers, with every index (pretrain_loader). Attributes set after the first batch do not
    reach the workers.
    """

    def __init__(self, base, views, seed=0):
        self.base, self.views, self.seed, self.epoch = base, list(views), seed, 0
        self.device_aug = False
        self.device_crop = False  # --device-crop (set by common.augment.DeviceAugment)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if self.device_crop:  # the tile as stored and the views' numbers; pixels on the device
            tile = self.base.tile(i)
            sample = self.draw_params(tile, i)
            # the store's read-only map is copied here (torch takes writable arrays only); a
            # writable array would go to collate's stack as it is
            tile = torch.from_numpy(tile if tile.flags.writeable else np.array(tile))
            sample.update(tile=tile, label=self.base.targets[i], index=i, skipped=0)
            return sample
        if hasattr(self.base, "load"):
            img, label, skipped = self.base.load(i)
        else:
            (img, label), skipped = self.base[i], 0
        sample = self.augment(img, i)
        sample.update(label=label, index=i, skipped=skipped)
        return sample

    def augment(self, img, i):
        """The views of one image; methods that need more per sample (a reference view, masks)
        extend this in their own file."""
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues CUDA/MPS/XPU seeding with a
            # stack trace each (~0.1 ms a sample); the draws are the same
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))
            out = [v.draw(img, apply_photometric=not self.device_aug) for v in self.views]
        sample = {"views": [o[0] for o in out], "boxes": [o[1] for o in out],
                  "flips": [o[2] for o in out]}
        if self.device_aug:  # views without photometric ops: an empty vector
            sample["photo"] = [o[3] if o[3] is not None else torch.zeros(0, dtype=torch.float64)
                               for o in out]
        return sample

    def draw_params(self, tile, i):
        """--device-crop: augment()'s random numbers for the stored tile (H, W, 3) (a view of
        the store: its shape is all this needs), the same numbers augment() draws, without
        pixels: {"boxes", "flips", "photo", "geo"}. Plain Views take draw_views (the torch
        generator's words read in Python: a fraction of the torch calls' cost, torch's RNG
        untouched); others the torch calls under fork_rng. A method whose augment() builds
        more per sample (a reference box, masks) extends this in its own file too."""
        seed = sample_seed(self.seed, self.epoch, i)
        if _fast_views(self.views):  # the same numbers, read from the generator's words here
            out = draw_views(self.views, tile.shape[:2], seed)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                out = [v.draw_params(tile.shape[:2]) for v in self.views]
        empty = lambda p: p if p is not None else _NO_PARAMS  # noqa: E731
        return {"boxes": [o[0] for o in out], "flips": [o[1] for o in out],
                "photo": [empty(o[2]) for o in out], "geo": [empty(o[3]) for o in out]}


_NO_PARAMS = torch.zeros(0, dtype=torch.float64)  # a view without photometric / geometric ops


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (shuffle per epoch via set_epoch, drop_last) that can start part-way
    through an epoch, so a resumed run sees exactly the batches the interrupted one did not."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_start(self, n):
        self.start = n

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def worker_init(_):
    # A scheduler's SIGTERM (or Ctrl-C) reaches the whole process group. The main process
    # checkpoints after the current step and needs its workers alive until then.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@atexit.register
def _kill_workers():
    # Workers ignore SIGTERM (above), so multiprocessing's own exit hook, which terminates and
    # then joins daemonic children, would wait forever when the process leaves on an error.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


class _EpochTagged(torch.utils.data.Sampler):
    """Yields (epoch, index) for the sampler's indices: persistent workers (forked once) learn
    each epoch from the indices they are sent, so per-sample seeding stays (seed, epoch, index)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


class _EpochDataset(torch.utils.data.Dataset):
    """The dataset as the workers see it: an (epoch, index) key sets the epoch of the worker's
    copy (its set_epoch), then draws the sample. `inner` is the dataset itself."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __getitem__(self, key):
        epoch, i = key
        if getattr(self.inner, "epoch", None) != epoch:
            self.inner.set_epoch(epoch)
        return self.inner[i]


PREFETCH = 4  # batches in flight per loader worker


def _shm_free():
    import shutil
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None  # no /dev/shm (macOS, ...): nothing to check


def _nbytes(x):
    if torch.is_tensor(x):
        return x.nbytes
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 8  # numbers: collated into 8-byte tensors


def check_shm(dataset, batch_size, workers):
    """Worker batches travel through /dev/shm: workers x PREFETCH batches per process, times the
    processes on this node. A container's default 64 MB /dev/shm refuses them with an obscure
    bus error mid-epoch; say now, in one line, what to do. The sample size is one sample drawn
    here (index 0)."""
    import math
    import os
    free = _shm_free()
    if workers == 0 or free is None:
        return
    try:
        sample = dataset[0]
    except Exception:  # noqa: BLE001 - a bad sample is reported by the loader, with its name
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = local * workers * PREFETCH * batch_size * _nbytes(sample)
    if need > free:
        gib = max(1, math.ceil(2 * need / 2**30))
        raise DataError(
            f"/dev/shm has {free / 2**20:.0f} MiB free, but {local} process(es) x --workers "
            f"{workers} x {PREFETCH} batches of {batch_size} in flight need ~{need / 2**20:.0f} "
            f"MiB: give the container more shared memory (docker run --shm-size={gib}g; "
            "Kubernetes: an emptyDir with medium Memory on /dev/shm) or lower --workers")


def pretrain_loader(dataset, batch_size, workers, seed, device):
    """(loader, sampler): the sampler's epoch and start (ResumableSampler) choose the batches;
    workers stay alive across epochs (persistent) and get the epoch with every index."""
    world, rank = cdist.get_world_size(), cdist.get_rank()
    if len(dataset) < batch_size * world:
        raise DataError(f"{len(dataset)} images are fewer than one global batch "
                        f"({world} x {batch_size}); lower --batch-size")
    check_shm(dataset, batch_size, workers)
    sampler = ResumableSampler(dataset, world, rank, seed)
    loader = torch.utils.data.DataLoader(
        _EpochDataset(dataset), batch_size=batch_size, sampler=_EpochTagged(sampler),
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=workers > 0, worker_init_fn=worker_init,
        prefetch_factor=PREFETCH if workers > 0 else None)
    return loader, sampler


_NORM = {}  # device -> (mean, std) on it: built once, not copied to the device every step


def to_device(x, device, channels_last=False):
    """uint8 (N, 3, H, W) -> ImageNet-normalised float on the device."""
    x = x.to(device, non_blocking=True).float().div_(255)
    key = str(torch.device(device))
    if key not in _NORM:
        _NORM[key] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1)
                           for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _NORM[key]
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
