"""common.augment: the batched photometric executor (--device-aug) against torchvision's
functional ops per image, op by op and for every method's pipeline, on demo and real tiles; the
parameter sampler's distribution; the loader's two paths drawing the same numbers; every
pre-training script training with --device-aug, and exact resume with it."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import byol
import moco
import simclr
from common import augment as A
from common import data as cdata
from common.demo import DemoTiles
from tests.conftest import run_script
from tests.test_store import tiny_store  # noqa: F401 - the fixture the runs read


def pipelines(size=64, blur_kernel=None):
    """Every method's photometric description, as its augmentation() declares it."""
    b1, b2 = byol.augmentations(size, blur_kernel)
    return {"moco_v1": moco.augmentation("v1", size).photometric,
            "moco_v2": moco.augmentation("v2", size, blur_kernel).photometric,
            "simclr": simclr.augmentation("simclr", size, blur_kernel).photometric,
            "simclr_histo": simclr.augmentation("histo", size, blur_kernel).photometric,
            "byol_view1": b1.photometric, "byol_view2": b2.photometric}


@pytest.fixture(scope="module")
def demo_tiles():
    """(16, 3, 64, 64) uint8 demo tiles: tissue-like colours, edges and flat glass."""
    ds = DemoTiles(n=16, seed=0)
    return torch.stack([cdata.pil_to_uint8(ds[i][0].resize((64, 64))) for i in range(16)])


@pytest.fixture(scope="module")
def real_tiles():
    """The real NCT-CRC-HE tiles beside the repo at 224 px, each also transposed (the
    executor sees 2 distinct images per tile); None when ../shared is absent."""
    from tests.conftest import SHARED
    paths = cdata.find_images(SHARED / "samples" / "nct_crc_he")
    if not paths:
        return None
    x = torch.stack([cdata.pil_to_uint8(cdata.read_rgb(p).resize((224, 224))) for p in paths])
    return torch.cat([x, x.transpose(-1, -2)])


def tiles_for(source, demo_tiles, real_tiles):
    if source == "real":
        if real_tiles is None:
            pytest.skip("../shared/samples/nct_crc_he is absent")
        return real_tiles
    return demo_tiles


