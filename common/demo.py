"""The `--data demo` tiles: a download-free stand-in for NCT-CRC-HE-100K.

NCT is 11 GB behind a Zenodo download; CI, tests and a first `python X.py --data demo` need
tissue-like tiles with labels and no network. Two sources, 224 x 224 like NCT tiles:
- "IHC": real colon tissue, cut from the immunohistochemistry image scikit-image ships
  (`skimage.data.immunohistochemistry()`, 512 x 512) at random positions and orientations;
- five generated H&E-like classes named after their NCT counterparts: "ADI" (adipose: large
  empty cells with thin pink membranes), "BACK" (background glass), "LYM" (packed small dark
  lymphocyte nuclei), "STR" (wavy pink collagen fibres with sparse spindle nuclei) and "TUM"
  (tumour epithelium: crowded large irregular nuclei lining gland lumens).

Every tile is a pure function of (index, seed): the same in any process, worker or order, so
runs on demo data are reproducible and resumable. Classes cycle with the index, so any prefix is
balanced and probes have labels. `python -m common.demo --out demo.png` draws a sheet of them.
"""
import argparse

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

DEMO_CLASSES = ("ADI", "BACK", "LYM", "STR", "TUM", "IHC")
N = 224  # tiles are drawn at NCT's size; `size` only resamples, so content does not depend on it

# Stains mix by Beer-Lambert: optical densities add, RGB = 255 exp(-OD). Painting concentration
# maps instead of colours gives realistic mixtures, and per-slide staining differences become two
# scalars. Unit vectors are the OD of a typical nucleus and of dense eosin.
OD_H = -np.log(np.array([100, 55, 145], np.float32) / 255)   # haematoxylin: nuclei, purple
OD_E = -np.log(np.array([236, 150, 196], np.float32) / 255)  # eosin: cytoplasm, collagen, pink
OD_GLASS = -np.log(np.array([242, 237, 243], np.float32) / 255)

_IHC = None


def _ihc():
    global _IHC
    if _IHC is None:  # once per process (each DataLoader worker loads its own copy)
        import skimage.data
        _IHC = skimage.data.immunohistochemistry()
    return _IHC


def _noise(rng, cells, n=N):
    """Smooth noise in [0, 1] with features about n / cells px wide (bicubic-upsampled grid)."""
    small = Image.fromarray(rng.random((cells, cells), np.float32), "F")
    return np.asarray(small.resize((n, n), Image.BICUBIC)).clip(0, 1)


def _nuclei(cy, cx, r, elong=1.0, angle=0.0, strength=1.0, lumpy=0.0, rng=None, n=N):
    """(n, n) coverage of soft-edged nuclei: ellipses with semi-axes r * elong along `angle` and
    r across, outlines made irregular by smooth noise of amplitude `lumpy` * r. All nuclei are
    evaluated at once on small stamps and max-scattered, which is what keeps a tile of
    hundreds of nuclei within a few milliseconds."""
    cy, cx, r, elong, angle, strength = (a.astype(np.float32) for a in np.broadcast_arrays(
        *map(np.asarray, (cy, cx, r, elong, angle, strength))))
    R = int(np.ceil((r * (elong + lumpy)).max(initial=0))) + 2
    iy, ix = np.round(cy).astype(int), np.round(cx).astype(int)
    keep = (iy > -R) & (iy < n + R) & (ix > -R) & (ix < n + R)
    cy, cx, iy, ix, r, elong, angle, strength = (a[keep, None, None] for a in
                                                 (cy, cx, iy, ix, r, elong, angle, strength))
    off = np.arange(-R, R + 1)
    off32 = off.astype(np.float32)
    dy = off32[:, None] + (iy - cy).astype(np.float32)  # (k, P, 1) and (k, 1, P): broadcasting
    dx = off32[None, :] + (ix - cx).astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    d = np.sqrt(((dx * c + dy * s) / elong) ** 2 + (dy * c - dx * s) ** 2)
    rows, cols = iy + off[:, None] + 2 * R, ix + off[None, :] + 2 * R
    if lumpy:
        d += lumpy * r * (_noise(rng, 48, n + 4 * R)[rows, cols] - 0.5) * 2
    cover = np.clip(r + 0.5 - d, 0, 1) * strength  # float32 throughout: ufunc.at is slow to cast
    w = n + 4 * R  # centres up to R outside the tile, stamps R wide
    canvas = np.zeros(w * w, np.float32)
    np.maximum.at(canvas, (rows * w + cols).ravel(), cover.ravel())  # flat indices: ~10x faster
    return canvas.reshape(w, w)[2 * R:2 * R + n, 2 * R:2 * R + n]


