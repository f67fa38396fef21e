"""Pre-training data: NCT-CRC-HE-100K, any folder of images, the embedded demo tiles, and the
multi-view wrapper that carries each view's crop box and flip.

Images leave the loader as uint8 CHW tensors; `to_device` normalises them on the device. That
keeps float conversion and normalisation off the CPU workers and sends a quarter of the bytes.

Augmentation is per sample and seeded from (seed, epoch, index): a sample looks the same in any
worker, with any number of workers, and after a resume in the middle of an epoch. The photometric
ops are described per view by common.augment.Photometric and run here, per image, or with
--device-aug batched on the training device from parameters drawn here.
"""
import atexit
import multiprocessing
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from common import dist as cdist
from common.cli import nonneg_int, positive_int

# Our label order (alphabetical, as MedMNIST, eva and the Zenodo folders); ConCL's lists use
# another order, which only matters for their *_labeled.txt files (datasets.md 1).
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
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    with ThreadPoolExecutor(16) as pool:
        errors = list(tqdm(pool.map(_header_error, paths, chunksize=64), total=len(paths),
                           desc="checking image headers", disable=len(paths) < 5000,
                           leave=False, file=sys.stdout))
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
    folder named after a class: the official zips nest inconsistently (datasets.md 1)."""
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


def build_dataset(args):
    """The (image, label) dataset the flags name; DataError with one clear line otherwise."""
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
    OpenSelfSup (ConCL's NCT recipes) code does. methods.md 0.4 suggests torchvision's 23-px
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
        top, left, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        box = (left, top, left + w, top + h)
        out = img.resize((self.size, self.size), self.interpolation, box=box)
        flip = bool(torch.rand(1) < self.flip_p)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if self.geometric is not None:
            out = self.geometric(out)
        params, ph = None, self.photometric
        if hasattr(ph, "sample"):  # a common.augment.Photometric description
            params = ph.sample()
            if apply_photometric:
                out = ph.apply_cpu(out, params)
        elif ph is not None:  # any callable on PIL: CPU only
            out = ph(out)
        return pil_to_uint8(out), torch.tensor(box, dtype=torch.float32), flip, params

    def __repr__(self):
        return (f"View(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"flip_p={self.flip_p}, geometric={self.geometric}, "
                f"photometric={self.photometric})")


def sample_seed(*keys):
    """A 63-bit seed from a tuple of integers (seed, epoch, index, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


class MultiViewDataset(torch.utils.data.Dataset):
    """Applies one View per entry of `views` to the same decoded image.

    Sample: {"views": [uint8 CHW]*V, "boxes": [(4,)]*V, "flips": [bool]*V, "label", "index",
    "skipped"}; with device_aug (set by --device-aug, common.augment.DeviceAugment) the views
    leave without their photometric ops and "photo": [(P,) parameters]*V carries them.
    Randomness comes from (seed, epoch, index) only; call set_epoch before each epoch's iterator
    is created (workers are re-forked per epoch and pick it up).
    """

    def __init__(self, base, views, seed=0):
        self.base, self.views, self.seed, self.epoch = base, list(views), seed, 0
        self.device_aug = False

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
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
        if self.device_aug:
            from common.augment import P
            sample["photo"] = [o[3] if o[3] is not None else torch.zeros(P, dtype=torch.float64)
                               for o in out]
        return sample


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


def pretrain_loader(dataset, batch_size, workers, seed, device):
    world, rank = cdist.get_world_size(), cdist.get_rank()
    if len(dataset) < batch_size * world:
        raise DataError(f"{len(dataset)} images are fewer than one global batch "
                        f"({world} x {batch_size}); lower --batch-size")
    sampler = ResumableSampler(dataset, world, rank, seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=False,
        worker_init_fn=worker_init,
        prefetch_factor=4 if workers > 0 else None)
    return loader, sampler


def to_device(x, device, channels_last=False):
    """uint8 (N, 3, H, W) -> ImageNet-normalised float on the device."""
    x = x.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
