"""The demo tiles: deterministic, balanced, real where they claim to be, and distinguishable."""
import numpy as np
import skimage.data

from common.demo import DEMO_CLASSES, DemoTiles, demo_tile


def test_pure_function_of_index_and_seed():
    a = [demo_tile(i, seed=3)[0] for i in (5, 2, 9)]
    b = [demo_tile(i, seed=3)[0] for i in (9, 2, 5)][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(demo_tile(5, seed=3)[0], demo_tile(5, seed=4)[0])
    tile, label = demo_tile(7, size=64)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8 and label == 7 % len(DEMO_CLASSES)


def test_dataset_labels_are_balanced_and_match_tiles():
    ds = DemoTiles(n=24, seed=1)
    assert ds.classes == list(DEMO_CLASSES) and len(ds) == 24
    assert np.bincount(ds.targets).tolist() == [4] * len(DEMO_CLASSES)
    img, label = ds[10]
    assert img.mode == "RGB" and img.size == (224, 224) and label == ds.targets[10]
    assert np.array_equal(np.asarray(img), demo_tile(10, seed=1)[0])


def test_ihc_tiles_are_real_windows_of_the_skimage_image():
    src = skimage.data.immunohistochemistry()
    orientations = [np.rot90(src, k) for k in range(4)]
    orientations += [o[:, ::-1] for o in orientations]
    for i in range(3):
        tile, label = demo_tile(DEMO_CLASSES.index("IHC") + 6 * i, seed=0)
        assert DEMO_CLASSES[label] == "IHC"
        corner = tile[:8, :8]
        hit = False
        for o in orientations:  # find the tile's top-left corner, then compare the whole tile
            ys, xs = np.nonzero((o[:-223, :-223] == corner[0, 0]).all(2))
            for y, x in zip(ys, xs):
                if np.array_equal(o[y:y + 224, x:x + 224], tile):
                    hit = True
                    break
            if hit:
                break
        assert hit


def features(tile):
    """Colour means/stds and mean gradient magnitude: a hand-made descriptor."""
    t = tile.astype(np.float32)
    grad = np.abs(np.diff(t.mean(2), axis=0)).mean() + np.abs(np.diff(t.mean(2), axis=1)).mean()
    dark = (t.mean(2) < 140).mean()
    return np.concatenate([t.mean((0, 1)), t.std((0, 1)), [grad, 100 * dark]])


def test_classes_are_visually_distinct():
    n = len(DEMO_CLASSES)
    train = [(features(demo_tile(i, seed=0, size=112)[0]), i % n) for i in range(n * 12)]
    test = [(features(demo_tile(i, seed=1, size=112)[0]), i % n) for i in range(n * 8)]
    X = np.stack([f for f, _ in train])
    mu, sd = X.mean(0), X.std(0) + 1e-6
    centroids = np.stack([((X - mu) / sd)[[y == c for _, y in train]].mean(0) for c in range(n)])
    correct = sum(np.argmin((((f - mu) / sd - centroids) ** 2).sum(1)) == y for f, y in test)
    assert correct / len(test) >= 0.9
    for i in range(n):  # no tile is flat
        assert demo_tile(i)[0].std() > 3
