"""PixCon's pieces against known geometry, hand-computed weights and brute force, and its runs."""
import contextlib
import copy
import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image

import pixcon
from common import data as cdata
from common import train as ctrain
from common.models import resnet_maps
from tests.conftest import run_script
from tests.test_store import tiny_store  # noqa: F401 - the 16 tiles and their store


# ----------------------------------------------------------------------------- views
def test_intersection_boxes_and_masks_on_known_crops():
    # crop a = x 0..100, y 0..100; crop b = x 50..150, y 20..120: they share x 50..100, y 20..100
    a, b = torch.tensor([[0.0, 0, 100, 100]]), torch.tensor([[50.0, 20, 150, 120]])
    for fa, fb, ea, eb in [(False, False, [0.5, 0.2, 1.0, 1.0], [0.0, 0.0, 0.5, 0.8]),
                           (True, False, [0.0, 0.2, 0.5, 1.0], [0.0, 0.0, 0.5, 0.8]),
                           (False, True, [0.5, 0.2, 1.0, 1.0], [0.5, 0.0, 1.0, 0.8])]:
        ia, ib = pixcon.intersection_boxes(a, b, torch.tensor([fa]), torch.tensor([fb]))
        torch.testing.assert_close(ia, torch.tensor([ea]))
        torch.testing.assert_close(ib, torch.tensor([eb]))
    # 7x7 masks, rows floor(7 y1) .. floor(7 y2), columns floor(7 x1) .. floor(7 x2), ends out
    ia, ib = pixcon.intersection_boxes(a, b, torch.tensor([False]), torch.tensor([True]))
    ma, mb = pixcon.overlap_mask(ia, 7).view(7, 7), pixcon.overlap_mask(ib, 7).view(7, 7)
    expect_a = torch.zeros(7, 7, dtype=torch.bool)
    expect_a[1:7, 3:7] = True                 # y 0.2..1 -> rows 1..6, x 0.5..1 -> columns 3..6
    expect_b = torch.zeros(7, 7, dtype=torch.bool)
    expect_b[0:5, 3:7] = True                 # y 0..0.8 -> rows 0..4 (floor 5.6 = 5 excluded)
    assert torch.equal(ma, expect_a) and torch.equal(mb, expect_b)
    # crops that do not meet: empty boxes and masks, no NaN
    c = torch.tensor([[120.0, 0, 200, 80]])
    ia, ic = pixcon.intersection_boxes(a, c, torch.tensor([False]), torch.tensor([True]))
    assert torch.isfinite(ia).all() and not pixcon.overlap_mask(ia, 7).any()
    assert not pixcon.overlap_mask(ic, 7).any()


def scripted_crops(monkeypatch, first, redraws):
    """The first box (crop_box, RandomResizedCrop's numbers) is `first` (x0, y0, x1, y1);
    pixcon.draw_crop returns the redraws in turn: a box (target area = its area) or None (a
    size that does not fit)."""
    monkeypatch.setattr(cdata, "crop_box", lambda height, width, scale, ratio: (
        first[1], first[0], first[3] - first[1], first[2] - first[0]))
    calls = iter(redraws)
    monkeypatch.setattr(pixcon, "draw_crop", lambda w, h, scale, ratio: (lambda b: (
        b, 1.0 if b is None else (b[2] - b[0]) * (b[3] - b[1])))(next(calls)))


