"""The demo tiles: deterministic, balanced, real where they claim to be, and distinguishable."""
import hashlib
import subprocess
import sys

import numpy as np
import skimage.data

from common.demo import DEMO_CLASSES, DemoTiles, demo_tile
from tests.conftest import REPO

H_AND_E = [c for c in DEMO_CLASSES if c != "IHC"]


def test_pure_function_of_index_and_seed():
    a = [demo_tile(i, seed=3)[0] for i in (5, 2, 9)]
    b = [demo_tile(i, seed=3)[0] for i in (9, 2, 5)][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for i in range(len(DEMO_CLASSES)):
        assert not np.array_equal(demo_tile(i, seed=3)[0], demo_tile(i, seed=4)[0])
    tile, label = demo_tile(7, size=64)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8 and label == 7 % len(DEMO_CLASSES)
    tile, label = demo_tile(7)
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8


def test_same_bytes_in_a_fresh_process():
    digest = lambda tiles: hashlib.sha256(b"".join(t.tobytes() for t in tiles)).hexdigest()
    code = ("import hashlib; from common.demo import demo_tile; print(hashlib.sha256(b''.join("
            "demo_tile(i, seed=5)[0].tobytes() for i in range(6, 12))).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == digest(demo_tile(i, seed=5)[0] for i in range(6, 12))


def test_dataset_labels_are_balanced_and_match_tiles():
    ds = DemoTiles(n=24, seed=1)
    assert ds.classes == list(DEMO_CLASSES) and len(ds) == 24
    assert np.bincount(ds.targets).tolist() == [4] * len(DEMO_CLASSES)
    assert all(demo_tile(i, seed=1)[1] == ds.targets[i] for i in range(24))
    img, label = ds[10]
    assert img.mode == "RGB" and img.size == (224, 224) and label == ds.targets[10]
    assert np.array_equal(np.asarray(img), demo_tile(10, seed=1)[0])
    assert DemoTiles(n=4, size=64)[3][0].size == (64, 64)


def test_ihc_tiles_are_real_windows_of_the_skimage_image():
    src = skimage.data.immunohistochemistry()
    orientations = [np.rot90(src, k) for k in range(4)]
    orientations += [o[:, ::-1] for o in orientations]
    found = set()
    for i in range(4):
        tile, label = demo_tile(DEMO_CLASSES.index("IHC") + len(DEMO_CLASSES) * i, seed=0)
        assert DEMO_CLASSES[label] == "IHC"
        hit = None
        for k, o in enumerate(orientations):  # find the top-left pixel, then compare the window
            ys, xs = np.nonzero((o[:-223, :-223] == tile[0, 0]).all(2))
            for y, x in zip(ys, xs):
                if np.array_equal(o[y:y + 224, x:x + 224], tile):
                    hit = (k, y, x)
                    break
            if hit:
                break
        assert hit is not None, f"IHC tile {i} is not a window of the skimage image"
        found.add(hit)
    assert len(found) == 4  # different positions/orientations, not one tile repeated


def features(tile):
    """Colour means/stds and mean gradient magnitude: a hand-made descriptor."""
    t = tile.astype(np.float32)
    grey = t.mean(2)
    grad = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
    return np.concatenate([t.mean((0, 1)), t.std((0, 1)), [grad, 100 * (grey < 140).mean()]])


def test_classes_are_visually_distinct():
    n = len(DEMO_CLASSES)
    train = [(features(demo_tile(i, seed=0)[0]), i % n) for i in range(n * 20)]
    test = [(features(demo_tile(i, seed=1)[0]), i % n) for i in range(n * 10)]
    X = np.stack([f for f, _ in train])
    mu, sd = X.mean(0), X.std(0) + 1e-6
    centroids = np.stack([((X - mu) / sd)[[y == c for _, y in train]].mean(0) for c in range(n)])
    correct = sum(np.argmin((((f - mu) / sd - centroids) ** 2).sum(1)) == y for f, y in test)
    assert correct / len(test) >= 0.9


def test_tiles_have_structure_and_stain_colours():
    for i in range(4 * len(DEMO_CLASSES)):
        tile, label = demo_tile(i, seed=2)
        t = tile.astype(np.float32)
        # spread of 8 x 8 block means: texture that sensor noise alone cannot produce
        blocks = t.reshape(28, 8, 28, 8, 3).mean((1, 3)).std((0, 1)).max()
        assert blocks > (1.5 if DEMO_CLASSES[label] == "BACK" else 5), (DEMO_CLASSES[label], blocks)
        if DEMO_CLASSES[label] in H_AND_E:  # haematoxylin and eosin both absorb green the most
            r, g, b = t.mean((0, 1))
            assert g < r and g < b, (DEMO_CLASSES[label], r, g, b)