def _adipose(rng):
    """Voronoi cells on a wavy coordinate grid: membranes where two nearest seeds tie."""
    k, m = int(rng.integers(8, 15)), N // 2  # cell geometry at half resolution, then upsampled
    seeds = rng.uniform(-30, N + 30, (k, 2)).astype(np.float32)
    yy, xx = np.mgrid[:N:2, :N:2].astype(np.float32)
    yy = yy + 14 * _noise(rng, 3, m) + 4 * _noise(rng, 9, m)  # wavy, not straight, walls
    xx = xx + 14 * _noise(rng, 3, m) + 4 * _noise(rng, 9, m)
    d = np.sqrt((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2)
    d = np.partition(d, 1, axis=2)
    gap = d[..., 1] - d[..., 0]
    gy, gx = np.gradient(gap, 2)
    # gap / |grad gap| is the distance to the wall: even walls, no wedges where cells meet
    wall = (gap / (np.hypot(gy, gx) + 0.2)).astype(np.float32)
    wall = np.asarray(Image.fromarray(wall, "F").resize((N, N), Image.BILINEAR))
    membrane = np.clip(rng.uniform(1.8, 2.8) - wall, 0, 1)
    e = membrane * (0.5 + 0.5 * _noise(rng, 12))
    on_wall = np.argwhere(membrane > 0.9)
    pick = on_wall[rng.choice(len(on_wall), min(len(on_wall), int(rng.integers(2, 7))), False)]
    half = tuple(pick.T // 2)
    along = np.arctan2(gy[half], gx[half]) + np.pi / 2  # flat nuclei lie on the wall
    h = _nuclei(pick[:, 0], pick[:, 1], rng.uniform(1.8, 2.5, len(pick)), 2.5, along)
    return h, e


def _background(rng):
    e = 0.02 + 0.1 * _noise(rng, 5) + 0.06 * _noise(rng, 40)  # uneven mounting medium
    k = int(rng.integers(0, 8))  # debris specks
    specks = _nuclei(*rng.uniform(0, N, (2, k)), rng.uniform(1, 3, k), rng.uniform(1, 2, k),
                     rng.uniform(0, np.pi, k))
    return 0.25 * specks, e + 0.3 * specks


def _lymphocytes(rng):
    """Round dark nuclei on a jittered lattice, so they pack densely without piling up."""
    s = rng.uniform(10, 12)
    gy, gx = np.mgrid[-s:N + s:s, -s:N + s:s].reshape(2, -1)
    density = _noise(rng, 4)[np.clip(gy, 0, N - 1).astype(int), np.clip(gx, 0, N - 1).astype(int)]
    keep = rng.random(len(gy)) < 0.55 + 0.45 * density
    k = int(keep.sum())
    gy, gx = gy[keep] + rng.normal(0, s / 5, k), gx[keep] + rng.normal(0, s / 5, k)
    h = _nuclei(gy, gx, rng.uniform(3.8, 5.2, k), rng.uniform(1, 1.2, k),
                rng.uniform(0, np.pi, k), rng.uniform(0.9, 1.3, k), 0.08, rng)
    return h, 0.25 + 0.15 * _noise(rng, 8)


def _stroma(rng):
    """Collagen fibres: a random 1-D fibre profile across the fibre direction, bent by smooth
    warps, and faded along the fibres so bundles start and end."""
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:N, :N].astype(np.float32)
    across = -xx * np.sin(theta) + yy * np.cos(theta)
    t = across + 25 * _noise(rng, 3) + 6 * _noise(rng, 7) + 200
    knots = np.arange(0, 650, rng.uniform(2.5, 4))
    profile = rng.random(len(knots)) ** 0.5
    fibres = np.interp(t, knots, profile) * (0.6 + 0.6 * _noise(rng, 6))
    e = (0.2 + 0.75 * fibres).astype(np.float32)
    k = int(rng.integers(8, 22))
    cy, cx = rng.uniform(0, N, (2, k))
    ty, tx = np.gradient(t)
    iy, ix = cy.astype(int), cx.astype(int)
    along = np.arctan2(ty[iy, ix], tx[iy, ix]) + np.pi / 2  # spindle nuclei follow the fibres
    h = _nuclei(cy, cx, rng.uniform(1.8, 2.6, k), rng.uniform(3, 4.5, k), along,
                rng.uniform(0.8, 1.1, k), 0.15, rng)
    return h + 0.05, e


def _tumour(rng):
    """Glands with irregular lumens, each lined by tall epithelium whose crowded, radially
    elongated nuclei sit in two staggered rows (pseudo-stratified); solid sheets of atypical
    nuclei fill the rest."""
    g = int(rng.integers(1, 4))
    gy, gx = rng.uniform(0, N, (2, g))
    a, b, rot = rng.uniform(20, 50, g), rng.uniform(6, 22, g), rng.uniform(0, np.pi, g)
    lumen = _nuclei(gy, gx, b, a / b, rot, 1.0, 0.2, rng)  # lumens are irregular ellipses too
    band = _nuclei(gy, gx, b + 28, (a + 28) / (b + 28), rot)
    cy, cx, angle = [], [], []
    for i in range(g):
        for depth in (7, 16):
            k = int(2 * np.pi * np.sqrt(((a[i] + depth) ** 2 + (b[i] + depth) ** 2) / 2) / 7)
            phi = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, k, endpoint=False)
            pu, pv = (a[i] + depth) * np.cos(phi), (b[i] + depth) * np.sin(phi)
            cr, sr = np.cos(rot[i]), np.sin(rot[i])
            cy += list(gy[i] + pu * sr + pv * cr + rng.normal(0, 1.5, k))
            cx += list(gx[i] + pu * cr - pv * sr + rng.normal(0, 1.5, k))
            angle += list(np.arctan2(pv / (b[i] + depth) ** 2, pu / (a[i] + depth) ** 2) + rot[i])
    k = len(cy)
    h = _nuclei(cy, cx, rng.uniform(4, 5.5, k), rng.uniform(1.6, 2.2, k), angle,
                rng.uniform(0.6, 1.0, k), 0.2, rng)
    sy, sx = rng.uniform(-5, N + 5, (2, 200))
    sheet = band[sy.clip(0, N - 1).astype(int), sx.clip(0, N - 1).astype(int)] < 0.5
    m = int(sheet.sum())
    h = np.maximum(h, _nuclei(sy[sheet], sx[sheet], rng.uniform(4.5, 6.5, m),
                              rng.uniform(1.0, 1.5, m), rng.uniform(0, np.pi, m),
                              rng.uniform(0.5, 0.9, m), 0.25, rng))
    h = (0.2 + h) * (1 - lumen)
    e = (0.4 + 0.25 * _noise(rng, 10)) * (1 - 0.8 * lumen)  # lumens hold pale secretion
    return h, e


