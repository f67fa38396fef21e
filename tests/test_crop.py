"""common.crop: the device crop against Pillow's own crop + resize (RandomResizedCrop's path: a
box, then resize), bilinear and bicubic at 224 / 112 / 64 px, boxes that shrink and that
enlarge, integer and fractional, with flips; label maps through Pillow's nearest neighbour."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from common import crop
from common import data as cdata
from common.demo import DemoTiles
from tests.conftest import REPO

SIZES = (224, 112, 64)
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def pil_views(images, boxes, flips, size, resample):
    out = []
    for im, b, f in zip(images, boxes, flips):
        v = im.resize((size, size), resample, box=tuple(b))
        out.append(cdata.pil_to_uint8(v.transpose(Image.FLIP_LEFT_RIGHT) if f else v))
    return torch.stack(out)


def tiles_and_boxes(images, seed, n_draws=3):
    """Each image n_draws times with RandomResizedCrop's boxes (scale 0.02-1: small boxes
    enlarge), every other box shifted by a fraction of a pixel, and random flips."""
    g = torch.Generator().manual_seed(seed)
    ims, boxes, flips = [], [], []
    for k in range(n_draws):
        for im in images:
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
            top, left, h, w = T.RandomResizedCrop.get_params(im, (0.02, 1.0), (3 / 4, 4 / 3))
            shift = 0.37 * (k % 2) * (left > 0 and top > 0)
            boxes.append((left - shift, top - shift, left + w - shift, top + h))
            flips.append(bool(torch.rand(1, generator=g) < 0.5))
            ims.append(im)
    tiles = torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in ims])
    return ims, tiles, torch.tensor(boxes, dtype=torch.float64), torch.tensor(flips)


@pytest.fixture(scope="module")
def images():
    """Demo tiles (tissue-like colours and edges), uniform noise (every rounding case), both
    non-square (96 x 80), and the real NCT tiles beside the repo when present (224 px)."""
    from tests.conftest import SHARED
    rng = np.random.default_rng(0)
    ims = [DemoTiles(n=3, seed=5)[i][0].resize((96, 80)) for i in range(3)]
    ims += [Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)) for _ in range(2)]
    real = [cdata.read_rgb(p) for p in cdata.find_images(SHARED / "samples" / "nct_crc_he")]
    return {"small": ims, "real": [im for im in real if im.size == (224, 224)]}


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("size", SIZES)
def test_float64_equals_pillow_and_float32_is_within_two_grey_levels(images, name, size):
    for group, seed in (("small", size), ("real", size + 1)):
        if not images[group]:
            continue
        ims, tiles, boxes, flips = tiles_and_boxes(images[group], seed)
        want = pil_views(ims, boxes.tolist(), flips.tolist(), size, FILTERS[name])
        got = crop.resize_crop(tiles, boxes, size, FILTERS[name], flips)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        assert torch.equal(got, want), (group, (got.int() - want.int()).abs().max())
        f32 = crop.resize_crop(tiles, boxes, size, FILTERS[name], flips, dtype=torch.float32)
        d = (f32.int() - want.int()).abs()
        assert d.max() <= 2 and d.float().mean() < 0.02, (group, d.max(), d.float().mean())


def test_without_pillows_antialiasing_a_downscale_differs():
    """The test above can fail: a plain bilinear sample (no widened support) is what
    roi_align / grid_sample would give, and it is far from Pillow's when shrinking."""
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    want = cdata.pil_to_uint8(im.resize((16, 16), Image.BILINEAR, box=(0, 0, 96, 96)))
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].double()
    plain = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=False)
    assert (plain[0].round() - want.double()).abs().max() > 20
    got = crop.resize_crop(torch.from_numpy(np.asarray(im).copy())[None],
                           torch.tensor([[0, 0, 96, 96]]), 16)
    assert torch.equal(got[0], want)


def test_weights_are_pillows_fixed_point_and_sum_to_one():
    w = crop.pillow_weights(100, torch.tensor([3.0]), torch.tensor([91.0]), 64, Image.BICUBIC)
    q = w * 2**22
    assert torch.equal(q, q.round())                                 # 22-bit fixed point
    assert (w.sum(-1) - 1).abs().max() < 64 / 2**22                  # normalised before rounding
    assert (w < 0).any()                                             # bicubic's negative lobes


@pytest.mark.parametrize("size", SIZES + (7,))
def test_label_maps_equal_pillows_nearest(size):
    """Nearest neighbour with Pillow's index arithmetic (accumulated float64 positions): no
    mismatched pixel, fractional and integer boxes, shrinking and enlarging, with flips."""
    rng = np.random.default_rng(size)
    maps, boxes, flips = [], [], []
    for k in range(24):
        maps.append(rng.integers(0, 5000, (90, 70)).astype(np.int32))
        x0, y0 = rng.uniform(0, 60), rng.uniform(0, 80)
        b = (x0, y0, rng.uniform(x0 + 1, 70), rng.uniform(y0 + 1, 90))
        boxes.append(tuple(map(round, b)) if k % 2 else b)
        flips.append(bool(k % 3 == 0))
    want = []
    for m, b, f in zip(maps, boxes, flips):
        v = Image.fromarray(m).resize((size, size), Image.NEAREST, box=b)
        want.append(np.asarray(v.transpose(Image.FLIP_LEFT_RIGHT) if f else v))
    got = crop.nearest_crop(torch.from_numpy(np.stack(maps)), torch.tensor(boxes), size,
                            torch.tensor(flips))
    assert got.dtype == torch.int32
    assert (got.numpy() != np.stack(want)).sum() == 0


def test_gpu_check_crop_cpu_mode_passes_and_catches_a_wrong_crop(tmp_path, monkeypatch, capsys):
    """scripts/gpu_check_crop.py --cpu (the GPU check's crop part on the CPU): every check ok,
    the numbers written; with the weights' rounding broken (a half-level bias) it says FAIL and
    exits 1."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("gpu_check_crop",
                                                  REPO / "scripts" / "gpu_check_crop.py")
    gcc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gcc)
    assert gcc.main(["--cpu", "--n", "3", "--json", str(tmp_path / "c.json")]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["crop"]["64 bilinear float64"] == [0.0, 0] and res["photometric"][1] <= 1
    assert res["ops"]["d2h"] == 0 and res["ops"]["kernels"] > 0
    assert "all checks passed" in capsys.readouterr().out
    real = crop._pass
    monkeypatch.setattr(crop, "_pass", lambda w, x: real(w, x + 0.6))
    assert gcc.main(["--cpu", "--n", "2"]) == 1
    assert "FAIL crop 64 bilinear float64" in capsys.readouterr().out
