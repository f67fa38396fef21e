"""Cut folders of large images into square tiles for `--data folder` pre-training, or cut an
instance-labelled folder (`--instances`) into training crops for `finetune_maskrcnn.py --data
instances` with each label map cut alike.

    python -m common.tiles SRC [SRC ...] OUT --size 224              # any tree of images
    python -m common.tiles SRC OUT --size 224 --exclude image07      # leave held-out images out
    python -m common.tiles CPM OUT --size 128 --instances            # train/ cut, test/ whole

Tiles lie on a grid of step `--stride` (default `--size`) whose last row and column are flush
with the image's far edges, so every pixel is in a tile and no tile is padded (the last ones
overlap their neighbours); images smaller than one tile are skipped and counted. Each source's
folder tree is kept under OUT (so class folders stay class folders for the probes) and a tile is
named `<stem>_<y>_<x>.png` after its top-left corner. `--min-tissue F` drops tiles where less
than the fraction F of pixels is tissue (not near-white glass: grey level under 220).
Tiles are RGB PNGs (16-bit, grey and alpha converted as the loaders do); label maps keep their
ids as 16-bit PNG.

OUT must be empty or new: the command records its options in OUT/tiles.json, and a rerun into
a folder holding that record clears the earlier cut first (one line says so when its options
differ), so no tile of an earlier cut is left behind; a non-empty folder without the record is
refused.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common.data import DataError, find_images, read_rgb


def grid(length, size, stride):
    """Top-left offsets of the tiles along one axis: every `stride`, the last flush with the end.
    [] when the axis is shorter than one tile."""
    if length < size:
        return []
    return sorted({*range(0, length - size, stride), length - size})


def tissue_fraction(tile):
    """Share of pixels darker than near-white glass (mean of RGB under 220)."""
    return float((tile.mean(axis=2) < 220).mean())


def cut_folder(sources, out, size, stride=None, exclude=(), min_tissue=0.0):
    """Every image under each source -> tiles under out. -> (tiles written, images cut,
    images too small, tiles dropped as background)."""
    stride = stride or size
    out, written, cut, small, dropped, seen = Path(out), 0, 0, 0, 0, {}
    for src in map(Path, sources):
        if not src.is_dir():
            raise DataError(f"source {src} is not a folder")
        images = [p for p in find_images(src) if p.stem not in exclude]
        if not images:
            raise DataError(f"no images under {src}" + (" left after --exclude" if exclude else ""))
        for path in images:
            rgb = np.asarray(read_rgb(path))
            h, w = rgb.shape[:2]
            ys, xs = grid(h, size, stride), grid(w, size, stride)
            if not ys or not xs:
                small += 1
                continue
            folder = out / path.relative_to(src).parent
            folder.mkdir(parents=True, exist_ok=True)
            key = folder / path.stem
            if key in seen:  # two sources (or a .png and a .tif) with the same stem here
                raise DataError(f"{path} and {seen[key]} would both write tiles {key}_Y_X.png; "
                                "rename one or cut them into different OUT folders")
            seen[key] = path
            cut += 1
            for y in ys:
                for x in xs:
                    tile = rgb[y:y + size, x:x + size]
                    if min_tissue and tissue_fraction(tile) < min_tissue:
                        dropped += 1
                        continue
                    Image.fromarray(tile).save(folder / f"{path.stem}_{y}_{x}.png")
                    written += 1
    return written, cut, small, dropped


def read_label(path):
    """An instance label map (PNG 8/16-bit, TIFF or .npy) as int64 (H, W)."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.int64)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile
        return np.asarray(tifffile.imread(path)).astype(np.int64)
    return np.array(Image.open(path)).astype(np.int64)


