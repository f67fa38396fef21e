"""The `--data demo` tiles: a download-free stand-in for NCT-CRC-HE-100K.

Two sources, 224 x 224 like NCT tiles:
- "IHC": real colon tissue, cut from the immunohistochemistry image scikit-image ships
  (`skimage.data.immunohistochemistry()`, 512 x 512) at random positions and orientations;
- five generated H&E-like classes named after their NCT counterparts: "ADI" (adipose: empty
  polygonal cells with thin pink membranes), "BACK" (background glass), "LYM" (packed small dark
  lymphocyte nuclei), "STR" (wavy pink stroma with sparse elongated nuclei) and "TUM" (tumour
  epithelium: crowded large nuclei lining gland lumens).

Every tile is a pure function of (index, seed): the same in any process, worker or order, so
runs on demo data are reproducible and resumable. Classes cycle with the index, so any prefix is
balanced and probes have labels. `python -m common.demo --out demo.png` draws a sheet of them.
"""
import argparse

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

DEMO_CLASSES = ("ADI", "BACK", "LYM", "STR", "TUM", "IHC")
HEMATOXYLIN = np.array([95, 50, 140], np.float32)   # nuclei: purple-blue
EOSIN = np.array([236, 160, 200], np.float32)       # cytoplasm, stroma: pink
GLASS = np.array([242, 238, 244], np.float32)       # empty space: near white

_IHC = None


def _ihc():
    global _IHC
    if _IHC is None:
        import skimage.data
        _IHC = skimage.data.immunohistochemistry()
    return _IHC


def _smooth_noise(rng, size, cells):
    """Low-frequency noise in [0, 1]: random values on a cells x cells grid, bicubic-upsampled."""
    small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.BICUBIC), np.float32) / 255


def _paint(canvas, mask, colour, strength=1.0):
    """Alpha-blend `colour` into canvas (H, W, 3) where mask (H, W) in [0, 1]."""
    a = (mask * strength)[..., None]
    canvas *= 1 - a
    canvas += a * colour


def _nuclei(rng, size, centres, radii, elong=1.0, angle=0.0):
    """Soft-edged elliptical nuclei as a (size, size) coverage map, drawn on a bounding patch each."""
    cover = np.zeros((size, size), np.float32)
    c, s = np.cos(angle), np.sin(angle)
    for (cy, cx), r in zip(centres, radii):
        rr = int(np.ceil(r * elong)) + 2
        y0, y1, x0, x1 = max(int(cy) - rr, 0), min(int(cy) + rr + 1, size), max(int(cx) - rr, 0), min(int(cx) + rr + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        d = np.sqrt((u / elong) ** 2 + v ** 2)
        np.maximum(cover[y0:y1, x0:x1], np.clip(r + 0.5 - d, 0, 1), out=cover[y0:y1, x0:x1])
    return cover


def _adipose(rng, n):
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = GLASS
    seeds = rng.random((int(rng.integers(10, 18)), 2)) * n
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    d = np.sqrt((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2)
    d.sort(axis=2)
    membrane = np.clip(2.5 - (d[..., 1] - d[..., 0]), 0, 1)  # thin walls between the cells
    _paint(canvas, membrane, EOSIN * 0.9)
    walls = np.argwhere(membrane > 0.9)
    pick = walls[rng.choice(len(walls), size=min(len(walls), 6), replace=False)]
    _paint(canvas, _nuclei(rng, n, pick, rng.uniform(2, 3, len(pick)), 2.0, rng.uniform(0, np.pi)),
           HEMATOXYLIN)
    return canvas


def _background(rng, n):
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = GLASS - 8 * _smooth_noise(rng, n, 4)[..., None]
    specks = rng.random((int(rng.integers(0, 6)), 2)) * n
    _paint(canvas, _nuclei(rng, n, specks, rng.uniform(1, 4, len(specks))), EOSIN, 0.5)
    return canvas


def _lymphocytes(rng, n):
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = EOSIN * 0.3 + GLASS * 0.7
    count = int(rng.integers(350, 500))
    centres = rng.random((count, 2)) * n
    _paint(canvas, _nuclei(rng, n, centres, rng.uniform(3.0, 4.5, count)), HEMATOXYLIN * 0.8)
    return canvas


def _stroma(rng, n):
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    warp = 10 * _smooth_noise(rng, n, 4)
    fibres = 0.5 + 0.5 * np.sin((xx * np.cos(theta) + yy * np.sin(theta)) / rng.uniform(2.5, 4) + warp)
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = GLASS
    _paint(canvas, 0.45 + 0.55 * fibres, EOSIN)
    count = int(rng.integers(12, 25))
    centres = rng.random((count, 2)) * n
    _paint(canvas, _nuclei(rng, n, centres, rng.uniform(2, 3, count), 3.0, theta + np.pi / 2),
           HEMATOXYLIN)
    return canvas


def _tumour(rng, n):
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = EOSIN * 0.85
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    centres, radii = [], []
    for _ in range(int(rng.integers(2, 5))):  # gland-like rings of crowded nuclei round a lumen
        cy, cx, r = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(25, 50)
        lumen = np.clip(r * 0.55 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2), 0, 1)
        _paint(canvas, lumen, GLASS)
        k = int(2 * np.pi * r / 7)
        phi = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, k, endpoint=False)
        rad = r * 0.75 + rng.normal(0, 2, k)
        centres += list(zip(cy + rad * np.sin(phi), cx + rad * np.cos(phi)))
        radii += list(rng.uniform(4, 6.5, k))
    scattered = rng.random((int(rng.integers(40, 70)), 2)) * n  # invasive cells between glands
    centres += [tuple(c) for c in scattered]
    radii += list(rng.uniform(4, 6, len(scattered)))
    _paint(canvas, _nuclei(rng, n, centres, radii, rng.uniform(1.1, 1.5), rng.uniform(0, np.pi)),
           HEMATOXYLIN * 0.9)
    return canvas