def params_for(ph, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([ph.sample(g) for _ in range(n)])


def max_level_diff(a, b):
    """Largest per-pixel difference in grey levels (uint8 images, or float in [0, 1])."""
    if a.is_floating_point():
        return float((a - b).abs().max()) * 255
    return int((a.int() - b.int()).abs().max())


# ----------------------------------------------------------------------------- op by op
def one_op(name, n, g):
    """(description, params) with only `name` applied, its factor drawn per sample, and the
    torchvision call per image that it must equal: fn(img, factor)."""
    p = torch.zeros(n, A.P, dtype=torch.float64)
    p[:, A.ORDER:A.ORDER + 4] = torch.arange(4).double()
    u = torch.rand(n, generator=g, dtype=torch.float64)
    jitter = {"brightness": (0, 0.6 + 0.8 * u, TF.adjust_brightness),
              "contrast": (1, 0.2 + 1.6 * u, TF.adjust_contrast),
              "saturation": (2, 1.6 * u, TF.adjust_saturation),
              "hue": (3, 0.9 * u - 0.45, TF.adjust_hue)}
    if name in jitter:
        k, f, fn = jitter[name]
        strengths = [0.0] * 4
        strengths[k] = 1.0
        p[:, A.JITTER], p[:, A.FACTOR + k] = 1, f
        ph = A.Photometric(jitter=tuple(strengths), jitter_p=1.0)
        return ph, p, lambda x, i: fn(x, float(f[i]))
    if name == "grey":
        p[:, A.GREY] = 1
        return A.Photometric(grey_p=1.0), p, lambda x, i: TF.rgb_to_grayscale(x, 3)
    if name == "blur":
        p[:, A.BLUR], p[:, A.SIGMA] = 1, 0.1 + 1.9 * u
        return (A.Photometric(blur_p=1.0, blur_kernel=23), p,
                lambda x, i: TF.gaussian_blur(x, [23, 23], [float(p[i, A.SIGMA])] * 2))
    assert name == "solarize"
    p[:, A.SOLARIZE] = 1
    thr = lambda x: 128 / 255 if x.is_floating_point() else 128  # noqa: E731
    return A.Photometric(solarize_p=1.0), p, lambda x, i: TF.solarize(x, thr(x))


OPS = ["brightness", "contrast", "saturation", "hue", "grey", "blur", "solarize"]
# The executor on every device this machine has, against torchvision per image on the CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["demo", "real"])
@pytest.mark.parametrize("name", OPS)
def test_each_op_alone_equals_torchvision_per_image(name, source, device, demo_tiles, real_tiles):
    x = tiles_for(source, demo_tiles, real_tiles)
    ph, p, reference = one_op(name, len(x), torch.Generator().manual_seed(OPS.index(name)))
    for img in (x, x.float() / 255):  # the uint8 batch from the loader, and float in [0, 1]
        got = ph.apply_batch(img.to(device), p.to(device)).cpu()
        want = torch.stack([reference(img[i], i) for i in range(len(img))])
        assert got.dtype == img.dtype and got.shape == img.shape
        assert max_level_diff(got, want) <= 1, name
        assert not torch.equal(got, img), name  # the op did something


def test_each_sample_gets_its_own_op_order(demo_tiles):
    """Brightness then contrast differs from contrast then brightness: one batch holding both
    orders must equal each sample's own order applied with torchvision."""
    x = demo_tiles[:8]
    ph = A.Photometric(jitter=(0.5, 0.5, 0.0, 0.0), jitter_p=1.0)
    p = torch.zeros(8, A.P, dtype=torch.float64)
    p[:, A.JITTER], p[:, A.FACTOR], p[:, A.FACTOR + 1] = 1, 1.4, 0.6
    p[:, A.ORDER:A.ORDER + 4] = torch.tensor([0., 1, 2, 3])
    p[4:, A.ORDER:A.ORDER + 4] = torch.tensor([1., 0, 2, 3])
    got = ph.apply_batch(x, p)
    bc = torch.stack([TF.adjust_contrast(TF.adjust_brightness(x[i], 1.4), 0.6) for i in range(4)])
    cb = torch.stack([TF.adjust_brightness(TF.adjust_contrast(x[i], 0.6), 1.4)
                      for i in range(4, 8)])
    assert max_level_diff(got[:4], bc) <= 1 and max_level_diff(got[4:], cb) <= 1
    assert max_level_diff(bc, torch.stack([TF.adjust_brightness(TF.adjust_contrast(x[i], 0.6), 1.4)
                                           for i in range(4)])) > 5  # the order matters here


# ----------------------------------------------------------------------------- whole pipelines
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["demo", "real"])
def test_every_method_pipeline_equals_torchvision_per_image(source, device, demo_tiles,
                                                            real_tiles):
    """Same per-sample parameters: the batched executor equals apply_cpu on the tensor, i.e.
    torchvision's functional tensor ops one image at a time, within one grey level (uint8) and
    1/255 (float), for each method's views (the device blur: the 23 px kernel either way)."""
    x = tiles_for(source, demo_tiles, real_tiles)
    for i, (name, ph) in enumerate(pipelines(x.shape[-1]).items()):
        p = params_for(ph, len(x), seed=i)
        for img in (x, x.float() / 255):
            got = ph.apply_batch(img.to(device), p.to(device)).cpu()
            want = torch.stack([ph.apply_cpu(img[j], p[j]) for j in range(len(x))])
            assert max_level_diff(got, want) <= 1, (name, img.dtype)
        assert (got - img).abs().mean() > 0.01, name  # the pipeline changed the images


def test_a_sample_does_not_depend_on_its_batch(demo_tiles):
    """Bit for bit: a sample's output is the same in the whole batch, in either half of it, or
    alone, so 1 and 2 processes (each with its part of the global batch) see the same pixels."""
    for name, ph in pipelines().items():
        p = params_for(ph, len(demo_tiles), seed=5)
        for x in (demo_tiles, demo_tiles.float() / 255):
            full = ph.apply_batch(x, p)
            assert torch.equal(full, torch.cat([ph.apply_batch(x[:7], p[:7]),
                                                ph.apply_batch(x[7:], p[7:])])), name
            assert torch.equal(full[3:4], ph.apply_batch(x[3:4], p[3:4])), name


