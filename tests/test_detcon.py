"""DetCon: masks through the views' geometry, pooling, sampling, the loss by hand and across two
processes, and tiny runs of both variants (fh and grid masks, one and two processes, resume)."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import byol
import detcon
import simclr
from common import augment as A
from common import data as cdata
from common import dist as cdist
from tests.conftest import free_port, run_script
from tests.test_masks import fh_store  # noqa: F401 - 16 tiles, FH maps packed at 50 / 50
from tests.test_store import tiny_store  # noqa: F401 - the same 16 tiles, nothing packed


# ----------------------------------------------------------------------------- geometry
def test_masks_follow_the_view_through_crop_and_flip():
    """A tile whose colours encode position (R = x, G = y) and a label map of 8 x 8 blocks: every
    pixel of a view decodes to the source pixel it shows, whose label the view's mask must hold."""
    H, W = 64, 96
    y, x = np.mgrid[:H, :W]
    tile = Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))
    full = (y // 8) * 100 + x // 8
    view = cdata.View(48, scale=(0.1, 1.0), interpolation=Image.NEAREST)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        img, box, flip = view(tile)
        flips.add(flip)
        src_x, src_y = img[0].long().numpy(), img[1].long().numpy()
        expect = full[src_y, src_x]
        assert np.array_equal(detcon.view_masks(full, [box], [flip], 48)[0], expect), seed
    assert flips == {True, False}


def test_cell_labels_against_a_brute_force_count():
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 4, (8, 8), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
    mask = torch.where(torch.rand(32, 32, generator=g) < 0.3, torch.randint(0, 6, (32, 32), generator=g), mask)
    got = detcon.cell_labels(mask, 4)                                  # 4 x 4 cells of 8 x 8 px
    for r in range(4):
        for c in range(4):
            counts = [int((mask[8 * r:8 * r + 8, 8 * c:8 * c + 8] == k).sum()) for k in range(6)]
            assert got[r * 4 + c] == counts.index(max(counts))         # ties: the lowest id
    assert torch.equal(detcon.cell_labels(torch.zeros(32, 32, dtype=torch.long), 4), torch.zeros(16, dtype=torch.long))
    both = detcon.cell_labels(torch.stack([mask, mask.T + 7]), 4)     # views at once: the same
    assert torch.equal(both[0], got) and torch.equal(both[1], detcon.cell_labels(mask.T + 7, 4))


def test_view_masks_are_pillows_nearest_resize_on_any_box():
    """Pillow's own resize(NEAREST, box) of the label map, fractional boxes and non-square tiles
    included (the loader's gathers replace it: common.crop's index arithmetic)."""
    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = rng.integers(20, 120, 2)
        full = rng.integers(0, 30, (h, w)).astype(np.int32)
        (x0, x1), (y0, y1) = np.sort(rng.uniform(0, w, 2)), np.sort(rng.uniform(0, h, 2))
        box, size, flip = (x0, y0, x1 + 1e-3, y1 + 1e-3), int(rng.choice([16, 48, 64])), t % 2 == 1
        want = np.asarray(Image.fromarray(full).resize((size, size), Image.NEAREST, box=box))
        got = detcon.view_masks(full, [torch.tensor(box), torch.tensor(box)], [flip, False], size)
        assert np.array_equal(got[0], want[:, ::-1] if flip else want), t
        assert np.array_equal(got[1], want), t


def test_sampling_only_among_present_masks_uniformly():
    cells = torch.tensor([3, 3, 3, 3, 3, 3, 0, 7, 7])                  # ids 1, 2, 4, 5, 6 absent
    torch.manual_seed(0)
    ids = torch.stack([detcon.sample_masks(cells, 16) for _ in range(300)])
    assert set(ids.unique().tolist()) == {0, 3, 7}
    freq = torch.bincount(ids.flatten(), minlength=8)[[0, 3, 7]] / ids.numel()
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03)   # uniform, not by area


def test_mask_pool_is_the_mean_of_each_masks_cells():
    feat = torch.arange(2 * 3 * 4, dtype=torch.float).view(2, 3, 4)
    cells = torch.tensor([[0, 0, 1, 2], [5, 5, 5, 5]])
    ids = torch.tensor([[1, 0], [5, 9]])                               # id 9 absent: zeros
    out = detcon.mask_pool(feat, cells, ids)
    torch.testing.assert_close(out[0, 0], feat[0, :, 2])
    torch.testing.assert_close(out[0, 1], feat[0, :, :2].mean(1))
    torch.testing.assert_close(out[1, 0], feat[1].mean(1))
    assert out[1, 1].abs().sum() == 0