_MAKERS = {"ADI": _adipose, "BACK": _background, "LYM": _lymphocytes, "STR": _stroma,
           "TUM": _tumour}


def _ihc_tile(rng):
    src = _ihc()
    y, x = rng.integers(0, src.shape[0] - N + 1), rng.integers(0, src.shape[1] - N + 1)
    tile = np.rot90(src[y:y + N, x:x + N], int(rng.integers(4)))
    return np.ascontiguousarray(tile[:, ::-1] if rng.random() < 0.5 else tile)


def _render(rng, h, e):
    """Concentrations -> RGB with this tile's staining: strength and hue of each stain vary
    between slides, then the scanner's focus and sensor noise."""
    h = h * (0.75 + 0.5 * _noise(rng, 56))  # chromatin texture
    od_h = OD_H * rng.uniform(0.75, 1.25) * np.exp(rng.normal(0, 0.08, 3))
    od_e = OD_E * rng.uniform(0.7, 1.3) * np.exp(rng.normal(0, 0.08, 3))
    od_g = OD_GLASS * rng.uniform(0.5, 2)
    od_h, od_e, od_g = (v.astype(np.float32) for v in (od_h, od_e, od_g))
    od = np.stack([od_g[c] + h * od_h[c] + e * od_e[c] for c in range(3)], -1)
    img = Image.fromarray((255 * np.exp(-od)).astype(np.uint8))
    img = img.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 0.8)))
    noise = (rng.random((N, N, 1), np.float32) - 0.5) * rng.uniform(3, 9)
    return (np.asarray(img) + noise).clip(0, 255).astype(np.uint8)


def demo_tile(index, seed=0, size=224):
    """uint8 (size, size, 3) RGB tile and its label, a pure function of (index, seed, size).
    Generated at 224 px (the NCT tile size) and resized, so size only changes resolution."""
    label = index % len(DEMO_CLASSES)
    rng = np.random.default_rng([seed, index])  # never global state: workers and order don't matter
    name = DEMO_CLASSES[label]
    tile = _ihc_tile(rng) if name == "IHC" else _render(rng, *_MAKERS[name](rng))
    if size != N:
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


def contact_sheet(seed=0, per_class=6, size=224):
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
    p = argparse.ArgumentParser(prog="python -m common.demo",
                                description="Draw the demo tiles, one row per class.")
    p.add_argument("--out", default="demo_tiles.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--size", type=int, default=224, help="pixels per tile on the sheet")
    a = p.parse_args()
    contact_sheet(a.seed, a.per_class, a.size).save(a.out)
    print(a.out)