def test_apply_batch_keeps_device_and_leaves_its_input_alone(demo_tiles):
    ph = pipelines()["byol_view2"]
    x = demo_tiles.clone()
    out = ph.apply_batch(x, params_for(ph, len(x), 0))
    assert torch.equal(x, demo_tiles) and out.device == x.device and out.dtype == torch.uint8


# ----------------------------------------------------------------------------- the sampler
def test_sampler_honours_the_probabilities_ranges_and_draws_a_permutation():
    n = 2000
    for name, ph in pipelines().items():
        p = params_for(ph, n, seed=1)
        sd = lambda q: 4 * math.sqrt(q * (1 - q) / n) + 1e-9  # noqa: E731 - 4 standard errors
        for col, q in ((A.JITTER, ph.jitter_p), (A.GREY, ph.grey_p), (A.BLUR, ph.blur_p),
                       (A.SOLARIZE, ph.solarize_p)):
            assert abs(p[:, col].mean().item() - q) <= sd(q), (name, col)
        order = p[:, A.ORDER:A.ORDER + 4].long()
        assert (order.sort(1).values == torch.arange(4)).all(), name  # always a permutation
        perms = {tuple(o) for o in order.tolist()}
        assert len(perms) == 24, name  # all 24 orders occur (each ~83 times)
        first = torch.bincount(order[:, 0], minlength=4).double() / n
        assert (first - 0.25).abs().max() < 0.04, name  # each op comes first a quarter of the time
        for k, (lo, hi) in enumerate(ph.ranges()):
            f = p[:, A.FACTOR + k]
            assert lo <= f.min() and f.max() <= hi
            assert abs(f.mean() - (lo + hi) / 2) < 0.03 * (hi - lo), (name, k)
        s = p[:, A.SIGMA]
        assert 0.1 <= s.min() and s.max() <= 2.0 and abs(s.mean() - 1.05) < 0.05
    # MoCo v1 jitters every image; a seeded generator gives the same draws again
    assert (params_for(pipelines()["moco_v1"], 200, 3)[:, A.JITTER] == 1).all()
    byol2 = pipelines()["byol_view2"]
    assert torch.equal(params_for(byol2, 5, 7), params_for(byol2, 5, 7))


# ----------------------------------------------------------------------------- the loader
def test_both_paths_draw_the_same_numbers_and_agree_on_the_pixels():
    """One dataset, --device-aug off and on: the same crops, flips and parameters (a function
    of seed, epoch, index alone, with 0 or 2 workers); the device path's images, once its ops
    ran, differ from the CPU path's (PIL's jitter ops) by under a grey level on average (0.4-0.5 on
    real tiles, 99% of pixels within 3)."""
    base = DemoTiles(n=8, seed=1)
    views = byol.augmentations(64, blur_kernel=23)  # the exact kernel on both paths
    ds = cdata.MultiViewDataset(base, views, seed=4)
    ds.set_epoch(2)
    cpu = [ds[i] for i in range(8)]
    aug = A.DeviceAugment(ds, torch.device("cpu"))
    assert ds.device_aug
    loaded = {w: list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=w)) for w in (0, 2)}
    for b0, b2 in zip(loaded[0], loaded[2]):
        assert all(torch.equal(x, y) for x, y in zip(b0["photo"], b2["photo"]))
        assert all(torch.equal(x, y) for x, y in zip(b0["views"], b2["views"]))
    diffs = []
    for b, batch in enumerate(loaded[0]):
        dev = aug(batch)
        for v in range(2):
            want = torch.stack([cpu[4 * b + j]["views"][v] for j in range(4)])
            boxes = torch.stack([cpu[4 * b + j]["boxes"][v] for j in range(4)])
            assert torch.equal(batch["boxes"][v], boxes)
            assert batch["flips"][v].tolist() == [cpu[4 * b + j]["flips"][v] for j in range(4)]
            diffs.append((dev[v].float() - want.float()).abs().mean().item())
    assert max(diffs) < 1.5, diffs  # PIL's jitter rounds where torchvision truncates, hue in 8 bits