def _ihc_tile(rng, n):
    src = _ihc()
    y, x = rng.integers(0, src.shape[0] - n + 1), rng.integers(0, src.shape[1] - n + 1)
    tile = np.rot90(src[y:y + n, x:x + n], int(rng.integers(4)))
    return np.ascontiguousarray(tile[:, ::-1] if rng.random() < 0.5 else tile)


_MAKERS = {"ADI": _adipose, "BACK": _background, "LYM": _lymphocytes, "STR": _stroma,
           "TUM": _tumour}


def demo_tile(index, seed=0, size=224):
    """uint8 (size, size, 3) RGB tile and its label, a pure function of (index, seed, size).
    Generated at 224 px (the NCT tile size) and resized, so size only changes resolution."""
    label = index % len(DEMO_CLASSES)
    rng = np.random.default_rng([seed, index])
    name = DEMO_CLASSES[label]
    if name == "IHC":
        tile = _ihc_tile(rng, 224)
    else:
        canvas = _MAKERS[name](rng, 224)
        # staining varies between slides: intensity and a mild colour cast per tile
        canvas = 255 - (255 - canvas) * rng.uniform(0.8, 1.15) + rng.normal(0, 4, 3)
        img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 1.0)))
        tile = np.asarray(img).astype(np.int16) + rng.normal(0, 3, (224, 224, 1)).astype(np.int16)
        tile = tile.clip(0, 255).astype(np.uint8)
    if size != 224:
        tile = np.asarray(Image.fromarray(tile).resize((size, size), Image.BILINEAR))
    return tile, label


class DemoTiles(torch.utils.data.Dataset):
    """n demo tiles as (PIL RGB image, label); generated on access, nothing stored."""

    def __init__(self, n=480, seed=0, size=224):
        self.n, self.seed, self.size = n, seed, size
        self.classes = list(DEMO_CLASSES)
        self.targets = [i % len(DEMO_CLASSES) for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        tile, label = demo_tile(i, self.seed, self.size)
        return Image.fromarray(tile), label


def contact_sheet(seed=0, per_class=6, size=112):
    """A PNG-ready sheet: one row per class, its name on the left."""
    label_w = 48
    sheet = Image.new("RGB", (label_w + per_class * size, len(DEMO_CLASSES) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(DEMO_CLASSES):
        draw.text((4, c * size + size // 2 - 6), name, fill="black")
        for j in range(per_class):
            tile, _ = demo_tile(c + j * len(DEMO_CLASSES), seed, size)
            sheet.paste(Image.fromarray(tile), (label_w + j * size, c * size))
    return sheet


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Draw the demo tiles, one row per class.")
    p.add_argument("--out", default="demo_tiles.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=6)
    a = p.parse_args()
    contact_sheet(a.seed, a.per_class).save(a.out)
    print(a.out)
