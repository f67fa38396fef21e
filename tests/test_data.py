"""Dataset layouts, image decoding and view geometry on files generated in a temp dir."""
import argparse

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from common import data as cdata
from common import draws


def save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def tile(value, size=32):
    return np.full((size, size, 3), value, np.uint8)


def args_for(data, root=None, **kw):
    return argparse.Namespace(data=data, data_root=root, train_list=None, skip_bad=False,
                              demo_size=12, seed=0, **kw)


# ----------------------------------------------------------------------------- NCT layouts
def test_nct_nested_zip_layouts_find_class_from_nearest_class_folder(tmp_path):
    # the three nestings the official zips are known to produce (docs/datasets.md 1)
    save(tmp_path / "ADI" / "ADI-AAAFLCLY.tif", tile(10))
    save(tmp_path / "NCT-CRC-HE-100K" / "NCT-CRC-HE-100K" / "TUM" / "TUM-AAAAAAAA.tif", tile(20))
    save(tmp_path / "CRC-VAL-HE-7K" / "MUS" / "MUS-TCGA-BBBBBBBB.tif", tile(30))
    save(tmp_path / "CRC-VAL-HE-7K" / "MUS" / "sub" / "MUS-TCGA-CCCCCCCC.png", tile(40))
    save(tmp_path / "notes" / "README.png", tile(50))  # not under a class folder: ignored
    ds = cdata.build_dataset(args_for("nct", str(tmp_path)))
    got = sorted((p.split("/")[-1], ds.classes[y]) for p, y in zip(ds.paths, ds.targets))
    assert got == [("ADI-AAAFLCLY.tif", "ADI"), ("MUS-TCGA-BBBBBBBB.tif", "MUS"),
                   ("MUS-TCGA-CCCCCCCC.png", "MUS"), ("TUM-AAAAAAAA.tif", "TUM")]
    assert ds.classes == list(cdata.NCT_CLASSES)
    img, label = ds[ds.paths.index(next(p for p in ds.paths if "TUM-" in p))]
    assert img.mode == "RGB" and np.asarray(img)[0, 0, 0] == 20 and ds.classes[label] == "TUM"


def test_nct_train_list_crlf_with_labels_selects_in_list_order(tmp_path):
    for name in ("ADI/ADI-A.tif", "TUM/TUM-B.tif", "TUM/TUM-C.tif"):
        save(tmp_path / "NCT-CRC-HE-100K" / name, tile(1))
    lst = tmp_path / "train.txt"
    lst.write_bytes(b"TUM/TUM-C.tif 8\r\nADI/ADI-A.tif 1")  # ConCL's CRLF, no final newline
    ds = cdata.nct_dataset(tmp_path, lst)
    assert [p.split("/")[-1] for p in ds.paths] == ["TUM-C.tif", "ADI-A.tif"]
    assert [ds.classes[y] for y in ds.targets] == ["TUM", "ADI"]
    lst.write_text("TUM/TUM-C.tif\nSTR/STR-MISSING.tif\n")
    with pytest.raises(cdata.DataError, match="1 of 2 entries not found.*STR/STR-MISSING.tif"):
        cdata.nct_dataset(tmp_path, lst)


def test_clear_errors_name_the_culprit(tmp_path):
    with pytest.raises(cdata.DataError, match="does not exist"):
        cdata.build_dataset(args_for("nct", str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(cdata.DataError, match=f"no images .* under {tmp_path / 'empty'}"):
        cdata.build_dataset(args_for("folder", str(tmp_path / "empty")))
    save(tmp_path / "other" / "cats" / "a.png", tile(1))
    with pytest.raises(cdata.DataError, match="no image under .*other.*NCT class"):
        cdata.build_dataset(args_for("nct", str(tmp_path / "other")))
    with pytest.raises(cdata.DataError, match="needs --data-root"):
        cdata.build_dataset(args_for("folder", None))


def test_folder_dataset_recursive_with_first_level_classes(tmp_path):
    save(tmp_path / "a" / "deep" / "x.jpg", tile(1))
    save(tmp_path / "b" / "y.bmp", tile(2))
    save(tmp_path / "z.tiff", tile(3))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = cdata.folder_dataset(tmp_path)
    assert ds.classes == ["a", "b"]
    assert sorted((p.split("/")[-1], y) for p, y in zip(ds.paths, ds.targets)) == \
        [("x.jpg", 0), ("y.bmp", 1), ("z.tiff", -1)]


# ----------------------------------------------------------------------------- decoding
def test_rgba_composites_over_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., :3] = (200, 10, 30)
    a[0, :, 3] = 255   # opaque row keeps its colour
    a[1:, :, 3] = 0    # transparent rows become white
    img = np.asarray(cdata.read_rgb(save(tmp_path / "rgba.png", a)))
    assert img.shape == (4, 4, 3)
    assert img[0, 0].tolist() == [200, 10, 30] and img[2, 2].tolist() == [255, 255, 255]


def test_16bit_grey_png_and_rgb_tiff_scale_to_8bit(tmp_path):
    grey = np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    img = np.asarray(cdata.read_rgb(tmp_path / "g16.png"))
    assert img.dtype == np.uint8 and img[..., 0].tolist() == [[0, 100], [255, 7]]
    assert (img[..., 0] == img[..., 2]).all()
    import tifffile  # ships with scikit-image
    rgb = np.zeros((2, 2, 3), np.uint16)
    rgb[0, 0] = (65535, 257 * 50, 0)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb)
    img = np.asarray(cdata.read_rgb(tmp_path / "rgb16.tif"))
    assert img[0, 0].tolist() == [255, 50, 0] and img[1, 1].tolist() == [0, 0, 0]


