"""Instance segmentation data for the Mask R-CNN fine-tuner: GlaS, CRAG, generated glands, and any
folder of images with instance label maps (nuclei, ...).

- GlaS (MICCAI 2015, "Warwick-QU"): 165 H&E images of colorectal tissue, train 85, Test A 60,
  Test B 20; "test" here is Test A + Test B (80 images: 37 benign + 43 malignant, as the ConCL
  paper's appendix C counts). Accepted layout: the zip's one flat folder
  `Warwick QU Dataset (Released 2016_07_08)/` holding `train_1.bmp`, `train_1_anno.bmp`, ...,
  `testA_*`, `testB_*` and `Grade.csv` (CR-only line ends, leading spaces), or its parent.
- CRAG v2 (MILD-Net): 173 train / 40 test PNG tiles of about 1512 x 1516. Accepted layouts:
  `CRAG/{train,valid|test}/{Images,Annotation|Annotations}/<stem>.png`, given as `CRAG/`,
  `CRAG_v2/` (holding `CRAG/`) or the parent of either; image and label map pair by file stem.
- demo: `demo_glands` draws H&E-like fields of 2-8 glands with their instance map, no download.
- instances (your own data): `DIR/train/` and `DIR/test/` (or `val/`), each with `images/` and
  `masks/`; every image has a label map of the same stem in masks/ (PNG 8/16-bit, TIFF or
  `.npy`). `python -m common.glands convert-cpm --src DIR --out DIR` writes CPM-15/17's
  images + ASCII `*_mask.txt` in that layout.

Annotations are integer label maps, 0 = background, each other value one gland. A value whose
pixels fall into several disconnected pieces stays ONE instance (one mask, one box around all
pieces): GlaS says "one ground truth object per label", the COCO conversions ConCL trained and
tested on made one instance per distinct value, and the official GlaS evaluation scores a label
as one object. Splitting pieces would change the number of objects AP counts.

Images without any gland: training leaves them out (Detectron2 does the same by default,
DATALOADER.FILTER_EMPTY_ANNOTATIONS) and prints how many; testing keeps them, with zero
instances, and lists them in `dataset.empty`, since COCO AP still counts their false positives.

`python -m common.glands --out glands.png` draws demo fields with their instances outlined.
"""
import argparse
import csv
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.data import IMAGE_EXTS, DataError, read_rgb, sample_seed
from common.demo import N, _noise, _nuclei, _render, _stroma

GLAS_SPLITS = {"train": ("train",), "testA": ("testA",), "testB": ("testB",),
               "test": ("testA", "testB")}
PALETTE = [(0, 200, 0), (230, 0, 230), (0, 160, 255), (255, 140, 0), (255, 230, 0),
           (0, 220, 200), (255, 60, 60), (140, 90, 255)]


def _natural(s):
    """Sort key putting train_2 before train_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ---------------------------------------------------------------------------------------------
# Label maps -> instances

def read_label_map(path):
    """(H, W) integer instance map; palette images give their indices, 16-bit stays 16-bit,
    `.npy` arrays are taken as they are (floats only when they hold whole numbers).
    3-channel files (some GlaS `_anno.bmp` copies) give channel 0 when it tells every colour apart
    (grey stored as RGB, or ids in channel 0 beside other data); a colour-coded instance map whose
    glands share a red value gives the colour itself as the id (black = background), so two
    glands differing only in green or blue stay two glands."""
    try:
        if Path(path).suffix.lower() == ".npy":
            a = np.load(path, allow_pickle=False)
            if a.dtype.kind == "f" and not (np.isfinite(a).all() and (a == np.round(a)).all()):
                raise DataError(f"label map {path} holds fractions: need integer instance ids")
        else:
            with Image.open(path) as im:
                a = np.array(im)  # 'P' -> indices, 'I;16' -> uint16: no convert(), it would remap
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"unreadable label map {path}: {type(e).__name__}") from None
    if a.ndim not in (2, 3):
        raise DataError(f"label map {path} has shape {a.shape}: need (H, W)")
    if a.ndim == 3 and a.shape[2] < 3:  # grey + alpha
        a = a[..., 0]
    if a.ndim == 3:
        a = a[..., :3].astype(np.int64)  # an alpha channel is not part of the id
        colour = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
        a = a[..., 0]
        if len(np.unique((a << 24) | colour)) > len(np.unique(a)):  # channel 0 merges colours
            a = colour
    if a.dtype.kind not in "iu":  # '1' (bool) or 'F' (float) images, float .npy
        a = a.astype(np.int64)
    return a


def instances(label):
    """label (H, W) int -> masks uint8 (N, H, W), boxes float32 (N, 4), ids int64 (N,).

    One instance per distinct non-zero id in sorted order, even when its pixels form several
    pieces (see the module docstring). Boxes are (x0, y0, x1, y1) on pixel edges, as COCO and
    torchvision: a one-pixel object at column 5 spans x0 = 5 to x1 = 6. About 50 ms for a
    1512 x 1516 map with 50 ids, most of it building the masks the model needs anyway.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    h, w = label.shape
    ids = np.unique(label)
    ids = ids[ids != 0]
    masks = label[None] == ids[:, None, None]
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W) projections: first/last True
    boxes = np.stack([cols.argmax(1), rows.argmax(1),
                      w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)], 1)
    return masks.view(np.uint8), boxes.astype(np.float32).reshape(-1, 4), ids.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Finding the files