def test_second_crop_redrawn_until_it_overlaps_else_both_centre_crop(monkeypatch):
    first = (0, 0, 100, 100)
    far = (150, 150, 200, 200)                       # no intersection
    thin = (99, 50, 199, 150)                        # 1 x 50 = 0.5% of its 10000 px: too little
    enough = (98, 50, 198, 150)                      # 2 x 50 = 1%: accepted
    scripted_crops(monkeypatch, first, [far, thin, enough])
    assert pixcon.overlapping_crops(200, 200) == (first, enough)
    scripted_crops(monkeypatch, first, [far] * 9 + [enough])  # found at the 10th redraw
    assert pixcon.overlapping_crops(200, 200) == (first, enough)
    scripted_crops(monkeypatch, first, [far] * 10 + [enough])  # not in 10: centre crop
    assert pixcon.overlapping_crops(200, 200) == ((0, 0, 200, 200),) * 2
    # issue 22: a size that does not fit counts as a try (released get_params_conditioned)
    scripted_crops(monkeypatch, first, [None] * 9 + [enough])
    assert pixcon.overlapping_crops(200, 200) == (first, enough)
    scripted_crops(monkeypatch, first, [None] * 5 + [far] * 5 + [enough])
    assert pixcon.overlapping_crops(200, 200) == ((0, 0, 200, 200),) * 2
    scripted_crops(monkeypatch, first, [far] * 10)   # 300 x 100: ratio 3 > 4/3, 133 x 100
    assert pixcon.overlapping_crops(300, 100) == ((83, 0, 216, 100),) * 2   # in the middle
    scripted_crops(monkeypatch, first, [far] * 10)
    assert pixcon.overlapping_crops(100, 300) == ((0, 83, 100, 216),) * 2   # (ratio 1/3 < 3/4)


