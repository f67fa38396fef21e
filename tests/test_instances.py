"""--data instances (your own images + label maps) and the CPM-15 converter, checked against
hand-made folders, then on the real CPM-15 nuclei: a short CPU fine-tune from random init must
beat the untrained detector on the held-out image."""
import json
import shutil

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import finetune_maskrcnn as ft
from common import glands
from common.data import DataError, sample_seed
from common.detection import evaluate
from conftest import run_script


def label_map(h, w, boxes):
    a = np.zeros((h, w), np.int64)
    for v, (x0, y0, x1, y1) in boxes.items():
        a[y0:y1, x0:x1] = v
    return a


def write_split(root, split, maps, fmt):
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir()
    for stem, a in maps.items():
        Image.fromarray(np.full((*a.shape, 3), 200, np.uint8)).save(root / split / "images" / f"{stem}.png")
        m = root / split / "masks" / stem
        if fmt == "png8":
            Image.fromarray(a.astype(np.uint8)).save(f"{m}.png")
        elif fmt == "png16":
            Image.fromarray(a.astype(np.uint16)).save(f"{m}.png")
        elif fmt == "tif":
            tifffile.imwrite(f"{m}.tif", a.astype(np.uint16))
        else:
            np.save(f"{m}.npy", a.astype(np.int32))


@pytest.mark.parametrize("fmt", ["png8", "png16", "tif", "npy"])
def test_instances_layout_reads_every_mask_format(tmp_path, fmt):
    # ids 3 and 700 (700 only where 16 bits fit), one nucleus cut into two pieces stays one
    big = 7 if fmt == "png8" else 700
    a = label_map(30, 40, {3: (2, 4, 6, 9), big: (20, 10, 31, 12)})
    a[25:27, 35:38] = 3  # a second piece of id 3: one instance, its box around both pieces
    write_split(tmp_path, "train", {"a": a, "b": label_map(30, 40, {1: (0, 0, 5, 5)})}, fmt)
    write_split(tmp_path, "val", {"c": a}, fmt)  # val/ stands in for test/
    train = glands.build_gland_dataset("instances", tmp_path, "train", True)
    test = glands.build_gland_dataset("instances", tmp_path, "test", False)
    assert [it["name"] for it in train.items] == ["a", "b"] and len(test) == 1
    image, t = test[0]
    assert image.shape == (3, 30, 40) and t["name"] == "c"
    assert t["boxes"].tolist() == [[2, 4, 38, 27], [20, 10, 31, 12]]
    assert t["masks"].sum((1, 2)).tolist() == [4 * 5 + 2 * 3, 11 * 2]