def _check_root(root, what):
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} root {root} is not a folder")
    return root


def _subdirs(d):
    return sorted((c for c in d.iterdir() if c.is_dir()), key=lambda c: _natural(c.name))


def read_grades(path):
    """Grade.csv -> {"testA_1": "benign", ...}. The file has CR-only line ends and a space
    before every header and value; newline="" lets csv see the CRs as line ends."""
    try:
        with open(path, newline="") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f) if r]
        col = rows[0].index("grade (GlaS)") if "grade (GlaS)" in rows[0] else 2
        return {r[0]: r[col] for r in rows[1:] if len(r) > col}
    except (OSError, IndexError, csv.Error) as e:
        raise DataError(f"unreadable Grade.csv {path}: {type(e).__name__}") from None


def glas_items(root, split, require_annotations=True):
    """[{"name", "image", "anno", "grade"}] of a GlaS split (train, test, testA, testB), in split
    then numeric order. `root` is the flat folder or its parent."""
    if split not in GLAS_SPLITS:
        raise DataError(f"GlaS split {split!r}: use one of {', '.join(GLAS_SPLITS)}")
    root = _check_root(root, "GlaS")
    is_glas = lambda d: (d / "Grade.csv").is_file() or any(d.glob("train_*.bmp")) or \
        any(d.glob("test[AB]_*.bmp"))
    d = next((c for c in [root, *_subdirs(root)] if is_glas(c)), None)
    if d is None:
        raise DataError(f"no GlaS layout under {root}: expected train_<n>.bmp, "
                        f"train_<n>_anno.bmp, testA_<n>.bmp, testB_<n>.bmp and Grade.csv in it or "
                        f"in one sub-folder (the zip's 'Warwick QU Dataset (Released 2016_07_08)')")
    grades = read_grades(d / "Grade.csv") if (d / "Grade.csv").is_file() else {}
    items = []
    for prefix in GLAS_SPLITS[split]:
        found = [p for p in d.iterdir() if re.fullmatch(prefix + r"_\d+\.(?i:bmp)", p.name)]
        if not found:
            raise DataError(f"GlaS: no {prefix}_<n>.bmp images in {d}")
        for p in sorted(found, key=lambda p: _natural(p.stem)):
            anno = p.with_name(f"{p.stem}_anno{p.suffix}")
            if not anno.is_file():
                if require_annotations:
                    raise DataError(f"GlaS: {p.name} has no annotation {anno}")
                anno = None
            items.append({"name": p.stem, "image": p, "anno": anno, "grade": grades.get(p.stem)})
    return items