def test_grey_8bit_becomes_rgb(tmp_path):
    Image.fromarray(np.full((3, 3), 77, np.uint8)).save(tmp_path / "g.png")
    assert np.asarray(cdata.read_rgb(tmp_path / "g.png"))[1, 1].tolist() == [77, 77, 77]


def test_corrupt_image_error_and_skip_bad(tmp_path):
    good = [save(tmp_path / f"{i}.png", tile(10 * i)) for i in range(3)]
    bad = tmp_path / "1.png"
    bad.write_bytes(good[0].read_bytes()[:40])  # truncated PNG
    with pytest.raises(cdata.DataError, match=f"unreadable image {bad}"):
        cdata.read_rgb(bad)
    ds = cdata.ImageList(good, [0, 1, 2], ["x"], skip_bad=False)
    with pytest.raises(cdata.DataError):
        ds.load(1)
    ds.skip_bad = True
    img, label, skipped = ds.load(1)  # falls through to the next readable image, counted
    assert (label, skipped, np.asarray(img)[0, 0, 0]) == (2, 1, 20)


def test_real_nct_and_glas_samples_decode(shared_samples):
    for p in sorted((shared_samples / "nct_crc_he").glob("*.[tp][in][fg]")):
        img = cdata.read_rgb(p)
        assert img.size == (224, 224) and img.mode == "RGB"
        assert 30 < np.asarray(img).mean() < 250
    img = cdata.read_rgb(shared_samples / "glas_images_only" / "train_1.bmp")
    assert img.size == (775, 522)