def test_online_and_target_use_the_same_draw(monkeypatch):
    """At init the target is an exact copy of the online network: with the same draws its
    projections equal the online projections row for row (another draw would not)."""
    args = detcon.get_args(["--variant", "B", "--dim", "8", "--hidden-dim", "16"])
    torch.manual_seed(0)
    model = detcon.DetConB(args)
    x1, x2 = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    cells = [torch.randint(0, 3, (4, 4)) for _ in range(2)]
    ids = [torch.stack([detcon.sample_masks(c, 16) for c in cv]) for cv in cells]
    seen = {}
    monkeypatch.setattr(detcon, "detcon_loss", lambda *a, **k: seen.update(a=a) or (a[0].sum(), {}))
    model(x1, x2, cells, ids)
    p1, p2, _, _, _, z1, z2 = seen["a"]
    y1 = model.online[1](detcon.pooled(model.online[0], x1, cells[0], ids[0])).view(4, 16, -1)
    torch.testing.assert_close(z1, y1.detach())
    assert not z1.requires_grad and p1.requires_grad


# ----------------------------------------------------------------------------- the loss
def reference_loss(a1, a2, ids1, ids2, T, t1=None, t2=None):
    """docs/methods.md 5.4 written out row by row in plain Python."""
    t1, t2 = (a1 if t1 is None else t1), (a2 if t2 is None else t2)
    a1, a2, t1, t2 = (F.normalize(x, dim=-1).tolist() for x in (a1, a2, t1, t2))
    ids1, ids2 = ids1.tolist(), ids2.tolist()
    N, M = len(ids1), len(ids1[0])
    dot = lambda u, v: sum(p * q for p, q in zip(u, v)) / T  # noqa: E731
    total = 0.0
    for a, t_o, t_s, ia, io in ((a1, t2, t1, ids1, ids2), (a2, t1, t2, ids2, ids1)):
        for i in range(N):
            for r in range(M):
                logits, labels = [], []
                for j in range(N):
                    for s in range(M):
                        logits.append(dot(a[i][r], t_o[j][s]))
                        labels.append(float(i == j and ia[i][r] == io[j][s]))
                for j in range(N):
                    for s in range(M):
                        if not (i == j and ia[i][r] == ia[j][s]):
                            logits.append(dot(a[i][r], t_s[j][s]))
                            labels.append(0.0)
                npos = sum(labels)
                if npos == 0:
                    continue  # weight 0, still counted in the mean
                lse = math.log(sum(math.exp(v) for v in logits))
                ce = -sum(lab * (v - lse) for lab, v in zip(labels, logits)) / npos
                total += ce / ia[i].count(ia[i][r]) / (N * M)
    return total / 2