def test_one_draw_is_torchvisions_first_attempt():
    """draw_crop is one attempt of RandomResizedCrop.get_params: the same draws in the same
    order, so where the first attempt fits both give the same box; None where it does not."""
    img = Image.new("RGB", (96, 40))
    fits = misses = 0
    for seed in range(60):
        torch.manual_seed(seed)
        box, target = pixcon.draw_crop(96, 40, (0.08, 1.0), (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        if box is None:
            misses += 1
        else:
            fits += 1
            assert box == (left, top, left + w, top + h)
            assert 0.08 * 96 * 40 <= target <= 96 * 40
    assert fits > 10 and misses > 10


def test_sampled_views_are_their_overlapping_crops():
    """OverlapViews on a 96 x 48 image: seeded by (seed, epoch, index), the numbers drawn in the
    released order (both boxes, then per view its flip and photometric parameters), boxes
    inside the image, each view its box's bilinear crop, flipped where drawn."""
    torch.manual_seed(0)
    x = torch.arange(96).float()
    pattern = torch.stack([x[None, :].expand(48, 96), x[:48, None].expand(48, 96) * 2,
                           (x[None, :] + x[:48, None])], 2).byte().numpy()   # no symmetry
    img = Image.fromarray(pattern)
    for _ in range(100):  # the real sampler: always >= 1% of the second crop inside the first
        b1, b2 = pixcon.overlapping_crops(*img.size)
        iw, ih = min(b1[2], b2[2]) - max(b1[0], b2[0]), min(b1[3], b2[3]) - max(b1[1], b2[1])
        assert iw > 0 and ih > 0 and iw * ih >= 0.01 * (b2[2] - b2[0]) * (b2[3] - b2[1])
    ops = byol_photometrics(32)
    ds = pixcon.OverlapViews([(img, 0)] * 8, 32, ops, seed=3)
    ds.device_aug = True  # the views leave before their photometric ops: the crops alone
    ds.set_epoch(2)
    flips, wide = [], False
    for i in range(8):
        s = ds[i]
        torch.manual_seed(cdata.sample_seed(3, 2, i))
        boxes = pixcon.overlapping_crops(96, 48)
        draws = [(bool(torch.rand(1) < 0.5), ph.sample()) for ph in ops]
        assert [tuple(b.tolist()) for b in s["boxes"]] == list(boxes)
        assert s["flips"] == [f for f, _ in draws]
        assert all(torch.equal(p, q) for p, (_, q) in zip(s["photo"], draws))
        assert all(torch.equal(a, b) for a, b in zip(s["views"], ds[i]["views"]))  # seeded
        for view, box, flip in zip(s["views"], s["boxes"], s["flips"]):
            assert 0 <= box[0] < box[2] <= 96 and 0 <= box[1] < box[3] <= 48
            wide |= bool(box[2] - box[0] > 48)
            ref = img.resize((32, 32), Image.BILINEAR, box=tuple(box.tolist()))
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref
            assert torch.equal(view, torch.from_numpy(np.array(ref)).permute(2, 0, 1))
            flips.append(flip)
    assert any(flips) and not all(flips) and wide


def byol_photometrics(size):
    import byol
    return [v.photometric for v in byol.augmentations(size, blur_kernel=3)]


def test_device_crop_from_a_store_draws_the_files_numbers_and_gives_their_views(tiny_store):
    """Issue 25: from the store with --device-crop the loader draws the boxes, flips and
    photometric parameters alone (draw_params) and the device crops; against the files with
    --device-aug (PIL crops in the loader): the same numbers and, once the device ran its ops,
    the same images bit for bit. The files' CPU path draws the same boxes and flips too."""
    from torch.utils.data import default_collate
    from common import augment as A
    src, packed = tiny_store
    st = cdata.StoreTiles(packed)
    st.device_crop = True  # as --device-crop sets it
    files, cpu, tiles = (pixcon.OverlapViews(b, 48, byol_photometrics(48), seed=2) for b in
                         (cdata.folder_dataset(src), cdata.folder_dataset(src), st))
    for ds in (files, cpu, tiles):
        ds.set_epoch(1)
    ref, dev = (A.DeviceAugment(ds, torch.device("cpu")) for ds in (files, tiles))
    assert tiles.device_crop and not files.device_crop and not cpu.device_aug
    flips = []
    for b, batch in enumerate(torch.utils.data.DataLoader(tiles, batch_size=8)):
        assert "views" not in batch and batch["tile"].shape == (8, 64, 64, 3)
        fb, cb = (default_collate([d[i] for i in range(8 * b, 8 * b + 8)]) for d in (files, cpu))
        for k in ("boxes", "flips", "photo"):
            assert all(torch.equal(x, y) for x, y in zip(batch[k], fb[k])), k
        assert all(torch.equal(x, y) for k in ("boxes", "flips") for x, y in zip(cb[k], fb[k]))
        assert "photo" not in cb
        assert all(torch.equal(x, y) for x, y in zip(dev(batch), ref(fb)))
        flips += batch["flips"][0].tolist()
    assert any(flips) and not all(flips)


# ----------------------------------------------------------------------------- matching rules
def test_coord_match_on_a_known_geometry():
    s = 4
    q, k = torch.tensor([[0.0, 0, 80, 80]]), torch.tensor([[40.0, 0, 120, 80]])  # k: q shifted 40
    # query columns' centres x = 10, 30, 50, 70 -> key u = -.375, -.125, .125, .375: the first
    # two fall outside the key crop, the others land in key columns 0 and 1 (same row)
    for fq, fk, cols in [(False, False, [None, None, 0, 1]), (False, True, [None, None, 3, 2]),
                         (True, False, [1, 0, None, None]), (True, True, [2, 3, None, None])]:
        idx, valid = pixcon.coord_match(q, k, torch.tensor([fq]), torch.tensor([fk]), s)
        for r in range(s):
            for c in range(s):
                i = r * s + c
                assert bool(valid[0, i]) == (cols[c] is not None)
                if cols[c] is not None:
                    assert int(idx[0, i]) == r * s + cols[c]
    # random crops against a brute force: nearest key cell centre in image pixels
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(16, 2, generator=g) * 100
    bq = torch.cat([lo, lo + 20 + torch.rand(16, 2, generator=g) * 100], 1)
    lo = torch.rand(16, 2, generator=g) * 100
    bk = torch.cat([lo, lo + 20 + torch.rand(16, 2, generator=g) * 100], 1)
    fq, fk = torch.rand(16, generator=g) < 0.5, torch.rand(16, generator=g) < 0.5
    s = 7
    idx, valid = pixcon.coord_match(bq, bk, fq, fk, s)

    def centres(box, flip):  # image position of every cell centre of a (flipped) view
        pts = []
        for r in range(s):
            for c in range(s):
                u, v = (c + 0.5) / s, (r + 0.5) / s
                u = 1 - u if flip else u
                pts.append((float(box[0] + u * (box[2] - box[0])),
                            float(box[1] + v * (box[3] - box[1]))))
        return torch.tensor(pts, dtype=torch.float64)

    for n in range(16):
        pq, pk = centres(bq[n], fq[n]), centres(bk[n], fk[n])
        inside = ((pq[:, 0] >= bk[n, 0]) & (pq[:, 0] <= bk[n, 2]) & (pq[:, 1] >= bk[n, 1])
                  & (pq[:, 1] <= bk[n, 3]))
        assert torch.equal(valid[n], inside)
        # nearest in the key view's own coordinates (cells are scaled per axis there)
        wk, hk = float(bk[n, 2] - bk[n, 0]), float(bk[n, 3] - bk[n, 1])
        d = (((pq[:, None, 0] - pk[None, :, 0]) / wk) ** 2
             + ((pq[:, None, 1] - pk[None, :, 1]) / hk) ** 2)
        best = d.argmin(1)
        assert torch.equal(idx[n][inside], best[inside])
    assert valid.any() and not valid.all()


def test_sr_weights_on_hand_made_similarities():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.3],     # overlap: pixel 0
                        [0.2, 0.8, 0.4, 0.6]])    # overlap: pixels 1 and 3
    overlap = torch.tensor([[True, False, False, False], [False, True, False, True]])
    # row 0: min 0.1 (all), max 0.5 (outside) -> (0.9 -> 1), 0, 1, 0.5 -> squared 1, 0, 1, 0.25
    # row 1: min 0.2, max outside 0.4 -> 0, (1), 1, (1)
    w = pixcon.sr_weights(sim, overlap, power=2)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0, 1, 0.25], [0, 1, 1, 1]]))
    torch.testing.assert_close(pixcon.sr_weights(sim, overlap, power=1)[0],
                               torch.tensor([1.0, 0, 1, 0.5]))
    # the minimum over all pixels can sit inside the overlap, and the maximum too
    w = pixcon.sr_weights(torch.tensor([[0.0, 0.5, 0.6, 1.0]]),
                          torch.tensor([[True, False, False, True]]), power=1)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5 / 0.6, 1.0, 1.0]]))
    # every pixel inside the overlap: all 1
    assert torch.equal(pixcon.sr_weights(sim, torch.ones(2, 4, dtype=torch.bool)), torch.ones(2, 4))
    # zero range outside (all outside pixels at the minimum): 0 there, no NaN
    w = pixcon.sr_weights(torch.tensor([[0.3, 0.3, 0.9]]), torch.tensor([[False, False, True]]))
    assert torch.equal(w, torch.tensor([[0.0, 0.0, 1.0]]))
    # constant similarities and no overlap at all
    w = pixcon.sr_weights(torch.full((1, 4), 0.7), torch.zeros(1, 4, dtype=torch.bool))
    assert torch.equal(w, torch.zeros(1, 4))
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(64, 49, generator=g) * 2 - 1
    w = pixcon.sr_weights(sim, torch.rand(64, 49, generator=g) < 0.3)
    assert torch.isfinite(w).all() and w.min() >= 0 and w.max() <= 1