# ----------------------------------------------------------------------------- views
def coordinate_image(w=200, h=150):
    """R = x, G = y: every pixel says where it came from."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :]
    a[..., 1] = np.arange(h)[:, None]
    return Image.fromarray(a)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_view_box_and_flip_describe_the_pixels(flip_p):
    img, s = coordinate_image(), 50
    view = cdata.View(s, scale=(0.1, 0.6), flip_p=flip_p, interpolation=Image.NEAREST)
    torch.manual_seed(0)
    for _ in range(20):
        x, box, flipped = view(img)
        x0, y0, x1, y1 = box.tolist()
        assert flipped == bool(flip_p)
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 150
        assert 0.1 * 200 * 150 * 0.999 <= (x1 - x0) * (y1 - y0) <= 0.6 * 200 * 150 * 1.001
        u = np.arange(s)
        src_x = x0 + (u + 0.5) * (x1 - x0) / s       # nearest sample of output column u
        if flipped:
            src_x = src_x[::-1]
        src_y = y0 + (u + 0.5) * (y1 - y0) / s
        assert np.abs(x[0, 0].numpy() - src_x).max() <= 1.0
        assert np.abs(x[1, :, 0].numpy() - src_y).max() <= 1.0


def test_multiview_is_a_function_of_seed_epoch_index():
    base = [(coordinate_image(), 0)] * 6
    view = cdata.View(32, scale=(0.2, 1.0), photometric=T.ColorJitter(0.4, 0.4, 0.4, 0.1))
    ds = cdata.MultiViewDataset(base, [view, view], seed=5)
    a = ds[3]
    torch.manual_seed(123)  # global RNG state must not matter ...
    b = ds[3]
    assert torch.equal(a["views"][0], b["views"][0]) and torch.equal(a["boxes"][1], b["boxes"][1])
    assert not torch.equal(a["views"][0], a["views"][1])  # ... the two views differ
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["boxes"][0], a["boxes"][0])  # a new epoch, new crops
    ds.set_epoch(0)
    one = [b["boxes"][0] for b in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)]
    two = [b["boxes"][0] for b in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(one, two))  # any number of workers


def test_resumable_sampler_continues_the_same_order():
    ds = list(range(20))
    full = cdata.ResumableSampler(ds, num_replicas=2, rank=1, seed=3)
    full.set_epoch(4)
    order = list(full)
    assert len(order) == 10 and len(set(order)) == 10
    part = cdata.ResumableSampler(ds, num_replicas=2, rank=1, seed=3)
    part.set_epoch(4)
    part.set_start(6)
    assert list(part) == order[6:] and len(part) == 4


def test_to_device_matches_torchvision_normalize():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = T.Normalize(cdata.IMAGENET_MEAN, cdata.IMAGENET_STD)(x.float() / 255)
    torch.testing.assert_close(cdata.to_device(x, torch.device("cpu")), ref)


def test_every_header_is_checked_before_training(tmp_path, capsys):
    # 16 good tiles and two that are not images: found at build time, all named at once, even
    # though a sampler with drop_last might never draw them
    for i in range(16):
        save(tmp_path / "tiles" / f"a{i:02d}.png", tile(i))
    (tmp_path / "tiles" / "notes.png").write_text("not an image")
    (tmp_path / "tiles" / "sub").mkdir()
    (tmp_path / "tiles" / "sub" / "empty.tif").write_bytes(b"")
    args = args_for("folder", str(tmp_path / "tiles"))
    with pytest.raises(cdata.DataError, match=r"2 of 18 files .* not readable images: "
                                              r"notes\.png, sub/empty\.tif; .*--skip-bad"):
        cdata.build_dataset(args)
    args.skip_bad = True
    ds = cdata.build_dataset(args)
    assert len(ds) == 16 and ds.left_out == ["notes.png", "sub/empty.tif"]
    assert "left out 2 unreadable files" in capsys.readouterr().out


def test_moco_refuses_a_folder_with_a_bad_file_before_training(tmp_path):
    from tests.conftest import run_script
    for i in range(16):
        save(tmp_path / "tiles" / f"a{i:02d}.png", tile(10 * i, 64))
    (tmp_path / "tiles" / "broken.png").write_bytes(b"\x89PNG\r\n")
    common = ["moco.py", "--data", "folder", "--data-root", tmp_path / "tiles", "--batch-size",
              "8", "--img-size", "64", "--queue-size", "16", "--epochs", "1", "--workers", "0"]
    p = run_script(*common, "--output-dir", tmp_path / "run", check=False)
    assert p.returncode == 2 and "broken.png" in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()  # a failed start leaves no folder behind
    p = run_script(*common, "--skip-bad", "--output-dir", tmp_path / "run2")
    assert "left out 1 unreadable files" in p.stdout and "broken.png" in p.stdout
    import json
    rec = json.loads((tmp_path / "run2" / "log.jsonl").read_text().splitlines()[0])
    assert rec["unreadable_left_out"] == 1 and rec["unreadable_examples"] == ["broken.png"]


# ------------------------------------------------ the loader's draws, read from the generator

def test_sample_seed_equals_numpys_seed_sequence():
    """The unrolled (seed, epoch, index) hash against SeedSequence itself: random 32-bit keys
    of every magnitude, the edges, and the other key counts and sizes (numpy's path)."""
    rng = np.random.default_rng(0)
    keys = [tuple(int(k) >> int(s) for k, s in zip(rng.integers(0, 2**32, 3, dtype=np.uint64),
                                                  rng.integers(0, 32, 3))) for _ in range(3000)]
    keys += [(0, 0, 0), (2**32 - 1,) * 3, (0, 2**32 - 1, 1), (2**32, 0, 1), (5, 1, 2, 3), (7,),
             (2**63 - 1, 4, 9), (1, 2)]
    for k in keys:
        want = int(np.random.SeedSequence(list(k)).generate_state(2, np.uint64)[0] >> 1)
        assert cdata.sample_seed(*k) == want, k
        assert cdata.sample_seed(*map(np.int64, k)) == want


@pytest.mark.parametrize("lo, hi", [(0.2, 1.0), (0.08, 1.0), (-0.2876821, 0.2876821),
                                    (1e-30, 1.0), (-3.5, 1e-7), (1000.0, 1000.5)])
def test_float32_uniform_from_the_generator_words_equals_torch(lo, hi):
    """torch's uniform_ on float32 (a fused multiply-add, rounded once; a result that rounds
    up to hi becomes lo: the last range has such words) against the words numpy's legacy-seeded
    MT19937 yields for the same seed."""
    n = 50_000
    mt = np.random.MT19937()
    np.random.RandomState(mt).seed(11)
    words = mt.random_raw(n).tolist()
    want = torch.empty(n).uniform_(lo, hi, generator=torch.Generator().manual_seed(11)).tolist()
    rng = draws._uniform_range(lo, hi)
    assert [draws._uniform32(w, *rng) for w in words] == want


def _torch_draws(views, size, seed):
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return [v.draw_params(size) for v in views]


@pytest.mark.parametrize("case", ["moco_v2", "byol", "strips"])
def test_loader_draws_equal_the_torch_calls_seed_for_seed(case):
    """MultiViewDataset.draw_params (the --device-crop loader: words read in Python, no torch
    draw) against View.draw_params under torch's seeded generator: boxes, flips, photometric
    vectors for 800 samples; the strips force ten misses (the centred fallback) and retries,
    a flip_p of 0.3 and a view without photometric ops. Torch's own RNG is left alone."""
    import byol
    import moco
    if case == "moco_v2":
        views, size = [moco.augmentation("v2", 224)] * 2, (224, 224)
    elif case == "byol":
        views, size = list(byol.augmentations(64)), (64, 48)
    else:
        ph = moco.augmentation("v2", 32).photometric
        views = [cdata.View(32, (0.9, 1.0), (0.5, 2.0), flip_p=0.3),
                 cdata.View(32, (0.02, 1.0), photometric=ph)]
        size = (12, 300)
    assert cdata._fast_views(views)
    ds = cdata.MultiViewDataset(None, views, seed=3)
    ds.set_epoch(2)
    tile = np.zeros((*size, 3), np.uint8)
    torch.manual_seed(99)
    after = torch.rand(3)
    fallbacks = 0
    for i in range(800):
        torch.manual_seed(99)
        got = ds.draw_params(tile, i)
        assert torch.equal(torch.rand(3), after)  # the global generator untouched
        want = _torch_draws(views, size, cdata.sample_seed(3, 2, i))
        for k, (box, flip, photo, geo) in enumerate(want):
            assert torch.equal(got["boxes"][k], box) and got["flips"][k] == flip, (i, k)
            assert torch.equal(got["photo"][k], photo if photo is not None
                               else torch.zeros(0, dtype=torch.float64)), (i, k)
            assert geo is None and got["geo"][k].numel() == 0
            fallbacks += box.tolist() == [138, 0, 162, 12]  # the strip's centred 24 x 12
    assert case != "strips" or fallbacks > 0


def test_views_the_words_cannot_draw_take_the_torch_calls(monkeypatch):
    """A geometric op, a View subclass, or a torch that draws otherwise (the self-check sees a
    changed reading) keep the torch calls: the same numbers as before, always."""
    import moco
    v = moco.augmentation("v2", 32)

    class Rot:
        def sample(self):
            return torch.rand(1, dtype=torch.float64)

    geo = cdata.View(32, (0.2, 1.0), geometric=Rot())
    class Mine(cdata.View):  # draws something more after the View's numbers
        def draw_params(self, size):
            return (*super().draw_params(size)[:3], torch.rand(2, dtype=torch.float64))

    sub = Mine(32, (0.2, 1.0))
    assert cdata._fast_views([v, v])
    assert not cdata._fast_views([v, geo]) and not cdata._fast_views([sub])
    ds = cdata.MultiViewDataset(None, [v, geo], seed=1)
    got = ds.draw_params(np.zeros((40, 40, 3), np.uint8), 5)
    want = _torch_draws([v, geo], (40, 40), cdata.sample_seed(1, 0, 5))
    assert torch.equal(got["geo"][1], want[1][3]) and torch.equal(got["boxes"][0], want[0][0])
    assert cdata._words_agree()
    real = draws._uniform32
    monkeypatch.setattr(draws, "_uniform32", lambda w, *r: real(w ^ 0x800000, *r))
    cdata._words_agree.cache_clear()
    try:
        assert not cdata._words_agree() and not cdata._fast_views([v, v])
    finally:
        cdata._words_agree.cache_clear()


def test_device_crop_hands_a_writable_tile_to_collate_uncopied():
    """--device-crop's sample: a writable tile is the sample's tile itself (collate's stack is
    the one copy); a read-only one (the store's map) is copied (torch cannot take it), with the same pixels either way; the collated batch equals the tiles."""
    tiles = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)

    class Base:
        targets = [0, 1, 2, 3]

        def __init__(self, arr):
            self.arr = arr

        def __len__(self):
            return len(self.arr)

        def tile(self, i):
            return self.arr[i]

    import moco
    frozen = tiles.copy()
    frozen.flags.writeable = False
    for arr, shared in ((tiles, True), (frozen, False)):
        ds = cdata.MultiViewDataset(Base(arr), [moco.augmentation("v2", 16)] * 2)
        ds.device_crop = ds.device_aug = True
        s = ds[2]
        assert np.array_equal(s["tile"].numpy(), tiles[2])
        assert (s["tile"].data_ptr() == arr[2].ctypes.data) == shared
        batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
        assert torch.equal(batch["tile"], torch.from_numpy(tiles))