def test_detcon_loss_by_hand_on_two_images():
    """2 images x 2 masks, 2-d vectors. Image 0 draws ids (0, 1) / (1, 1); image 1 draws (4, 4)
    / (5, 4): a duplicated id in each view and an unpaired row (id 0 in view 1, 5 in view 2)."""
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    a1 = torch.tensor([[e0, e1], [e1, e1]])
    a2 = torch.tensor([[e1, e1], [e0, e1]])
    ids1, ids2 = torch.tensor([[0, 1], [4, 4]]), torch.tensor([[1, 1], [5, 4]])
    T = 0.5
    E = math.exp
    # view 1 rows (the other view's rows first, then the same view's with itself and duplicates
    # removed); cosines are 1 between equal unit vectors, else 0.
    # (0,0)=e0, id 0: no partner in view 2 -> weight 0.
    # (0,1)=e1, id 1: partners view2 (0,0), (0,1), both e1: label 1/2 each; candidates view 2:
    #   e1 e1 e0 e1 -> 1 1 0 1; view 1 minus itself: (0,0) e0 -> 0, (1,0) e1 -> 1, (1,1) e1 -> 1
    d01 = 2 * E(2) + E(0) + E(2) + E(0) + E(2) + E(2)
    l01 = -(0.5 * (2 - math.log(d01)) + 0.5 * (2 - math.log(d01)))
    # (1,0)=e1, id 4 (drawn twice: weight 1/2), partner view2 (1,1)=e1; view 1 minus both id-4
    # rows of image 1: (0,0) e0, (0,1) e1
    d14 = E(2) + E(2) + E(0) + E(2) + E(0) + E(2)
    l14 = -(2 - math.log(d14))
    view1 = (0 + l01 + 0.5 * l14 + 0.5 * l14) / 4
    # view 2 rows: (0,0)=e1 and (0,1)=e1, id 1 twice (weight 1/2 each), partner view1 (0,1)=e1;
    #   candidates view 1: e0 e1 e1 e1 -> 0 1 1 1; view 2 minus image 0's id-1 rows: (1,0) e0,
    #   (1,1) e1
    d2 = E(0) + 3 * E(2) + E(0) + E(2)
    l2 = -(2 - math.log(d2))
    # (1,0)=e0, id 5: unpaired. (1,1)=e1, id 4: partners view1 (1,0), (1,1) (both e1), label 1/2
    # each; candidates view 1: 0 1 1 1; view 2 minus itself: e1 e1 e0 -> 1 1 0
    d24 = E(0) + 3 * E(2) + 2 * E(2) + E(0)
    l24 = -(2 - math.log(d24))
    view2 = (0.5 * l2 + 0.5 * l2 + 0 + l24) / 4
    expected = (view1 + view2) / 2
    got = detcon.detcon_loss(a1, a2, ids1, ids2, T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert reference_loss(a1, a2, ids1, ids2, T) == pytest.approx(expected, rel=1e-9)


def test_detcon_loss_matches_brute_force_with_targets_and_nt_xent_with_one_mask():
    torch.manual_seed(0)
    a1, a2, t1, t2 = (torch.randn(3, 5, 4) for _ in range(4))
    ids1, ids2 = torch.randint(0, 4, (3, 5)), torch.randint(0, 4, (3, 5))
    assert detcon.detcon_loss(a1, a2, ids1, ids2, 0.1, t1, t2).item() == pytest.approx(
        reference_loss(a1, a2, ids1, ids2, 0.1, t1, t2), rel=1e-5)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    one = torch.zeros(6, 1, dtype=torch.long)
    torch.testing.assert_close(detcon.detcon_loss(z1[:, None], z2[:, None], one, one, 0.1),
                               simclr.nt_xent(z1, z2, 0.1))
    # acc / paired: distinct one-hot rows, the same in both views -> every row finds its partner;
    # view 2 drops image 0's mask 1 for a mask view 1 lacks -> 1 of 8 rows per view unpaired
    e = torch.eye(8).view(4, 2, 8)
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    ids2 = ids.clone()
    ids2[0, 1] = 5
    _, stats = detcon.detcon_loss(e, e, ids, ids2, 0.1, return_stats=True)
    assert stats["acc"].item() == 100 and stats["paired"].item() == pytest.approx(14 / 16)


def _worker(rank, world, port, z1, z2, ids1, ids2, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cdist.init_distributed()
    n = z1.shape[0] // world
    part = slice(rank * n, (rank + 1) * n)
    a, b = z1[part].clone().requires_grad_(), z2[part].clone().requires_grad_()
    loss = detcon.detcon_loss(a, b, ids1[part], ids2[part], 0.1)
    loss.backward()
    results.put((rank, loss.item(), a.grad.tolist(), b.grad.tolist()))
    cdist.cleanup()


def test_two_processes_equal_one_process_on_the_whole_batch_for_S():
    torch.manual_seed(1)
    z1, z2 = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    ids1, ids2 = torch.randint(0, 3, (4, 3)), torch.randint(0, 3, (4, 3))
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(2, free_port(), z1, z2, ids1, ids2, results), nprocs=2,
                       start_method="spawn")
    got = sorted(results.get() for _ in range(2))
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = detcon.detcon_loss(a, b, ids1, ids2, 0.1)
    full.backward()
    # DDP averages over ranks; each rank's gradient holds both ranks' terms (all-reducing gather)
    assert (got[0][1] + got[1][1]) / 2 == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(torch.tensor(got[0][2] + got[1][2]) / 2, a.grad)
    torch.testing.assert_close(torch.tensor(got[0][3] + got[1][3]) / 2, b.grad)


# ----------------------------------------------------------------------------- runs
TINY = ["--data", "demo", "--demo-size", "24", "--batch-size", "8", "--img-size", "64",
        "--workers", "1", "--epochs", "2", "--warmup-epochs", "1", "--knn-every", "0"]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_store):
    """DetCon_B with FH masks (one cache), one process, 2 epochs of 2 steps, from the files
    with --device-aug; the flags that train from the store with --device-crop instead."""
    tmp = tmp_path_factory.mktemp("detcon")
    cmd = ["detcon.py", *TINY[4:], "--device-aug", "--fh-scale", "100", "--fh-min-size", "50",
           "--mask-cache", tmp / "cache"]
    run_script(*cmd, "--data", "folder", "--data-root", tiny_store[0], "--output-dir", tmp / "ref")
    return tmp, cmd + ["--data-store", tiny_store[1], "--device-crop"]


