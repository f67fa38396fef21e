"""Gland data: instances from label maps, GlaS and CRAG layouts as distributed, flips, demo
glands."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import DataError
from common.glands import (GT_COLOUR, PALETTE, PRED_COLOUR, GlandDataset, draw_detections, build_gland_dataset, collate, crag_items,
                           demo_glands, demo_items, glas_items, instances, overlay, read_grades,
                           read_label_map)
from tests.conftest import run_script

GLAS_FOLDER = "Warwick QU Dataset (Released 2016_07_08)"


def box_of(mask):
    """Independent reference: pixel-edge box of a boolean mask from its pixel coordinates."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def erode(m, k):
    for _ in range(k):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


# ---------------------------------------------------------------------------------------------
# instances

def test_instances_hand_made_map():
    label = np.zeros((10, 12), np.uint8)
    label[1:3, 2:5] = 3      # 2 x 3 rectangle
    label[5:7, 0:2] = 7      # id 7, first piece (4 px) ...
    label[8, 9:12] = 7       # ... and a second, disconnected one (3 px) touching the right edge
    label[9, 5] = 200        # one pixel at column 5, row 9
    masks, boxes, ids = instances(label)
    assert ids.dtype == np.int64 and ids.tolist() == [3, 7, 200]
    assert masks.dtype == np.uint8 and masks.shape == (3, 10, 12)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4)
    assert boxes.tolist() == [[2, 1, 5, 3], [0, 5, 12, 9], [5, 9, 6, 10]]
    assert masks.sum((1, 2)).tolist() == [6, 7, 1]
    assert masks[1, 8, 11] == 1 and masks[1, 5, 0] == 1 and masks[1, 0, 0] == 0
    assert np.array_equal((masks * ids[:, None, None]).sum(0), label)


def test_instances_of_an_empty_map_and_of_16_bit_ids():
    masks, boxes, ids = instances(np.zeros((4, 5), np.int32))
    assert masks.shape == (0, 4, 5) and boxes.shape == (0, 4) and ids.shape == (0,)
    label = np.zeros((6, 6), np.uint16)
    label[0, 0], label[2:, 3] = 1000, 300
    masks, boxes, ids = instances(label)
    assert ids.tolist() == [300, 1000] and boxes.tolist() == [[3, 2, 4, 6], [0, 0, 1, 1]]


def test_read_label_map_palette_gives_indices(tmp_path):
    label = np.array([[0, 1], [2, 2]], np.uint8)
    im = Image.fromarray(label, "P")
    im.putpalette([0, 0, 0, 250, 10, 10, 10, 250, 10] + [0] * 759)  # colours unlike the ids
    im.save(tmp_path / "p.png")
    assert np.array_equal(read_label_map(tmp_path / "p.png"), label)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        read_label_map(tmp_path / "bad.png")


def test_read_label_map_colour_coded_instances(tmp_path):
    # Two glands whose colours share the red channel must stay two instances; a grey map
    # stored as RGB keeps its grey values as ids.
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[0, :2] = (200, 10, 10)
    rgb[2:, 3:] = (200, 10, 90)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    masks, _, _ = instances(read_label_map(tmp_path / "colour.png"))
    assert masks.sum((1, 2)).tolist() == [2, 4]
    grey = np.zeros((4, 5), np.uint8)
    grey[1, 1:3], grey[3, 0] = 7, 3
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "grey.png")
    assert read_label_map(tmp_path / "grey.png").tolist() == grey.tolist()
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), "LA").save(tmp_path / "la.png")
    assert read_label_map(tmp_path / "la.png").tolist() == grey.tolist()  # grey + alpha
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert instances(read_label_map(tmp_path / "rgba.png"))[0].sum((1, 2)).tolist() == [2, 4]


# ---------------------------------------------------------------------------------------------
# GlaS