def cut_instances(src, out, size, stride=None, splits=("train",)):
    """An instances folder (SPLIT/images, SPLIT/masks) -> the same layout under out with the
    images of `splits` and their label maps cut alike; the other splits copied whole.
    -> {split: images written}."""
    src, out, stride, counts = Path(src), Path(out), stride or size, {}
    split_dirs = sorted(d for d in src.iterdir() if (d / "images").is_dir()) if src.is_dir() else []
    if not split_dirs:
        raise DataError(f"{src} has no SPLIT/images folders (expected train/images, test/images)")
    for d in split_dirs:
        if d.name not in splits:
            shutil.copytree(d, out / d.name, dirs_exist_ok=True)
            counts[d.name] = len(find_images(d / "images"))
            continue
        (out / d.name / "images").mkdir(parents=True, exist_ok=True)
        (out / d.name / "masks").mkdir(parents=True, exist_ok=True)
        counts[d.name] = 0
        for image in find_images(d / "images"):
            masks = [m for m in (d / "masks").glob(f"{image.stem}.*") if m.suffix.lower() in
                     (".png", ".tif", ".tiff", ".npy")]
            if not masks:
                raise DataError(f"{image} has no label map {d / 'masks' / image.stem}.png/.tif/.npy")
            rgb, label = np.asarray(read_rgb(image)), read_label(masks[0])
            if label.shape != rgb.shape[:2]:
                raise DataError(f"label map {masks[0]} is {label.shape[1]}x{label.shape[0]} but "
                                f"its image is {rgb.shape[1]}x{rgb.shape[0]}")
            if label.max(initial=0) > 65535:
                raise DataError(f"label map {masks[0]} has ids above 65535 (16-bit PNG)")
            for y in grid(label.shape[0], size, stride):
                for x in grid(label.shape[1], size, stride):
                    name = f"{image.stem}_{y}_{x}.png"
                    Image.fromarray(rgb[y:y + size, x:x + size]).save(out / d.name / "images" / name)
                    Image.fromarray(label[y:y + size, x:x + size].astype(np.uint16)).save(
                        out / d.name / "masks" / name)
                    counts[d.name] += 1
    return counts


RECORD = "tiles.json"  # OUT/tiles.json: this command's options; the folder is its output


def prepare_out(out, options):
    """Make OUT ready for a cut with `options`: new or empty, or holding an earlier cut of this
    command (its record), which is cleared first. DataError for a folder of other files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {out} is a file, not a folder")
    entries = list(out.iterdir()) if out.is_dir() else []
    if entries:
        try:
            old = json.loads((out / RECORD).read_text())["options"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"OUT {out} is not empty and holds no {RECORD} of an earlier "
                            "`python -m common.tiles` cut; choose a new or empty folder") from None
        n = sum(1 for f in out.rglob("*") if f.is_file() and f.name != RECORD)
        changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in options.items()
                            if old.get(k) != v)
        print(f"{out} held an earlier cut" + (f" with other options ({changed})" if changed
                                               else "") + f": its {n} file{'s' * (n != 1)} removed")
        for e in entries:
            shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).write_text(json.dumps({"command": "python -m common.tiles",
                                          "options": options}, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", nargs="+", help="source folder(s), searched recursively")
    p.add_argument("out", help="output folder: new or empty, or an earlier cut's (cleared)")
    p.add_argument("--size", type=int, default=224, help="tile side in pixels")
    p.add_argument("--stride", type=int, help="grid step (default: --size, no overlap)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="STEM",
                   help="image stems to leave out (e.g. held-out test images)")
    p.add_argument("--min-tissue", type=float, default=0.0,
                   help="drop tiles with less than this fraction of tissue pixels (0 keeps all)")
    p.add_argument("--instances", action="store_true",
                   help="SRC is an instances folder (SPLIT/images + SPLIT/masks): cut --splits "
                        "with their label maps, copy the other splits whole")
    p.add_argument("--splits", nargs="+", default=["train"], help="--instances: splits to cut")
    a = p.parse_args(argv)
    try:
        if a.size < 1 or (a.stride is not None and a.stride < 1):
            raise DataError(f"--size {a.size} / --stride {a.stride}: need positive pixels")
        if not 0 <= a.min_tissue <= 1:
            raise DataError(f"--min-tissue {a.min_tissue}: need a fraction in [0, 1]")
        if a.instances and len(a.src) != 1:
            raise DataError("--instances takes one SRC folder")
        for src in a.src:
            if not Path(src).is_dir():
                raise DataError(f"source {src} is not a folder")
            if Path(src).resolve().is_relative_to(Path(a.out).resolve()):
                raise DataError(f"OUT {a.out} holds the source {src}: choose another folder")
        prepare_out(a.out, {"src": [str(Path(s).resolve()) for s in a.src], "size": a.size,
                            "stride": a.stride or a.size, "exclude": sorted(a.exclude),
                            "min_tissue": a.min_tissue, "instances": a.instances,
                            "splits": sorted(a.splits) if a.instances else None})
        if a.instances:
            counts = cut_instances(a.src[0], a.out, a.size, a.stride, a.splits)
            print(f"{a.out}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
        else:
            n, cut, small, dropped = cut_folder(a.src, a.out, a.size, a.stride, set(a.exclude),
                                                a.min_tissue)
            print(f"{a.out}: {n} tiles of {a.size} px from {cut} images"
                  + (f"; {small} images smaller than a tile skipped" if small else "")
                  + (f"; {dropped} background tiles dropped" if dropped else ""))
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