def test_instances_errors_are_one_clear_line(tmp_path):
    a = label_map(20, 20, {1: (2, 2, 8, 8)})
    write_split(tmp_path, "train", {"a": a, "b": a}, "png16")
    with pytest.raises(DataError, match="no test/images or val/images"):
        glands.build_gland_dataset("instances", tmp_path, "test", False)
    (tmp_path / "train" / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b\.png has no label map b\.png/\.tif/\.npy"):
        glands.build_gland_dataset("instances", tmp_path, "train", True)
    Image.fromarray(np.zeros((20, 21), np.uint16)).save(tmp_path / "train" / "masks" / "b.png")
    with pytest.raises(DataError, match="is 21x20 but its image .* is 20x20"):
        glands.build_gland_dataset("instances", tmp_path, "train", True)
    for stem in "ab":
        Image.fromarray(np.zeros((20, 20), np.uint16)).save(tmp_path / "train" / "masks" / f"{stem}.png")
    with pytest.raises(DataError, match="none of the 2 training images has a gland or any other "
                                        r"instance \(every label map is all 0"):
        glands.build_gland_dataset("instances", tmp_path, "train", True)
    np.save(tmp_path / "train" / "masks" / "a.npy", np.full((20, 20), 0.5))
    (tmp_path / "train" / "masks" / "a.png").unlink()
    with pytest.raises(DataError, match="holds fractions"):
        glands.build_gland_dataset("instances", tmp_path, "train", True)


def test_convert_cpm_hand_made(tmp_path):
    # README_training.txt's own example: 5 x 4 pixels, two nuclei, x fastest
    src = tmp_path / "cpm"
    src.mkdir()
    grid = ["00000", "01100", "11200", "02220"]
    (src / "image01_mask.txt").write_text("5 4\n" + "".join(c + "\n" for row in grid for c in row))
    Image.fromarray(np.zeros((4, 5, 4), np.uint8)).save(src / "image01.png")  # RGBA, as CPM
    shutil.copy(src / "image01_mask.txt", src / "image02_mask.txt")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(src / "image02.png")
    assert glands.convert_cpm(src, tmp_path / "out", {"image02"}) == {"train": 1, "test": 1}
    label = np.array(Image.open(tmp_path / "out" / "train" / "masks" / "image01.png"))
    assert label.tolist() == [[int(c) for c in row] for row in grid]
    assert Image.open(tmp_path / "out" / "test" / "images" / "image02.png").mode == "RGB"
    (src / "image03_mask.txt").write_text("5 4\n0\n1\n")  # truncated
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(src / "image03.png")
    p = run_script("-m", "common.glands", "convert-cpm", "--src", src, "--out", tmp_path / "o2",
                   check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: CPM mask {src / 'image03_mask.txt'} says 5x4 but holds 2 values"], p.stderr
    # a typo in --test, an image without its mask: one clear line each, before anything is written
    with pytest.raises(DataError, match=r"^--test image99: no such image in .* \(its stems: "
                                        r"image01 \.\.\. image03\)$"):
        glands.convert_cpm(src, tmp_path / "o3", {"image02", "image99"})
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(src / "image04.png")
    with pytest.raises(DataError, match=r"image04.png has no image04_mask.txt beside it; move it"):
        glands.convert_cpm(src, tmp_path / "o3")
    assert not (tmp_path / "o3").exists()


# The real-data check. CPM-15 tiles are 440-500 px with 127-292 nuclei of 5-36 px. A Mask
# R-CNN step over two of them at 256 px and Detectron2's 512 RoIs took 49 s on the 2 shared
# cores (the mask head on up to 128 positive RoIs per image dominates), so training runs on 128 px crops of the three training images at their native scale (the
# fine-tuner resizes nothing: --train-sizes 128 128) with 32 RoIs per image, and the test image
# is scored whole, at its native 439 px shortest edge. The test image is image07 (20x, 292
# nuclei, the most of the four), training images 02, 06 (20x) and 14 (40x): image14 as the test
# image would be seen at a magnification only one training image shares.
SIZE = ["--img-size", "439", "--train-sizes", "128", "128", "--rois-per-image", "32",
        "--proposals", "300", "--detections", "400"]


def crop_training_images(root, size=128):
    """root/train/{images,masks}/X.png -> size x size crops on a grid (the last row and column
    flush with the far edges), in place of the whole images."""
    for image in sorted((root / "train" / "images").glob("*.png")):
        mask = root / "train" / "masks" / image.name
        rgb, label = np.array(Image.open(image)), np.array(Image.open(mask))
        h, w = label.shape
        for y in sorted({*range(0, h - size, size), h - size}):
            for x in sorted({*range(0, w - size, size), w - size}):
                name = f"{image.stem}_{y}_{x}.png"
                Image.fromarray(rgb[y:y + size, x:x + size]).save(image.with_name(name))
                Image.fromarray(label[y:y + size, x:x + size]).save(mask.with_name(name))
        image.unlink()
        mask.unlink()


def test_cpm15_nuclei_learn_from_random_init(tmp_path, shared_samples):
    src = shared_samples / "cpm15_nuclei"
    # in this process (the command line is checked above): one torch import fewer
    assert glands.convert_cpm(src, tmp_path / "cpm", {"image07"}) == {"train": 3, "test": 1}
    crop_training_images(tmp_path / "cpm")
    out = tmp_path / "ft"
    run_script("finetune_maskrcnn.py", "--data", "instances", "--data-root", tmp_path / "cpm",
               *SIZE, *TRAIN, "--runs", "1", "--workers", "0", "--vis", "1", "--log-every", "10",
               "--output-dir", out, env={"OMP_NUM_THREADS": "2"}, timeout=1800)
    trained = json.loads((out / "run0" / "metrics.json").read_text())
    # the same detector before any step (the run's own initialisation), scored the same way
    args = ft.get_args(["--data", "instances", *SIZE])
    args.train_sizes = [128]
    torch.manual_seed(sample_seed(0, 2**31))
    untrained, _ = ft.make_detector(args)
    test_set = glands.build_gland_dataset("instances", tmp_path / "cpm", "test", False)
    before = evaluate(untrained, test_set, "cpu", max_dets=400)
    print("untrained", before, "trained", trained)
    assert before["bbox"]["AP50"] < BARS["untrained"], before
    assert trained["bbox"]["AP50"] > BARS["trained"], trained
    assert (out / "run0" / "vis" / "image07.png").is_file()
    assert json.loads((out / "args.json").read_text())["anchor_sizes"] == [8, 16, 32, 64, 128]


# 40 steps of 4 crops at lr 0.08 (0.32 at batch 16, scaled). MEASURED (seed 0): box AP50 on
# image07 untrained 0.007 (seeds 1, 2: 0.0), trained 23.4 (AP 5.8; mask AP50 25.4; 9 min wall
# on the 2 cores at a load of about 7 from other jobs). 60 steps had given 26.8 (mask 33.8) for
# 1.5x the training. Bars: trained above 13 (set at half the 60-step figure, kept),
# untrained below 1 (over 100x the measured).
TRAIN = ["--batch-size", "4", "--max-iters", "40", "--lr", "0.32", "--precise-bn", "4"]
BARS = {"untrained": 1.0, "trained": 13.0}