def test_b_fh_run_writes_contract_files_and_hits_the_cache(reference):
    tmp, _ = reference
    out = tmp / "ref"
    assert {"args.json", "backbone.pth", "checkpoint.pth", "log.jsonl", "masks.png"} <= \
        {p.name for p in out.iterdir()}
    rows = log(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["loss"]) and 0 < r["paired"] <= 1 for r in rows)
    # epoch 0 computed what masks.png had not; epoch 1 found every map in the cache
    assert rows[0]["masks_computed"] > 0 and rows[1]["masks_computed"] == 0
    assert len(list((tmp / "cache").rglob("*.png"))) == 16
    w, h = Image.open(out / "masks.png").size  # 6 columns of 160 px, 8 rows, title and notes
    assert w == 8 + 6 * (160 + 8) and h > 8 * 160
    assert all(1 <= r["masks_per_view"] <= 4 for r in rows)  # masks owning a cell of the 2x2 grid
    assert rows[0]["chance_loss"] == pytest.approx(math.log(2 * 8 * 16 - 1))


def test_kill_and_resume_is_bit_identical_and_a_second_run_computes_no_mask(reference):
    """From the store with --device-crop, killed mid-epoch and resumed: the files' run's log
    numbers and weights bit for bit, with its cache (the same keys: paths under the root)."""
    tmp, cmd = reference
    p = run_script(*cmd, "--output-dir", tmp / "cut", "--stop-after-steps", "3", "--vis-tiles", "0")
    assert "stopped by --stop-after-steps" in p.stdout
    assert log(tmp / "cut")[0]["masks_computed"] == 0  # the first run's cache: no FH call
    p = run_script(*cmd, "--output-dir", tmp / "cut", "--vis-tiles", "0")
    assert "resumed from" in p.stdout
    a, b = (torch.load(tmp / d / "checkpoint.pth", weights_only=False)["model"] for d in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("loss", "acc", "paired", "masks_per_view", "m")
    assert [[r[k] for k in keys] for r in log(tmp / "ref")] == [[r[k] for k in keys]
                                                                for r in log(tmp / "cut")]


@pytest.mark.parametrize("variant,masks,nproc", [("S", "grid", 2), ("B", "grid", 2), ("S", "fh", 1)])
def test_tiny_runs(tmp_path, variant, masks, nproc, tiny_store):
    crop = ["--data-store", tiny_store[1], "--device-crop"] if variant == "B" else []  # 2 procs
    run_script("detcon.py", *TINY, "--epochs", "1", "--batch-size", str(8 // nproc), "--variant",
               variant, "--masks", masks, "--grid-size", "2", "--fh-scale", "100", "--fh-min-size",
               "50", "--vis-tiles", "0", "--output-dir", tmp_path, *crop, nproc=nproc)
    row = log(tmp_path)[0]
    assert np.isfinite(row["loss"]) and row["paired"] > 0 and ("m" in row) == (variant == "B")
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["dim"] == (128 if variant == "S" else 256)
    assert args["lr"] == (simclr if variant == "S" else byol).get_args([]).lr


def test_variant_defaults_are_the_parents_nct_recipes():
    """docs/methods.md 5.6: DetCon_S trains with simclr.py's recipe, DetCon_B with byol.py's (issue
    22.1: they were 2x and 4x the parents' lr); the released rates stay one flag away."""
    for variant, parent in (("S", simclr), ("B", byol)):
        got, want = detcon.get_args(["--variant", variant]), parent.get_args([])
        assert got.paper_batch == want.paper_batch == 1024
        for key in ("lr", "weight_decay", "warmup_epochs", "dim"):
            assert getattr(got, key) == getattr(want, key), (variant, key)
    assert detcon.get_args(["--variant", "S", "--lr", "1.2"]).lr == 1.2


def test_bad_input_is_one_clear_line(tmp_path):
    p = run_script("detcon.py", *TINY, "--masks", "grid", "--grid-size", "3", "--output-dir",
                   tmp_path / "a", check=False)
    assert p.returncode == 2 and "--grid-size 3: 9 masks do not fit the 2 x 2 C5 grid" in p.stderr
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(8):
        Image.fromarray(np.full((64, 64, 3), 30 * i, np.uint8)).save(imgs / f"t{i}.png")
    (tmp_path / "m").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "m" / "t0.png")
    common = ["detcon.py", *TINY[4:], "--data", "folder", "--data-root", imgs, "--workers", "0",
              "--masks", "file", "--mask-dir", tmp_path / "m", "--output-dir", tmp_path / "b"]
    p = run_script(*common, check=False)  # masks.png reads t0 first: the wrong size
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert p.stderr.startswith("error: ") and "t0.png: mask (32, 32) != image (64, 64)" in p.stderr
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "m" / "t0.png")
    p = run_script(*common, check=False)  # then t1's map is missing
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "--mask-dir: cannot read" in p.stderr and "t1.png" in p.stderr