def test_pixcon_overlap_views_draw_the_same_numbers_on_both_paths():
    import pixcon
    from torch.utils.data import default_collate
    ops = [v.photometric for v in byol.augmentations(64, blur_kernel=23)]
    ds = pixcon.OverlapViews(DemoTiles(n=4, seed=2), 64, ops, seed=1)
    cpu = [ds[i] for i in range(4)]
    aug = A.DeviceAugment(ds, torch.device("cpu"))
    batch = default_collate([ds[i] for i in range(4)])
    out = aug(batch)
    for v in range(2):
        assert torch.equal(batch["boxes"][v], torch.stack([c["boxes"][v] for c in cpu]))
        want = torch.stack([c["views"][v] for c in cpu]).float()
        assert (out[v].float() - want).abs().mean() < 1.5


def test_device_aug_refuses_views_it_cannot_run():
    """One clear line (main_guard) instead of a loader that silently applies the ops anyway."""
    base = DemoTiles(n=4, seed=0)
    with pytest.raises(cdata.DataError, match="not a common.augment.Photometric"):
        views = [cdata.View(32, (0.2, 1), photometric=TF.hflip)]
        A.DeviceAugment(cdata.MultiViewDataset(base, views), torch.device("cpu"))
    with pytest.raises(cdata.DataError, match="builds its views itself"):
        A.DeviceAugment(cdata.MultiViewDataset(base, []), torch.device("cpu"))


# ----------------------------------------------------------------------------- runs
TINY = ["--batch-size", "8", "--img-size", "64", "--workers", "1", "--epochs", "1",
        "--knn-every", "0", "--device-aug"]  # reading test_store's tiny store (16 demo tiles)
# One run per kind of dataset and view list: a plain MultiViewDataset with MoCo v2's views
# (moco, densecl, pcl) is the resume test below; these add geometric ops in the worker (histo),
# two descriptions with solarize (byol), a dataset subclass adding a reference view (concl) or
# masks through the boxes (detcon), 2S views of two descriptions (mcl), and a dataset
# that draws its views itself and lists its descriptions in `photometrics` (pixcon).
SCRIPTS = {"simclr_histo": ["simclr.py", "--aug", "histo", "--warmup-epochs", "0"],
           "byol": ["byol.py"],
           "concl": ["concl.py", "--queue-size", "16", "--warmup-epochs", "0", "--concept", "grid"],
           "detcon_b": ["detcon.py", "--variant", "B", "--masks", "grid", "--grid-size", "2"],
           "mcl": ["mcl.py", "--batch-size", "16", "--warmup-epochs", "0"],
           "pixcon": ["pixcon.py", "--queue-size", "16"]}  # its own overlapping views


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_pretraining_script_trains_with_device_aug_from_a_store(name, tmp_path, tiny_store):
    script, *flags = SCRIPTS[name]
    argv = TINY + ["--data-store", tiny_store[1]] + flags  # later flags win: mcl's batch of 16
    run_script(script, *argv, "--output-dir", tmp_path)
    assert (tmp_path / "backbone.pth").exists()


def test_moco_v2_with_device_crop_equals_the_files_and_resumes_bit_identical(tmp_path, tiny_store):
    """From the files with --device-aug (Pillow crops in the loader) and from the store with
    --device-crop (the float64 crop on the device), stopped mid-epoch and resumed: the same
    backbone bit for bit."""
    src, packed = tiny_store
    flags = ["moco.py", *TINY, "--epochs", "2", "--queue-size", "16"]  # 2 steps an epoch
    run_script(*flags, "--data", "folder", "--data-root", src, "--output-dir", tmp_path / "ref")
    flags += ["--data-store", packed, "--device-crop"]
    run_script(*flags, "--output-dir", tmp_path / "cut", "--stop-after-steps", "3")  # mid-epoch
    run_script(*flags, "--output-dir", tmp_path / "cut")
    a, b = (torch.load(tmp_path / d / "backbone.pth", map_location="cpu") for d in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.isfinite([v.float().sum().item() for v in a.values()]).all()