# ----------------------------------------------------------------------------- loss and queues
def tiny_model(match, K=8):
    torch.manual_seed(0)
    return pixcon.PixCon("resnet18", hidden_dim=32, dim=16, K=K, T=0.2, lam=0.5, match=match)


def geometry():
    boxes = [torch.tensor([[0.0, 0, 60, 60], [10, 10, 50, 50], [0, 0, 64, 64], [5, 0, 45, 40]]),
             torch.tensor([[30.0, 30, 64, 64], [0, 0, 64, 64], [0, 0, 64, 64], [20, 20, 60, 60]])]
    flips = [torch.tensor([False, True, False, True]), torch.tensor([True, False, False, False])]
    return boxes, flips


def brute_force_loss(ref, x1, x2, boxes, flips):
    """The loss written out pixel by pixel, from the networks' outputs."""
    T, lam, s = ref.T, ref.lam, 2  # 64 px -> 2 x 2 C5 grid
    with torch.no_grad():
        outs = []
        for x in (x1, x2):
            c5 = resnet_maps(ref.online[0], x)[-1]
            g, d = ref.online[1](c5)
            n, D = d.shape[:2]
            pd = ref.pred_d(d.flatten(2).transpose(1, 2).reshape(-1, D)).view(n, s * s, D)
            tc5 = resnet_maps(ref.target[0], x)[-1]
            tg, td = ref.target[1](tc5)
            outs.append(dict(b=c5.flatten(2), q=F.normalize(ref.pred_g(g), dim=1),
                             qd=F.normalize(pd, dim=2), tb=tc5.flatten(2), k=F.normalize(tg, dim=1),
                             kd=F.normalize(td.flatten(2), dim=1)))

    def ce(q, pos, negs):
        logits = torch.cat([(q @ pos)[None], negs @ q]) / T
        return float(torch.logsumexp(logits, 0) - logits[0])

    total = 0.0
    for a, b in ((0, 1), (1, 0)):
        A, B = outs[a], outs[b]
        lg = sum(ce(A["q"][n], B["k"][n], ref.queue_g) for n in range(4)) / 4
        ia = pixcon.intersection_boxes(boxes[a], boxes[b], flips[a], flips[b])[0]
        num = den = 0.0
        for n in range(4):
            cos = F.normalize(A["b"][n], dim=0).t() @ F.normalize(B["tb"][n], dim=0)  # (S, S)
            mask = pixcon.overlap_mask(ia[n:n + 1], s)[0]
            outside = [float(cos[i].max()) for i in range(s * s) if not mask[i]]
            lo = min(float(cos[i].max()) for i in range(s * s))
            for i in range(s * s):
                if ref.match == "coord":
                    idx, valid = pixcon.coord_match(boxes[a][n:n + 1], boxes[b][n:n + 1],
                                                    flips[a][n:n + 1], flips[b][n:n + 1], s)
                    j, w = int(idx[0, i]), float(valid[0, i])
                else:
                    j, w = int(cos[i].argmax()), 1.0
                    if ref.match == "sr":
                        w = 1.0 if mask[i] else min(1.0, max(0.0, (float(cos[i].max()) - lo)
                                                             / max(max(outside) - lo, 1e-6))) ** 2
                num += w * ce(A["qd"][n, i], B["kd"][n, :, j], ref.queue_d)
                den += w
        total += (1 - lam) * lg + lam * num / max(den, 1e-6)
    return total, outs