def test_rgb_mask_files_tell_colours_apart_by_all_three_channels(tmp_path):
    """Issue 24.11: colours sharing their red value stay two masks (only channel 0 was read)."""
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[:, :4] = (200, 0, 0)
    rgb[:, 4:8] = (200, 100, 0)                                   # same red, other green
    rgb[:4, 8:] = (200, 100, 50)                                  # same red and green, other blue
    Image.fromarray(rgb).save(tmp_path / "m.png")
    ids = detcon.read_mask_file(tmp_path / "m.png", (12, 8))
    assert len(np.unique(ids)) == 4                               # three colours and black
    blocks = [ids[:, :4], ids[:, 4:8], ids[:4, 8:], ids[4:, 8:]]
    assert all(len(np.unique(b)) == 1 for b in blocks)
    assert len({int(b[0, 0]) for b in blocks}) == 4
    Image.fromarray(np.full((8, 12), 7, np.uint8)).save(tmp_path / "g.png")  # grey: one mask
    assert (detcon.read_mask_file(tmp_path / "g.png", (12, 8)) == 0).all()
    with pytest.raises(cdata.DataError, match=r"mask \(12, 8\) != image \(8, 8\)"):
        detcon.read_mask_file(tmp_path / "g.png", (8, 8))


# ----------------------------------------------------------------------------- --device-crop (issue 25)
@pytest.mark.parametrize("masks", ["fh", "grid"])
def test_device_crop_gives_the_files_masks_draws_and_picture(masks, fh_store, tmp_path):
    """From the store (--device-crop: FH maps read from its pack) and from the files
    (--device-aug, FH computed into a cache): the same boxes, flips, photometric numbers, C5
    cells and mask draws; the views cropped on the device equal the loader's Pillow crops, and
    masks.png is the same picture."""
    src, store = fh_store
    flags = ["--img-size", "64", "--masks", masks, "--fh-scale", "50", "--fh-min-size", "50",
             "--grid-size", "2"]
    got = []
    for where in (["--data", "folder", "--data-root", str(src), "--device-aug"],
                  ["--data-store", str(store), "--device-crop"]):
        a = detcon.get_args([*where, *flags, "--output-dir", str(tmp_path / where[0][2:])])
        ds = detcon.MaskViews(cdata.build_dataset(a), byol.augmentations(64), 0, a)
        aug = A.DeviceAugment(ds, torch.device("cpu"))
        ds.set_epoch(1)
        batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
        got.append((batch, aug, detcon.save_masks(ds, range(2), tmp_path / f"{where[0][2:]}.png")))
    (fb, _, fpng), (sb, aug, spng) = got
    assert "views" not in sb and sb["tile"].shape == (8, 64, 64, 3)
    for k in ("boxes", "flips", "photo", "cells", "ids"):
        assert all(torch.equal(x, y) for x, y in zip(fb[k], sb[k])), k
    assert torch.equal(fb["masks_per_view"], sb["masks_per_view"])
    assert all(torch.equal(x, y) for x, y in zip(fb["views"], aug.views(sb)))  # crops, no colour
    assert np.array_equal(np.asarray(Image.open(fpng)), np.asarray(Image.open(spng)))
    assert max(len(c.unique()) for c in sb["cells"][0]) > 1       # more than one mask: a real test
    if masks == "fh":  # the files' run computed its maps, the store's read them from its pack
        assert fb["masks_computed"].all() and not sb["masks_computed"].any()
        assert not (tmp_path / "data-store" / "masks").exists()