def crag_items(root, split, require_annotations=True):
    """[{"name", "image", "anno", "grade": None}] of a CRAG split (train, test), natural order."""
    if split not in ("train", "test"):
        raise DataError(f"CRAG split {split!r}: use train or test")
    root = _check_root(root, "CRAG")
    has_split = lambda d: any((d / s / "Images").is_dir() for s in ("train", "valid", "test"))
    cands = [root, root / "CRAG"] + [x for c in _subdirs(root) for x in (c, c / "CRAG")]
    d = next((c for c in cands if has_split(c)), None)
    if d is None:
        raise DataError(f"no CRAG layout under {root}: expected train/Images and valid/Images "
                        f"(or test/Images) with Annotation(s)/ beside them, in it, in CRAG/ or "
                        f"one folder down")
    names = ("train",) if split == "train" else ("valid", "test")
    split_dir = next((d / s for s in names if (d / s / "Images").is_dir()), None)
    if split_dir is None:
        raise DataError(f"CRAG: no {' or '.join(s + '/Images' for s in names)} in {d}")
    images = sorted((p for p in (split_dir / "Images").iterdir()
                     if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("._")),
                    key=lambda p: _natural(p.stem))
    if not images:
        raise DataError(f"CRAG: no images in {split_dir / 'Images'}")
    ann_dir = next((split_dir / a for a in ("Annotation", "Annotations")
                    if (split_dir / a).is_dir()), split_dir / "Annotation")
    annos = {p.stem: p for p in ann_dir.glob("*") if p.suffix.lower() in IMAGE_EXTS} \
        if ann_dir.is_dir() else {}
    items = []
    for p in images:
        anno = annos.get(p.stem)
        if anno is None and require_annotations:
            raise DataError(f"CRAG: {p} has no annotation {p.stem}.* in {ann_dir}")
        items.append({"name": p.stem, "image": p, "anno": anno, "grade": None})
    return items


MASK_EXTS = (".png", ".tif", ".tiff", ".npy")