@pytest.mark.parametrize("match", ["sim", "coord", "sr"])
def test_loss_against_brute_force_and_queue_bookkeeping(match):
    model = tiny_model(match)
    with torch.no_grad():  # a target unlike the online network, as after some EMA steps
        for p in model.target.parameters():
            p.mul_(0.9)
    x1, x2 = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    boxes, flips = geometry()
    ref = copy.deepcopy(model)
    expected, outs = brute_force_loss(ref, x1, x2, boxes, flips)
    loss, parts = model(x1, x2, boxes, flips, 0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert parts["loss"].item() == pytest.approx(
        0.5 * parts["loss_global"].item() + 0.5 * parts["loss_dense"].item(), rel=1e-5)
    # direction 0 enqueued view 2's keys: global, and the dense map pooled before normalising
    torch.testing.assert_close(model.queue_g[:4], outs[1]["k"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        td = model.target[1](resnet_maps(model.target[0], x2)[-1])[1]
    torch.testing.assert_close(model.queue_d[:4], F.normalize(td.flatten(2).mean(2), dim=1),
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(model.queue_g[4:], ref.queue_g[4:]) and int(model.queue_ptr) == 4
    if match == "sr":  # the other direction next: view 1's keys, then the pointer wraps (K = 8)
        model(x1, x2, boxes, flips, 1)
        torch.testing.assert_close(model.queue_g[4:], outs[0]["k"], rtol=1e-4, atol=1e-5)
        assert int(model.queue_ptr) == 0
        loss.backward()
        assert all(p.grad is None for p in model.target.parameters())
        assert all(p.grad is not None for p in model.pred_d.parameters())


def test_enqueue_direction_depends_on_seed_and_step_only():
    torch.manual_seed(1)
    a = [pixcon.enqueue_direction(0, k) for k in range(64)]
    torch.manual_seed(2)  # the global RNG (seeded per rank by the Trainer) plays no part
    assert a == [pixcon.enqueue_direction(0, k) for k in range(64)]
    assert 16 < sum(a) < 48 and a != [pixcon.enqueue_direction(1, k) for k in range(64)]


def test_target_is_an_ema_after_the_optimiser_step():
    model = tiny_model("sr")
    x1, x2 = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    boxes, flips = geometry()
    old_t = [p.clone() for p in model.target.parameters()]
    trainer = types.SimpleNamespace(
        epoch=0, steps_per_epoch=1, global_step=lambda: 0, check=lambda loss, parts: None,
        steps=lambda e: iter([(0, {"views": [x1, x2], "boxes": boxes, "flips": flips})]),
        update=lambda parts, lr: None)
    trainer.backward_step = lambda *a: ctrain.Trainer.backward_step(trainer, *a)
    run = types.SimpleNamespace(images=lambda v: v, autocast=contextlib.nullcontext,
                                device=torch.device("cpu"))
    args = types.SimpleNamespace(scaled_lr=1.0, epochs=1, warmup_epochs=0, base_momentum=0.5,
                                 seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    pixcon.train_one_epoch(model, opt, trainer, run, args)
    new_o = list(model.online.parameters())
    for t, o, n in zip(model.target.parameters(), old_t, new_o):
        torch.testing.assert_close(t, 0.5 * o + 0.5 * n)   # m(0) = base, online after its step
    assert not torch.allclose(new_o[0], old_t[0])


# ----------------------------------------------------------------------------- runs
SIZES = ["--batch-size", "8", "--img-size", "64", "--queue-size", "32", "--workers", "1",
         "--epochs", "2", "--blur-kernel", "3"]
TINY = ["--data", "demo", "--demo-size", "16", *SIZES]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_store):
    """One epoch (2 steps) of sim from test_store's 16 tiles twice, from the files with
    --device-aug (PIL crops) and from their store with --device-crop (crops on the device), and
    of coord; sr on the demo tiles for 2 epochs (kNN at the end)."""
    d, (src, packed) = tmp_path_factory.mktemp("pixcon"), tiny_store
    one = [*SIZES, "--epochs", "1", "--knn-every", "0"]
    for name, data in (("sim", ["--data", "folder", "--data-root", src, "--device-aug"]),
                       ("sim_store", ["--data-store", packed, "--device-crop"])):
        run_script("pixcon.py", *one, *data, "--match", "sim", "--output-dir", d / name)
    run_script("pixcon.py", *TINY, "--match", "coord", "--epochs", "1", "--knn-every", "0",
               "--output-dir", d / "coord")
    run_script("pixcon.py", *TINY, "--output-dir", d / "sr")  # default --match sr, kNN at the end
    return d


def test_three_variants_train_and_write_the_contract(runs):
    for match in ("sim", "coord", "sr"):
        out = runs / match
        rows = log(out)
        assert [r["epoch"] for r in rows] == ([0, 1] if match == "sr" else [0])
        assert json.loads((out / "args.json").read_text())["match"] == match
        r = rows[0]
        assert r["loss"] == pytest.approx(0.5 * r["loss_global"] + 0.5 * r["loss_dense"], rel=1e-5)
        assert r["chance_loss"] == pytest.approx(2 * math.log(33))
        assert 0.5 * r["chance_loss"] < r["loss"] < 1.5 * r["chance_loss"]
        assert r["m"] > 0.99 and rows[-1]["m"] >= r["m"]
        weight = {"sim": 1.0, "coord": None, "sr": None}[match]
        if weight:
            assert r["dense_weight"] == pytest.approx(1.0)
        else:
            assert 0 < r["dense_weight"] < 1
        res = torchvision.models.resnet18().load_state_dict(
            torch.load(out / "backbone.pth"), strict=False)
        assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    assert "knn_accuracy" in log(runs / "sr")[-1]
    # warm-up: 4 epochs of 2 steps from 1e-4 x lr, lr 0.2 x 8 / 256
    lr = 0.2 * 8 / 256
    expected = sum(lr * (1 - (1 - k / 8) * (1 - 1e-4)) for k in range(2)) / 2
    assert log(runs / "sim")[0]["lr"] == pytest.approx(expected)


def test_a_store_with_device_crop_trains_as_the_files_bit_for_bit(runs):
    """Issue 25: PixCon from a store, its overlapping crops cut on the device, ends with the
    model (online, target, queues) of the run from the files, bit for bit; matches.png too."""
    a, b = (torch.load(runs / d / "checkpoint.pth", weights_only=False)["model"]
            for d in ("sim", "sim_store"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (runs / "sim_store" / "matches.png").stat().st_size > 0


def test_two_processes_killed_and_resumed_end_bit_identical(tmp_path):
    two = ["pixcon.py", *TINY, "--batch-size", "4", "--knn-every", "0"]
    run_script(*two, "--output-dir", tmp_path / "ref", nproc=2)
    run_script(*two, "--output-dir", tmp_path / "cut", "--stop-after-steps", "3", nproc=2)
    assert len(log(tmp_path / "cut")) == 1
    run_script(*two, "--output-dir", tmp_path / "cut", nproc=2)
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=False)["model"]
            for d in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # queues included
    # every epoch logs the same numbers, the interrupted one too (the checkpoint keeps every
    # rank's partial sums)
    untimed = [[{k: v for k, v in r.items() if "time" not in k and "per_s" not in k}
                for r in log(tmp_path / d)] for d in ("ref", "cut")]
    assert len(untimed[0]) == len(untimed[1])
    for x, y in zip(*untimed):
        assert x == pytest.approx(y, rel=1e-9)


def test_bad_queue_size_is_one_clear_line(tmp_path):
    p = run_script("pixcon.py", *TINY, "--queue-size", "36", "--output-dir", tmp_path / "bad",
                   check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: --queue-size 36 must be a multiple of the global batch 8"
    assert not (tmp_path / "bad").exists()


def test_neck_linear_layers_keep_pytorchs_init_as_released():
    """mmselfsup's DenseCLNeck (the released PixCon neck) has no init_cfg: PyTorch's Linear
    defaults (uniform, std 1 / sqrt(3 fan_in), bias drawn), not OpenSelfSup's Kaiming."""
    torch.manual_seed(0)
    neck = pixcon.Neck(512, 512, 128)
    for m in (neck.glob[0], neck.glob[3]):
        assert m.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 512), rel=0.05)
        assert m.bias.abs().max().item() > 0


def test_matches_picture_marks_each_query_and_its_positive_in_one_colour(monkeypatch):
    """Issue 24.5: matches.png. Coord on two views of the same crop: every query cell's
    positive is the same cell, weight 1, drawn in the query's colour at the same place."""
    from common import pictures
    seen = {}
    monkeypatch.setattr(pictures, "sheet", lambda rows, *a, **kw: seen.setdefault("rows", rows)
                        and types.SimpleNamespace(save=lambda path: None))
    view = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    sample = {"views": [view, view], "boxes": [torch.tensor([0.0, 0, 64, 64])] * 2,
              "flips": [False, False]}
    torch.manual_seed(0)
    model = pixcon.PixCon(K=16, match="coord")
    pixcon.save_matches(model, [sample] * 2, range(2), "unused.png", cell=64)
    rows = seen["rows"]
    assert len(rows) == 2 and [len(r) for r in rows] == [3, 3]
    (v1, c1), (v2, c2), (faded, _) = rows[0]
    assert c1 == "tile 0, view 1: 2 query cells"                 # cells 0 and 3 of the 2 x 2 grid
    assert c2 == "view 2: their positives; weights 1.00, 1.00"
    for j, (y, x) in enumerate(((16, 1), (48, 62))):              # left edge of cell 0, right of 3
        assert tuple(v1[y, x]) == tuple(v2[y, x]) == tuple(pictures.PALETTE[j])
    assert model.training                                          # train mode restored