GRADES = {"train_1": "malignant", "train_2": "benign", "train_10": "malignant",
          "testA_1": "benign", "testA_2": "malignant", "testB_1": "malignant"}


def write_glas(folder, size=(40, 30), empty=(), three_channel=()):
    """A GlaS-like flat folder: BMP images, `_anno.bmp` label maps, CR-only Grade.csv."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate(GRADES):
        w, h = size
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{name}.bmp")
        label = np.zeros((h, w), np.uint8)
        if name not in empty:
            label[2:10, 3:12] = 5 + k
            label[15:20, 20:35] = 9 + k
        if name in three_channel:  # channel 0 holds the ids, the others something else
            label = np.stack([label, 255 - label, np.full_like(label, 7)], -1)
        Image.fromarray(label).save(folder / f"{name}_anno.bmp")
    rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    rows += [f"{n},{i}, {g}, whatever" for i, (n, g) in enumerate(GRADES.items())]
    (folder / "Grade.csv").write_bytes("\r".join(rows).encode())
    return folder


def test_glas_layout_from_the_folder_and_its_parent(tmp_path):
    folder = write_glas(tmp_path / GLAS_FOLDER)
    for root in (folder, tmp_path):
        train = glas_items(root, "train")
        assert [it["name"] for it in train] == ["train_1", "train_2", "train_10"]
        assert train[2]["image"] == folder / "train_10.bmp"
        assert train[2]["anno"] == folder / "train_10_anno.bmp"
        test = glas_items(root, "test")
        assert [it["name"] for it in test] == ["testA_1", "testA_2", "testB_1"]
        assert test == glas_items(root, "testA") + glas_items(root, "testB")
        assert {it["name"]: it["grade"] for it in train + test} == GRADES
    assert read_grades(folder / "Grade.csv") == GRADES
    (folder / "Grade.csv").unlink()  # grades are optional
    assert [it["grade"] for it in glas_items(folder, "train")] == [None] * 3


def test_glas_dataset_targets(tmp_path):
    folder = write_glas(tmp_path / GLAS_FOLDER, three_channel=("train_2",))
    assert read_label_map(folder / "train_2_anno.bmp").tolist() == \
        np.array(Image.open(folder / "train_2_anno.bmp"))[..., 0].tolist()
    ds = GlandDataset(glas_items(folder, "train"), train=False)
    image, target = ds[1]  # train_2, the 3-channel annotation: ids 6 and 10 from channel 0
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    expected = np.asarray(Image.open(folder / "train_2.bmp"))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
    assert target["name"] == "train_2" and target["image_id"] == 1
    assert target["boxes"].tolist() == [[3, 2, 12, 10], [20, 15, 35, 20]]
    assert target["labels"].tolist() == [1, 1] and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (2, 30, 40) and target["masks"].dtype == torch.uint8
    assert target["masks"].sum((1, 2)).tolist() == [72, 75]
    images, targets = collate([ds[0], ds[2]])
    assert [t["name"] for t in targets] == ["train_1", "train_10"] and len(images) == 2


def test_glas_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        glas_items(tmp_path / "nowhere", "train")
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match=r"no GlaS layout.*train_<n>\.bmp"):
        glas_items(tmp_path / "other", "train")
    folder = write_glas(tmp_path / GLAS_FOLDER)
    (folder / "testB_1_anno.bmp").unlink()
    with pytest.raises(DataError, match="testB_1_anno.bmp"):
        glas_items(folder, "test")
    items = glas_items(folder, "test", require_annotations=False)
    assert items[-1]["anno"] is None and items[0]["anno"] is not None
    Image.new("L", (41, 30)).save(folder / "train_2_anno.bmp")  # one column too wide
    with pytest.raises(DataError, match=r"train_2_anno\.bmp is 41x30 .* is 40x30"):
        GlandDataset(glas_items(folder, "train"), train=True)


def test_empty_annotations_dropped_in_training_kept_in_testing(tmp_path, capsys):
    folder = write_glas(tmp_path / GLAS_FOLDER, empty=("train_2", "testA_2"))
    train = GlandDataset(glas_items(folder, "train"), train=True)
    assert [it["name"] for it in train.items] == ["train_1", "train_10"]
    assert train.dropped == ["train_2"] and train.empty == []
    assert "1 of 3 training images have no glands" in capsys.readouterr().out
    test = GlandDataset(glas_items(folder, "test"), train=False)
    assert len(test) == 3 and test.empty == ["testA_2"]
    image, target = test[1]
    assert target["name"] == "testA_2" and target["boxes"].shape == (0, 4)
    assert target["masks"].shape == (0, 30, 40) and target["labels"].shape == (0,)


# ---------------------------------------------------------------------------------------------
# CRAG

def write_crag(root, test_dir, anno_dir):
    rng = np.random.default_rng(1)
    for split, names in (("train", ["train_10", "train_2", "train_1"]),
                         (test_dir, ["test_1", "test_2"])):
        for sub in ("Images", anno_dir):
            (root / split / sub).mkdir(parents=True)
        for k, name in enumerate(names):
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
                root / split / "Images" / f"{name}.png")
            label = np.zeros((24, 32), np.uint16)
            label[1:5, 1:9], label[10:20, 12:30] = 300 + k, 1000  # ids beyond 8 bits
            Image.fromarray(label).save(root / split / anno_dir / f"{name}.png")


@pytest.mark.parametrize("test_dir,anno_dir", [("valid", "Annotation"), ("test", "Annotations")])
def test_crag_layouts(tmp_path, test_dir, anno_dir):
    crag = tmp_path / "CRAG_v2" / "CRAG"
    write_crag(crag, test_dir, anno_dir)
    for root in (crag, crag.parent, tmp_path):
        train = crag_items(root, "train")
        assert [it["name"] for it in train] == ["train_1", "train_2", "train_10"]
        assert train[0]["anno"] == crag / "train" / anno_dir / "train_1.png"
        assert {it["grade"] for it in train} == {None}
        assert [it["name"] for it in crag_items(root, "test")] == ["test_1", "test_2"]
    label = read_label_map(crag / "train" / anno_dir / "train_1.png")
    assert label.dtype.itemsize >= 2 and sorted(np.unique(label).tolist()) == [0, 302, 1000]
    image, target = GlandDataset(crag_items(crag, "test"), train=False)[1]
    assert image.shape == (3, 24, 32)
    assert target["boxes"].tolist() == [[1, 1, 9, 5], [12, 10, 30, 20]]
    (crag / test_dir / anno_dir / "test_2.png").unlink()
    with pytest.raises(DataError, match="test_2"):
        crag_items(crag, "test")
    assert crag_items(crag, "test", require_annotations=False)[1]["anno"] is None


def test_crag_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        crag_items(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="no CRAG layout.*train/Images"):
        crag_items(tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# Flips

def test_training_flip_mirrors_image_masks_and_boxes():
    items = demo_items(3, seed=2, size=64)
    plain = GlandDataset(items, train=False)
    ds = GlandDataset(items, train=True, seed=5)
    seen = {True: 0, False: 0}
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            (img, t), (img0, t0) = ds[i], plain[i]
            flipped = not torch.equal(img, img0)
            seen[flipped] += 1
            assert torch.equal(ds[i][0], img)  # a pure function of (seed, epoch, index)
            if flipped:
                assert torch.equal(img, img0.flip(-1))
                assert torch.equal(t["masks"], t0["masks"].flip(-1))
            assert len(t["boxes"]) == len(t0["boxes"]) >= 2
            for mask, box in zip(t["masks"].numpy(), t["boxes"].tolist()):
                assert box == box_of(mask)
            x0, y0, x1, y1 = t0["boxes"].unbind(1)
            mirrored = torch.stack([64 - x1, y0, 64 - x0, y1], 1) if flipped else t0["boxes"]
            assert torch.equal(t["boxes"], mirrored)
    assert seen[True] >= 3 and seen[False] >= 3  # both happen: p = 0.5 over 18 draws


# ---------------------------------------------------------------------------------------------
# Demo glands

def test_demo_glands_deterministic_and_well_formed():
    img, label = demo_glands(4, seed=3)
    again = demo_glands(4, seed=3)
    assert np.array_equal(img, again[0]) and np.array_equal(label, again[1])
    assert not np.array_equal(img, demo_glands(4, seed=4)[0])
    touching = 0
    for i in range(10):
        img, label = demo_glands(i, seed=3)
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        assert label.shape == (256, 256) and label.dtype == np.int32
        n = int(label.max())
        assert 2 <= n <= 8 and np.unique(label).tolist() == list(range(n + 1))
        masks = instances(label)[0].astype(bool)
        touching += sum(bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
                        for m in masks)
        mean = img.reshape(-1, 3).mean(0)
        assert mean[0] > mean[1] + 20 and mean[2] > mean[1]  # pink-purple, as H&E
        grey = img.mean(2)
        rim = np.array([m & ~erode(m, 7) for m in masks]).any(0)  # the ring of nuclei
        assert grey[rim].mean() < grey[label == 0].mean() - 20
        core = np.array([erode(m, 16) for m in masks]).any(0)  # lumens
        if core.any():
            assert grey[core].mean() > grey[label == 0].mean() + 15
    assert touching >= 3  # some glands are cut by the border


def test_demo_glands_keep_apart():
    for i in range(30):
        label = demo_glands(i, seed=0)[1]
        p = np.pad(label, 2)
        for dy in range(-2, 3):  # any two pixels of different glands are >= 3 px apart
            for dx in range(-2, 3):
                other = p[2 + dy:258 + dy, 2 + dx:258 + dx]
                assert not ((label > 0) & (other > 0) & (other != label)).any(), (i, dy, dx)


def test_demo_datasets():
    train = build_gland_dataset("demo", None, "train", True, seed=0, demo_size=8)
    test = build_gland_dataset("demo", None, "test", False, seed=0, demo_size=8)
    assert len(train) == 8 and len(test) == 2 and test.empty == []
    image, target = train[0]
    assert image.shape == (3, 256, 256) and target["name"] == "demo_0"
    train_images = [train.load(i)[0] for i in range(len(train))]
    for i in range(len(test)):
        assert not any(np.array_equal(test.load(i)[0], t) for t in train_images)
    assert len(build_gland_dataset("demo", None, "test", False)) == 16
    with pytest.raises(DataError, match="--data-root"):
        build_gland_dataset("glas", None, "train", True)


def test_overlay_draws_outlines_only():
    image = np.full((20, 20, 3), 100, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    out = overlay(image, mask[None], (255, 0, 0))
    changed = (out != image).any(2)
    assert changed.sum() == 36 and np.array_equal(changed, mask & ~erode(mask, 1))
    assert out[5, 5].tolist() == [255, 0, 0] and (image == 100).all()  # input untouched
    other = np.zeros_like(mask)
    other[0:3, 0:3] = True  # cut by the image border: outlined there too
    out = overlay(image, np.stack([mask, other, np.zeros_like(mask)]))  # colours per instance
    assert out[5, 5].tolist() == list(PALETTE[0]) and out[0, 0].tolist() == list(PALETTE[1])
    assert out[1, 1].tolist() == [100, 100, 100]


def test_detection_picture_outlines_and_legend():
    # 2 px outlines in green (ground truth) and yellow (prediction): neither is magenta, both far
    # from H&E's pinks and purples; the legend sits in a black band above the image, never over
    # the tissue, and the score is yellow on a dark label above its box.
    image = np.full((120, 160, 3), (230, 160, 200), np.uint8)  # eosin pink
    gt, pred = np.zeros((1, 120, 160), bool), np.zeros((1, 120, 160), bool)
    gt[0, 60:100, 20:60], pred[0, 62:102, 90:130] = True, True
    pic = np.asarray(draw_detections(image, gt, pred, [[90, 62, 130, 102]], [0.87]))
    band = pic.shape[0] - 120
    assert pic.shape[1] >= 160 and band > 24
    out, legend = pic[band:, :160], pic[:band]
    assert (out[60:100, 20:60] == GT_COLOUR).all(2).sum() == 40 * 40 - 36 * 36  # 2 px ring
    assert (out[62:102, 90:130] == PRED_COLOUR).all(2).sum() >= 40 * 40 - 36 * 36
    assert (out[70:90, 30:50] == image[0, 0]).all()  # inside left alone
    assert (out[:40] == image[0, 0]).all(2).all()  # nothing drawn over the tissue's top
    assert (legend == PRED_COLOUR).all(2).any() and (legend == GT_COLOUR).all(2).any()
    assert (legend > 200).all(2).any()  # white legend text
    label = out[40:62, 88:135].astype(int)  # the score's label above the prediction
    assert (label == 0).all(2).sum() > 150  # a dark label of about 30 x 15 px
    assert ((label[..., 0] > 200) & (label[..., 1] > 180) & (label[..., 2] < 120)).any()


def test_contact_sheet_command(tmp_path):
    run_script("-m", "common.glands", "--out", tmp_path / "g.png", "--n", "4", "--size", "128")
    assert Image.open(tmp_path / "g.png").size == (4 * 128, 128 + 16)


# ---------------------------------------------------------------------------------------------
# Real GlaS images (no annotations exist in the samples: we write label maps of their size)

def test_real_glas_images_and_grade_csv(tmp_path, shared_samples):
    src = shared_samples / "glas_images_only"
    folder = tmp_path / GLAS_FOLDER
    folder.mkdir()
    shutil.copy(src / "Grade.csv", folder)
    for p in sorted(src.glob("*.bmp")):
        shutil.copy(p, folder)
        w, h = Image.open(p).size
        label = np.zeros((h, w), np.uint8)
        label[10:60, 20:90], label[h - 30:, w - 40:] = 1, 4  # the second gland cut by the corner
        Image.fromarray(label).save(folder / f"{p.stem}_anno.bmp")

    # the csv read independently: CR-separated lines, comma-separated, spaces around values
    lines = (src / "Grade.csv").read_bytes().decode().split("\r")
    cells = [ln.split(",") for ln in lines[1:] if ln.strip()]
    expected = {c[0].strip(): c[2].strip() for c in cells}
    grades = read_grades(folder / "Grade.csv")
    assert len(grades) == 165 and grades == expected
    counts = {s: [sum(1 for n, g in grades.items() if n.startswith(s + "_") and g == c)
                  for c in ("benign", "malignant")] for s in ("train", "testA", "testB")}
    assert counts == {"train": [37, 48], "testA": [33, 27], "testB": [4, 16]}

    train, test = glas_items(tmp_path, "train"), glas_items(tmp_path, "test")
    assert [it["name"] for it in train] == ["train_1", "train_12"]
    assert [it["name"] for it in test] == ["testA_2", "testB_1"]
    assert [it["grade"] for it in train + test] == ["malignant", "benign", "benign", "malignant"]
    ds = GlandDataset(train + test, train=False)
    sizes = {}
    for i in range(len(ds)):
        image, target = ds[i]
        sizes[target["name"]] = tuple(image.shape[1:])
        h, w = image.shape[1:]
        assert target["boxes"].tolist() == [[20, 10, 90, 60], [w - 40, h - 30, w, h]]
    assert sizes == {"train_1": (522, 775), "train_12": (433, 574), "testA_2": (453, 589),
                     "testB_1": (522, 775)}