def instance_items(root, split, require_annotations=True):
    """[{"name", "image", "anno", "grade": None}] of `root`/train or `root`/test (else val), each
    holding images/ and masks/ with one label map of the image's stem per image."""
    if split not in ("train", "test"):
        raise DataError(f"instances split {split!r}: use train or test")
    root = _check_root(root, "instances")
    names = ("train",) if split == "train" else ("test", "val")
    split_dir = next((root / s for s in names if (root / s / "images").is_dir()), None)
    if split_dir is None:
        raise DataError(f"no {' or '.join(s + '/images' for s in names)} in {root}: expected "
                        f"train/images, train/masks, test/images (or val/) and test/masks")
    images = sorted((p for p in (split_dir / "images").iterdir()
                     if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")),
                    key=lambda p: _natural(p.stem))
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {split_dir / 'images'}")
    mask_dir = split_dir / "masks"
    masks = {} if not mask_dir.is_dir() else {
        p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in MASK_EXTS}
    items = []
    for p in images:
        anno = masks.get(p.stem)
        if anno is None and require_annotations:
            raise DataError(f"{p} has no label map {p.stem}.png/.tif/.npy in {mask_dir}")
        items.append({"name": p.stem, "image": p, "anno": anno, "grade": None})
    return items


def read_cpm_mask(path):
    """CPM-15/17 ASCII label map: `width height`, then one id per pixel, x fastest."""
    try:
        tokens = Path(path).read_text().split()
        w, h = int(tokens[0]), int(tokens[1])
        a = np.array(tokens[2:], dtype=np.int64)
    except (OSError, ValueError, IndexError) as e:
        raise DataError(f"unreadable CPM mask {path}: {type(e).__name__}") from None
    if a.size != w * h:
        raise DataError(f"CPM mask {path} says {w}x{h} but holds {a.size} values")
    return a.reshape(h, w)


def convert_cpm(src, out, test=(), split="train"):
    """CPM-15/17 (`imageXX.png` + `imageXX_mask.txt` in one folder) -> the instances layout:
    out/<split>/images/<stem>.png (RGB) and out/<split>/masks/<stem>.png (16-bit ids); the
    stems in `test` go to out/test/ instead. Returns {split: number of images}."""
    src = _check_root(src, "CPM")
    masks = sorted(src.glob("*_mask.txt"), key=lambda p: _natural(p.name))
    if not masks:
        raise DataError(f"no *_mask.txt files in {src} (the CPM layout: imageXX.png + "
                        f"imageXX_mask.txt)")
    stems = [m.name[:-len("_mask.txt")] for m in masks]
    lone = sorted((p.name for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTS
                   and p.stem not in stems and not p.name.startswith(".")), key=_natural)
    if lone:  # checked before anything is written
        raise DataError(f"{src / lone[0]} has no {Path(lone[0]).stem}_mask.txt beside it"
                        + (f" (nor {len(lone) - 1} other image(s))" if len(lone) > 1 else "")
                        + "; move it out of --src or add its mask")
    unknown = sorted(set(test) - set(stems), key=_natural)
    if unknown:
        raise DataError(f"--test {' '.join(unknown)}: no such image in {src} (its stems: "
                        f"{stems[0]} ... {stems[-1]})")
    counts = {}
    for m, stem in zip(masks, stems):
        image = next((src / (stem + e) for e in IMAGE_EXTS if (src / (stem + e)).is_file()), None)
        if image is None:
            raise DataError(f"{m} has no image {stem}.png (or .tif, .jpg) beside it")
        label, rgb = read_cpm_mask(m), read_rgb(image)
        _check_size(m, image, label.shape, rgb.size)
        if label.max() >= 2**16:
            raise DataError(f"{m}: ids up to {label.max()} do not fit a 16-bit PNG")
        part = "test" if stem in test else split
        for sub in ("images", "masks"):
            (Path(out) / part / sub).mkdir(parents=True, exist_ok=True)
        rgb.save(Path(out) / part / "images" / f"{stem}.png")
        Image.fromarray(label.astype(np.uint16)).save(Path(out) / part / "masks" / f"{stem}.png")
        counts[part] = counts.get(part, 0) + 1
    return counts


def _check_size(anno, image, label_shape, image_size):
    if tuple(label_shape) != (image_size[1], image_size[0]):
        raise DataError(f"annotation {anno} is {label_shape[1]}x{label_shape[0]} but its image "
                        f"{image} is {image_size[0]}x{image_size[1]}")


# ---------------------------------------------------------------------------------------------
# Dataset

class GlandDataset(torch.utils.data.Dataset):
    """(uint8 CHW image, target) pairs for torchvision's Mask R-CNN; target = {"boxes", "labels"
    (all 1: one class, gland), "masks", "image_id", "name"}.

    items: from glas_items / crag_items, or demo_items (drawn on access by demo_glands). An item
    with anno None (require_annotations=False) counts as having no glands; training refuses it.
    Training flips horizontally with p = 0.5, decided by (seed, epoch, index) only: the same in
    any worker; call set_epoch each epoch. min_size is accepted and ignored: the model resizes.
    """

    def __init__(self, items, train, seed=0, min_size=None):
        self.train, self.seed, self.epoch = train, seed, 0
        items = list(items)
        # Read every label map once now: empty images must be known before sampling, and a
        # wrong-sized annotation should stop the run at the start, not hours into training.
        has = [self._has_glands(it) for it in items]
        empty = [it["name"] for it, g in zip(items, has) if not g]
        self.dropped, self.empty = (empty, []) if train else ([], empty)
        if self.dropped:
            print(f"{len(empty)} of {len(items)} training images have no glands and are left "
                  f"out (as Detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS): "
                  f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
        self.items = [it for it, g in zip(items, has) if g or not train]
        if train and not self.items:
            raise DataError(f"none of the {len(items)} training images has a gland or any "
                            f"other instance (every label map is all 0 = background)")

    def _has_glands(self, it):
        if "demo" in it:
            return True  # demo_glands always draws at least two
        if it["anno"] is None:
            if self.train:
                raise DataError(f"training needs annotations: {it['image']} has none")
            return False
        label = read_label_map(it["anno"])
        try:
            with Image.open(it["image"]) as im:  # reads the header only
                size = im.size
        except Exception as e:
            raise DataError(f"unreadable image {it['image']}: {type(e).__name__}") from None
        _check_size(it["anno"], it["image"], label.shape, size)
        return bool(label.any())

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def load(self, i):
        """-> (uint8 (H, W, 3) RGB, (H, W) label map), before augmentation."""
        it = self.items[i]
        if "demo" in it:
            return demo_glands(*it["demo"])
        rgb = np.array(read_rgb(it["image"]))  # writable: torch.from_numpy wants that
        if it["anno"] is None:
            return rgb, np.zeros(rgb.shape[:2], np.uint8)
        label = read_label_map(it["anno"])
        _check_size(it["anno"], it["image"], label.shape, rgb.shape[1::-1])
        return rgb, label

    def __getitem__(self, key):
        # key: an index (flip drawn for the epoch set by set_epoch), or (index, pass) from an
        # iteration-based sampler whose workers outlive epochs (common.detection.IterationSampler)
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        rgb, label = self.load(i)
        rng = np.random.default_rng(sample_seed(self.seed, epoch, i))  # no global RNG
        if self.train and rng.random() < 0.5:
            rgb, label = rgb[:, ::-1], label[:, ::-1]  # boxes then come from the flipped masks
        masks, boxes, _ = instances(label)
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        return image, {"boxes": torch.from_numpy(boxes),
                       "labels": torch.ones(len(boxes), dtype=torch.int64),
                       "masks": torch.from_numpy(np.ascontiguousarray(masks)),
                       "image_id": i, "name": self.items[i]["name"]}


def collate(batch):
    """Detection batches are lists: images differ in size and in number of instances."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ---------------------------------------------------------------------------------------------
# Demo glands

def demo_glands(index, seed=0, size=256):
    """uint8 (size, size, 3) H&E-like field and int32 (size, size) instance map (ids 1..n,
    2 <= n <= 8), a pure function of (index, seed). Glands are irregular ellipses whose major
    axis spans 15-30 % of the field: pale pink cytoplasm, a ring of dark basal nuclei along the
    rim, a pale lumen; they keep about 3 px apart and may be cut by the border. The
    stroma between them is common.demo's. Drawn at the demo's N = 224 px and resampled, as the
    demo tiles."""
    rng = np.random.default_rng([seed, index])
    h, e = _stroma(rng)
    label = np.zeros((N, N), np.int32)
    cyto = 0.3 + 0.2 * _noise(rng, 12)
    ny, nx, nangle, placed = [], [], [], []
    want, n = int(rng.integers(2, 9)), 0
    for tries in range(300):  # random sequential placement; the first two sit well inside
        if n == want or (tries >= 60 and n >= 2):
            break
        a = rng.uniform(0.075, 0.15) * N  # semi-major axis
        b, rot = a * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
        k = np.arange(2, 6)[:, None]  # rim radius 1 + sum amp_k cos(k angle + phase_k)
        amp, phase = rng.uniform(0, 0.05, (4, 1)), rng.uniform(0, 2 * np.pi, (4, 1))
        reach = a * (1 + amp.sum()) + 4
        lo, hi = (reach, N - reach) if n < 2 else (-0.3 * reach, N + 0.3 * reach)
        cy, cx = rng.uniform(lo, hi, 2)
        inner = b * (1 - amp.sum())  # the gland surely covers this circle: a cheap first test
        if any(np.hypot(cy - y, cx - x) < inner + r + 3 for y, x, r in placed):
            continue
        y0, x0 = max(int(cy - reach), 0), max(int(cx - reach), 0)
        yy, xx = np.ogrid[y0:min(int(cy + reach) + 1, N), x0:min(int(cx + reach) + 1, N)]
        u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)  # the gland's own axes
        v = (yy - cy) * np.cos(rot) - (xx - cx) * np.sin(rot)
        theta = np.arctan2(v / b, u / a)
        rim = 1 + (amp[..., None] * np.cos(k[..., None] * theta + phase[..., None])).sum(0)
        depth = (rim - np.hypot(u / a, v / b)) * np.sqrt(a * b)  # ~ px inside the rim
        crop = label[y0:y0 + depth.shape[0], x0:x0 + depth.shape[1]]
        inside = depth > 0
        if inside.sum() < 150 or (crop[depth > -3] > 0).any():  # a sliver, or too close
            continue
        n += 1
        crop[inside] = n
        placed.append((cy, cx, inner))
        t = rng.uniform(0.4, 0.6) * min(b, 24)  # epithelium thickness
        cover, lumen = np.clip(depth + 0.5, 0, 1), np.clip(depth - t + 0.5, 0, 1)
        gl = np.s_[y0:y0 + depth.shape[0], x0:x0 + depth.shape[1]]
        e[gl] = e[gl] * (1 - cover) + cover * (cyto[gl] * (1 - lumen) + 0.04 * lumen)
        h[gl] *= 1 - cover
        # basal nuclei: evenly spaced along the rim, 4 px in, elongated towards the centre
        m = int(2 * np.pi * np.sqrt((a * a + b * b) / 2) / rng.uniform(5, 6.5))
        phi = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, m, endpoint=False)
        r = 1 + (amp * np.cos(k * phi + phase)).sum(0)
        r = r - rng.uniform(3.5, 4.5) / np.sqrt(a * b)
        pu, pv = r * a * np.cos(phi), r * b * np.sin(phi)
        py = cy + pu * np.sin(rot) + pv * np.cos(rot) + rng.normal(0, 0.6, m)
        px = cx + pu * np.cos(rot) - pv * np.sin(rot) + rng.normal(0, 0.6, m)
        ny, nx, nangle = ny + [py], nx + [px], nangle + [np.arctan2(py - cy, px - cx)]
    ny, nx, nangle = (np.concatenate(v) for v in (ny, nx, nangle))
    k = len(ny)
    ring = _nuclei(ny, nx, rng.uniform(2.0, 2.6, k), rng.uniform(1.4, 1.9, k), nangle,
                   rng.uniform(0.8, 1.1, k), 0.15, rng)
    img = _render(rng, np.maximum(h, ring), e)
    if size != N:
        img = np.array(Image.fromarray(img).resize((size, size), Image.BILINEAR))
        label = np.array(Image.fromarray(label).resize((size, size), Image.NEAREST))
    return img, label.astype(np.int32)


DEMO_TEST = 1  # demo test fields use seed sample_seed(seed, DEMO_TEST): never a training field


def demo_items(n, seed=0, size=256, train=True):
    """Items for GlandDataset whose fields demo_glands draws on access."""
    s, tag = (seed, "demo") if train else (sample_seed(seed, DEMO_TEST), "demo_test")
    return [{"name": f"{tag}_{i}", "image": None, "anno": None, "grade": None, "demo": (i, s, size)}
            for i in range(n)]


def build_gland_dataset(data, root, split, train, seed=0, demo_size=64):
    """GlandDataset for --data glas | crag | demo | instances. Demo: demo_size training fields, a
    quarter as many (16 at the default) test fields of 256 px."""
    if data == "demo":
        n = demo_size if split == "train" else max(1, demo_size // 4)
        return GlandDataset(demo_items(n, seed, 256, train=split == "train"), train, seed)
    finders = {"glas": glas_items, "crag": crag_items, "instances": instance_items}
    if data not in finders:
        raise DataError(f"--data {data}: use glas, crag, instances or demo")
    if not root:
        raise DataError(f"--data {data} needs --data-root PATH")
    items = finders[data](root, split)
    return GlandDataset(items, train, seed)


# ---------------------------------------------------------------------------------------------
# Pictures

def overlay(image, masks, color=None, width=None):
    """A copy of uint8 (H, W, 3) `image` with the outline of each of `masks` (N, H, W) drawn in
    `color` (RGB), or in PALETTE colours per instance when None. Outlines are `width` px thick
    (default: 1 px per 256 px of image) and also run along the image border where a mask is cut."""
    out = np.array(image, dtype=np.uint8)
    masks = np.asarray(masks).astype(bool).reshape(-1, *out.shape[:2])
    width = width or max(1, round(max(out.shape[:2]) / 256))
    for j, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        if len(ys) == 0:
            continue
        box = np.s_[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]  # erode only around the object: fast
        inner = m[box]
        for _ in range(width):
            p = np.pad(inner, 1)
            inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        out[box][m[box] & ~inner] = PALETTE[j % len(PALETTE)] if color is None else color
    return out


# Outline colours that stand out on H&E's pinks and purples (magenta did not): ground truth in
# bright green, predictions in yellow.
GT_COLOUR, PRED_COLOUR = (0, 230, 64), (255, 230, 0)


def font(size):
    """PIL's default font at `size` px (FreeType), or its small bitmap font without FreeType."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def draw_detections(image, gt_masks, pred_masks, boxes, scores, threshold=0.5, width=None):
    """PIL picture of uint8 (H, W, 3) `image`: ground-truth outlines in green, predicted ones in
    yellow (2 px; 3 from 768 px up), each prediction's score on a dark label at its box's top
    left when there are few enough to read (glands; a nuclei image gets the count only), and a
    legend in a band above the image (never over the tissue)."""
    h, w_img = image.shape[:2]
    w = width or (2 if max(h, w_img) < 768 else 3)
    rgb = overlay(overlay(image, gt_masks, GT_COLOUR, w), pred_masks, PRED_COLOUR, w)
    f = font(max(12, round(max(h, w_img) / 40)))
    im = Image.fromarray(rgb)
    d = ImageDraw.Draw(im)
    if len(scores) <= 40:
        for (x0, y0, _, _), s in zip(boxes, scores):
            l, t, r, b = d.textbbox((0, 0), f"{s:.2f}", font=f)
            x = min(max(0, round(x0)), max(0, w_img - (r - l) - 4))
            y = max(0, round(y0) - (b - t) - 4)  # above the box, inside the image
            d.rectangle((x, y, x + r - l + 3, y + b - t + 3), fill=(0, 0, 0))
            d.text((x + 2 - l, y + 2 - t), f"{s:.2f}", fill=PRED_COLOUR, font=f)
    legend = [(f"ground truth ({len(gt_masks)})", GT_COLOUR),
              (f"prediction, score >= {threshold} ({len(pred_masks)})", PRED_COLOUR)]
    line = max(d.textbbox((0, 0), "Ag", font=f)[3], 12) + 4
    text_w = max(d.textlength(t, font=f) for t, _ in legend)
    out = Image.new("RGB", (max(w_img, round(text_w) + 32), h + 8 + line * len(legend)), (0, 0, 0))
    d = ImageDraw.Draw(out)
    for k, (text, c) in enumerate(legend):
        y = 4 + line * k
        d.rectangle((6, y + 2, 6 + line - 6, y + line - 4), outline=c, width=2)
        d.text((line + 6, y), text, fill=(255, 255, 255), font=f)
    out.paste(im, (0, out.height - h))
    return out


def contact_sheet(n=8, seed=0, size=256, cols=4):
    """Demo fields, instances outlined in colours, their number of glands underneath."""
    rows, cap = -(-n // cols), 16
    sheet = Image.new("RGB", (cols * size, rows * (size + cap)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        img, label = demo_glands(i, seed, size)
        masks, _, ids = instances(label)
        x, y = (i % cols) * size, (i // cols) * (size + cap)
        sheet.paste(Image.fromarray(overlay(img, masks)), (x, y))
        draw.text((x + 4, y + size + 2), f"demo_glands({i}, seed={seed}): {len(ids)} glands",
                  fill="black")
    return sheet


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert-cpm"]:
        p = argparse.ArgumentParser(prog="python -m common.glands convert-cpm",
                                    description="CPM-15/17 (imageXX.png + imageXX_mask.txt) -> "
                                    "OUT/train/{images,masks}, OUT/test/{images,masks}")
        p.add_argument("--src", required=True, help="folder of imageXX.png and imageXX_mask.txt")
        p.add_argument("--out", required=True, help="instances layout for --data instances")
        p.add_argument("--test", nargs="*", default=[], metavar="STEM",
                       help="image stems for out/test/ (e.g. image14); the rest go to --split")
        p.add_argument("--split", default="train", choices=("train", "test"),
                       help="where the other images go (CPM-17 ships train/ and test/ folders: "
                            "convert each with its own --split)")
        a = p.parse_args(argv[1:])
        counts = convert_cpm(a.src, a.out, set(a.test), a.split)
        print(", ".join(f"{n} {k}" for k, n in counts.items()) + f" image(s) -> {a.out}")
        return
    p = argparse.ArgumentParser(description="Draw demo gland fields with their instances outlined "
                                "(or: convert-cpm --src DIR --out DIR).")
    p.add_argument("--out", default="glands.png")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    a = p.parse_args(argv)
    contact_sheet(a.n, a.seed, a.size).save(a.out)
    print(a.out)


if __name__ == "__main__":
    from common.train import main_guard  # bad input: one line, exit code 2
    main_guard(main)
