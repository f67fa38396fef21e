"""MCL's montages, windows, labels and loss against brute force and hand-computed values, and its
runs end to end (one and two processes, kill and resume, the backbone loading for fine-tuning)."""
import copy
import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import mcl
from common import data as cdata
from common.models import load_pretrained, resnet, resnet_maps
from tests.conftest import REPO, run_script


# ----------------------------------------------------------------------------- views
def test_views_are_byols_two_settings_with_mcls_crop():
    views = mcl.augmentations(64, 3)
    assert len(views) == 6
    for v in views:
        assert v.scale == (0.2, 1.0) and v.interpolation == Image.BILINEAR and v.flip_p == 0.5
        assert v.photometric.jitter == (0.4, 0.4, 0.2, 0.1) and v.photometric.grey_p == 0.2
    assert [(v.photometric.blur_p, v.photometric.solarize_p) for v in views] == \
        [(1.0, 0.0)] * 3 + [(0.1, 0.2)] * 3
    # independent draws: the six views of one image differ
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8))
    ds = cdata.MultiViewDataset([(img, 0)], views, seed=0)
    out = ds[0]["views"]
    assert all(not torch.equal(out[i], out[j]) for i in range(6) for j in range(i))


# ----------------------------------------------------------------------------- montages
def test_montage_geometry_each_cell_holds_its_image_downsampled():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16)
    assert torch.equal(mcl.montage(x, 0), x)
    for level in (1, 2):
        r = 2 ** level
        h = 16 // r
        down = {"nearest": lambda im: im[:, ::r, ::r],                       # top-left pixel
                "area": lambda im: im.reshape(3, h, r, h, r).mean((2, 4))}   # block mean
        for mode, fn in down.items():
            m = mcl.montage(x, level, mode)
            assert m.shape == (16 // r ** 2, 3, 16, 16)
            for n in range(m.shape[0]):
                for k in range(r * r):
                    row, col = divmod(k, r)  # row-major: image n*r*r + k
                    cell = m[n, :, row * h:(row + 1) * h, col * h:(col + 1) * h]
                    torch.testing.assert_close(cell, fn(x[n * r * r + k]), rtol=0, atol=1e-6)


def constant_views(B, levels, H=16, first_id=0):
    """Level i's view of image b is the constant b + first_id (every channel)."""
    ids = torch.arange(first_id, first_id + B, dtype=torch.float32).view(B, 1, 1, 1)
    return [ids.expand(B, 3, H, H).clone() for _ in range(levels)]


def read_cells(x, counts, H=16):
    """Brute force: the constant in every cell of every montage, level by level, row-major."""
    out, start = [], 0
    for i, n in enumerate(counts):
        r, h = 2 ** i, H // 2 ** i
        out.append([int(x[start + m, 0, row * h, col * h])
                    for m in range(n) for row in range(r) for col in range(r)])
        start += n
    return out


def test_labels_follow_the_seeded_permutation():
    B = 16
    torch.manual_seed(5)
    x, labels = mcl.assemble(constant_views(B, 3), 3)
    assert x.shape == (16 + 4 + 1, 3, 16, 16)
    assert read_cells(x, [16, 4, 1]) == [lab.tolist() for lab in labels]
    assert labels[0].tolist() == list(range(B))
    torch.manual_seed(5)  # drawn from the global RNG the Trainer seeds per step, level 1 first
    assert labels[1].tolist() == torch.randperm(B).tolist()
    assert labels[2].tolist() == torch.randperm(B).tolist()
    # the released 4-level variant: B/32 montages of 8 x 8 cells, every image exactly twice
    B = 32
    torch.manual_seed(6)
    x, labels = mcl.assemble(constant_views(B, 4, H=32), 4, "area")
    assert x.shape[0] == 32 + 8 + 2 + 1
    assert read_cells(x, [32, 8, 2, 1], H=32) == [lab.tolist() for lab in labels]
    assert [sorted(lab.tolist()) for lab in labels[:3]] == [list(range(B))] * 3
    assert torch.bincount(labels[3], minlength=B).tolist() == [2] * B
    torch.manual_seed(6)
    perms = [torch.randperm(n) % B for n in (32, 32, 64)]
    assert all(torch.equal(a, b) for a, b in zip(labels[1:], perms))


def test_level_weights_and_slot_counts():
    assert mcl.level_weights(3) == [0.5, 0.25, 0.125]            # appendix: 1/2^(i+1)
    assert mcl.level_weights(1) == [0.5]
    assert mcl.level_weights(4) == [0.5, 0.25, 0.125, 0.125]     # released config (sum 1)
    assert mcl.slot_counts(64, 3) == [64, 64, 64]
    assert mcl.slot_counts(64, 4) == [64, 64, 64, 128]
    # the appendix's cost accounting: B + B/4 + B/16 = 1.3125 B images per branch
    assert sum(n // 4 ** i for i, n in enumerate(mcl.slot_counts(64, 3))) / 64 == 1.3125
    assert mcl.chance_loss(3, 1.0, 256) == pytest.approx(4 * 0.875 * math.log(256))


def test_batch_and_size_refused_with_the_nearest_valid_sizes():
    def check(batch, levels, img=64):
        mcl.check_mcl_args(type("A", (), dict(batch_size=batch, levels=levels, img_size=img)))
    check(16, 3), check(32, 4), check(4, 2), check(1, 1)
    with pytest.raises(cdata.DataError, match=r"--batch-size 20 .* multiple of 16.* 16 or 32$"):
        check(20, 3)
    with pytest.raises(cdata.DataError, match=r"multiple of 32.* 32 or 64$"):
        check(48, 4)
    with pytest.raises(cdata.DataError, match=r"nearest valid: 16$"):
        check(8, 3)
    with pytest.raises(cdata.DataError, match="--img-size 48"):
        check(16, 3, img=48)


# ----------------------------------------------------------------------------- the network
def test_fpn_levels_equal_torchvision_fpn_on_each_levels_rows():
    torch.manual_seed(1)
    enc = mcl.Encoder("resnet18", 3, hidden_dim=32, dim=16).eval()  # eval: BN row by row
    assert [b[0].in_channels for b in enc.fpn.inner_blocks] == [128, 256, 512]  # C3..C5
    assert all(isinstance(b[1], nn.BatchNorm2d) for b in enc.fpn.layer_blocks)
    counts = [4, 2, 1]
    TOL = dict(rtol=1e-4, atol=2e-4)  # convolutions of other batch sizes round differently
    x = torch.randn(sum(counts), 3, 64, 64)
    with torch.no_grad():
        feats = resnet_maps(enc.backbone, x)[1:]
        ref = enc.fpn(OrderedDict((str(k), f) for k, f in enumerate(feats)))  # P3, P4, P5
        got = mcl.fpn_levels(enc.fpn, feats, counts)
        e = enc(x, counts)
    torch.testing.assert_close(got[0], ref["2"][:4], **TOL)      # level 0: P5, 2 x 2 at 64 px
    torch.testing.assert_close(got[1], ref["1"][4:6], **TOL)     # level 1: P4, 4 x 4 = 2 x 2 windows
    torch.testing.assert_close(got[2], ref["0"][6:], **TOL)      # level 2: P3, 8 x 8 = 4 x 4 windows
    assert [g.shape[-1] for g in got] == [2, 4, 8]
    assert [t.shape for t in e] == [(4, 16), (8, 16), (16, 16)]
    # the 4-level variant reads C2 too (P2 for level 3)
    enc4 = mcl.Encoder("resnet18", 4, hidden_dim=32, dim=16)
    assert [b[0].in_channels for b in enc4.fpn.inner_blocks] == [64, 128, 256, 512]


def test_each_window_is_an_independent_sample():
    torch.manual_seed(2)
    enc = mcl.Encoder("resnet18", 3, hidden_dim=32, dim=16).eval()
    w = 2
    maps = [torch.randn(4, 256, w, w), torch.randn(2, 256, 2 * w, 2 * w),
            torch.randn(1, 256, 4 * w, 4 * w)]
    with torch.no_grad():
        e = enc.embed(maps)
        for i, p in enumerate(maps):  # brute force: every window cut by hand, embedded alone
            r = 2 ** i
            for m in range(p.shape[0]):
                for row in range(r):
                    for col in range(r):
                        win = p[m:m + 1, :, row * w:(row + 1) * w, col * w:(col + 1) * w]
                        alone = enc.projector(enc.head(win).mean((2, 3)))[0]
                        torch.testing.assert_close(e[i][m * r * r + row * r + col], alone,
                                                   rtol=1e-4, atol=1e-5)
        # perturb the features of one sub-image (level 2, cell row 1 col 2): only it moves
        p2 = maps[2].clone()
        p2[0, :, w:2 * w, 2 * w:3 * w] += 3 * torch.randn(256, w, w)
        e2 = enc.embed([maps[0], maps[1], p2])
    assert torch.equal(e2[0], e[0]) and torch.equal(e2[1], e[1])
    moved = (e2[2] - e[2]).abs().amax(1) > 1e-6
    assert moved.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_training_mode_bn_normalises_each_level_on_its_own():
    """Issue 22.3: the released neck (forward_list) runs head and projector per FPN map, so BN
    statistics come from one level's windows; one batch of all levels differed by ~50%."""
    torch.manual_seed(7)
    enc = mcl.Encoder("resnet18", 3, hidden_dim=32, dim=16).train()
    w = 2
    maps = [torch.randn(8, 256, w, w), 2 + torch.randn(2, 256, 2 * w, 2 * w),
            -1 + 3 * torch.randn(1, 256, 4 * w, 4 * w)]  # levels with different statistics
    ref = copy.deepcopy(enc)
    with torch.no_grad():
        e = enc.embed(maps)
        for i, p in enumerate(maps):  # reference: one level through a fresh copy at a time
            wins = mcl.windows(p, 2 ** i)
            alone = ref.projector(ref.head(wins).mean((2, 3)))
            torch.testing.assert_close(e[i], alone, rtol=1e-5, atol=1e-6)


def test_target_is_a_frozen_copy_without_predictors():
    torch.manual_seed(3)
    model = mcl.MCL(levels=3, hidden_dim=64, dim=16)
    on, tg = model.online.state_dict(), model.target.state_dict()
    assert on.keys() == tg.keys() and all(torch.equal(on[k], tg[k]) for k in on)
    assert any(k.startswith("fpn.") for k in on) and any(k.startswith("head.") for k in on)
    assert not any(p.requires_grad for p in model.target.parameters())
    assert len(model.predictors) == 3
    proj = model.online.projector
    assert isinstance(proj[-1], nn.BatchNorm1d) and not proj[-1].affine  # final BN, no affine
    assert proj[0].weight.shape == (64, 256) and proj[3].weight.shape == (16, 64)
    conv = [m for m in model.online.head if isinstance(m, nn.Conv2d)]
    assert len(conv) == 4 and all(c.kernel_size == (3, 3) and c.bias is None for c in conv)
    # BYOL's EMA: parameters only. Move the online side first, so that a wrong formula shows.
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
        next(b for n, b in model.online.named_buffers() if n.endswith("running_mean")).add_(1.0)
    old_t = {k: v.clone() for k, v in model.target.state_dict().items()}
    on = model.online.state_dict()
    model.momentum_update(0.9)
    params = {n for n, _ in model.target.named_parameters()}
    for k, v in model.target.state_dict().items():
        expect = 0.9 * old_t[k] + 0.1 * on[k] if k in params else old_t[k]
        torch.testing.assert_close(v, expect)


def test_target_sees_the_montages_unless_level0():
    torch.manual_seed(4)
    B, seen = 16, []
    views = [torch.randn(B, 3, 32, 32) for _ in range(6)]
    x_q, l_q = mcl.assemble(views[:3], 3)
    x_k, l_k = mcl.assemble(views[3:], 3)
    for montages in (True, False):
        model = mcl.MCL(levels=3, hidden_dim=32, dim=16, target_montages=montages)
        forward = model.target.forward
        model.target.forward = lambda x, *a, **kw: seen.append(x.shape[0]) or forward(x, *a, **kw)
        loss, parts = model(x_q, l_q, x_k, l_k)
        assert torch.isfinite(loss) and set(parts) >= {"loss_l0", "acc_l2", "std"}
    assert seen == [21, 21, 16, 16]  # per branch: B + B/4 + B/16 montages, or the B views


# ----------------------------------------------------------------------------- loss wiring
class IdEncoder(nn.Module):
    """Stand-in for mcl.Encoder: a sub-image's embedding is the one-hot of the image id written in
    its pixels, read by average-pooling each cell of the level's r x r grid."""

    def __init__(self, n_ids):
        super().__init__()
        self.n, self.scale = n_ids, nn.Parameter(torch.ones(()))

    def forward(self, x, counts, keep=None):
        out, start = [], 0
        for i, n in enumerate(counts[:keep or len(counts)]):
            ids = F.adaptive_avg_pool2d(x[start:start + n, :1], 2 ** i).round().long().flatten()
            out.append(F.one_hot(ids, self.n).float() * self.scale)
            start += n
        return out


def retrieval_parts(rank, world, B=16, levels=3):
    """MCL.forward with ids for embeddings: every sub-image must retrieve its own image among all
    world * B images (ids are global: rank * B + b)."""
    torch.manual_seed(10 + rank)  # each process draws its own permutations
    model = mcl.MCL(levels=levels, hidden_dim=32, dim=8)
    model.online = model.target = IdEncoder(world * B)
    model.predictors = nn.ModuleList(nn.Identity() for _ in range(levels))
    x_q, lab_q = mcl.assemble(constant_views(B, levels, first_id=rank * B), levels)
    x_k, lab_k = mcl.assemble(constant_views(B, levels, first_id=rank * B), levels)
    loss, parts = model(x_q, lab_q, x_k, lab_k)
    return {"loss": loss.item(), **{k: float(v) for k, v in parts.items()}}


def expected_parts(world, B=16, levels=3, T=1.0):
    """One-hot e and z: the logit of the own image is 1/T, every other 0."""
    n = world * B
    ce = -math.log(math.exp(1 / T) / (math.exp(1 / T) + n - 1))
    per_level = 2 * (2 * T * ce)  # both branches
    return per_level, sum(w * per_level for w in mcl.level_weights(levels))


def test_every_sub_image_retrieves_its_image_one_process():
    per_level, total = expected_parts(1)
    got = retrieval_parts(0, 1)
    assert [got[f"acc_l{i}"] for i in range(3)] == [100.0] * 3
    assert [got[f"loss_l{i}"] for i in range(3)] == pytest.approx([per_level] * 3, rel=1e-6)
    assert got["loss"] == pytest.approx(total, rel=1e-6)
    # the released 4-level weights, level 3 with every image twice
    per_level, total = expected_parts(1, B=32, levels=4)
    got = retrieval_parts(0, 1, B=32, levels=4)
    assert got["acc_l3"] == 100.0 and got["loss"] == pytest.approx(total, rel=1e-6)


WORKER = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from common import dist as cdist
from tests.test_mcl import retrieval_parts
rank, world, _, _ = cdist.init_distributed()
open(f"{{sys.argv[1]}}/rank{{rank}}.json", "w").write(json.dumps(retrieval_parts(rank, world)))
cdist.cleanup()
"""


def test_labels_follow_the_gather_across_two_processes(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    run_script(tmp_path / "worker.py", tmp_path, nproc=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    per_level, total = expected_parts(2)
    assert len(results) == 2
    for got in results:  # rank 1's ids are 16..31: without the rank offset it would score 0 %
        assert [got[f"acc_l{i}"] for i in range(3)] == [100.0] * 3
        assert got["loss"] == pytest.approx(total, rel=1e-6)


# ----------------------------------------------------------------------------- runs
TINY = ["--data", "demo", "--demo-size", "32", "--batch-size", "16", "--img-size", "64",
        "--workers", "1", "--epochs", "2", "--warmup-epochs", "1"]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expected_lr(base, spe, epochs=2, warm_epochs=1, min_lr=1e-4):
    """Per-epoch means of the per-step cosine with its linear warm-up, written out by hand."""
    out = []
    for e in range(epochs):
        lrs = []
        for k in range(e * spe, (e + 1) * spe):
            lr = min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * k / spe / epochs))
            w = warm_epochs * spe
            lrs.append(lr * (1 - (1 - k / w) * (1 - 1e-4)) if k < w else lr)
        out.append(np.mean(lrs))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("mcl_ref")
    p = run_script("mcl.py", *TINY, "--output-dir", out)
    return out, p.stdout


def test_run_writes_the_contract_files_and_logs(reference):
    out, stdout = reference
    assert sorted(p.name for p in out.iterdir()) == \
        ["args.json", "backbone.pth", "checkpoint.pth", "log.jsonl", "montages.png"]
    assert "3 levels: 16 + 4 + 1 = 21 images per branch and process (1.312x)" in stdout
    assert "warm-up: epoch 1 of 1 " in stdout and "warm-up: epoch 2" not in stdout
    rows = log(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    chance = 4 * 0.875 * math.log(16)
    assert rows[0]["chance_loss"] == pytest.approx(chance)
    assert abs(rows[0]["loss"] - chance) < 0.1 * chance  # random init: cosines near 0
    keys = {"loss", "loss_l0", "loss_l1", "loss_l2", "acc_l0", "acc_l2", "std", "m", "lr"}
    assert all(keys <= r.keys() for r in rows) and "knn_accuracy" in rows[-1]
    assert [r["lr"] for r in rows] == pytest.approx(expected_lr(1.0 * 16 / 256, 2), rel=1e-9)
    m = [1 - 0.01 * (math.cos(math.pi * k / 4) + 1) / 2 for k in range(4)]
    assert [r["m"] for r in rows] == pytest.approx([np.mean(m[:2]), np.mean(m[2:])], rel=1e-12)
    args = json.loads((out / "args.json").read_text())
    assert (args["weight_decay"], args["levels"], args["hidden_dim"]) == (1e-5, 3, 2048)
    # the picture: one row per level, up to 4 montages of 192 px each, titled and captioned
    w, h = Image.open(out / "montages.png").size
    assert w == 8 + 4 * (192 + 8) and h > 3 * 192


def test_montage_panels_show_each_levels_cells_and_their_images():
    torch.manual_seed(5)
    x, labels = mcl.assemble(constant_views(16, 3), 3)
    cells = read_cells(x, [16, 4, 1])  # each cell's image, read from the pixels
    rows = mcl.montage_panels(x / 40 - 0.3, [16, 4, 1], labels)  # greys inside 0..255
    assert [len(r) for r in rows] == [4, 4, 1]
    for i, row in enumerate(rows):
        for m, (img, caption) in enumerate(row):
            r = 2 ** i
            assert caption.startswith(f"level {i} (P{5 - i}, 1/{r} size)")
            assert caption.endswith(", ".join(map(str, cells[i][m * r * r:(m + 1) * r * r])))
            for k in range(1, r):  # white cell borders
                assert (img[k * 16 // r] == 255).all() and (img[:, k * 16 // r] == 255).all()


def test_backbone_is_the_resnet_body_and_loads_for_finetuning(reference):
    out, _ = reference
    bb = load(out / "backbone.pth")
    res = torchvision.models.resnet18().load_state_dict(bb, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    model = load(out / "checkpoint.pth")["model"]
    online = {k[len("online.backbone."):]: v for k, v in model.items()
              if k.startswith("online.backbone.")}
    assert same(online, bb)  # neither FPN nor head: the body only
    net = resnet("resnet18")
    report = load_pretrained(net, str(out / "backbone.pth"))  # what finetune_maskrcnn.py does
    assert isinstance(report, str)
    assert same({k: v for k, v in net.state_dict().items()}, bb)


def test_preempted_run_resumes_to_identical_weights(reference, tmp_path):
    ref, _ = reference
    p = run_script("mcl.py", *TINY, "--output-dir", tmp_path, "--stop-after-steps", "3")
    assert "stopped by --stop-after-steps at epoch 1 step 1" in p.stdout
    p = run_script("mcl.py", *TINY, "--output-dir", tmp_path)
    assert "resumed from" in p.stdout and "epoch 1, step 1" in p.stdout
    assert same(load(tmp_path / "checkpoint.pth")["model"], load(ref / "checkpoint.pth")["model"])
    assert [r["loss"] for r in log(tmp_path)] == [r["loss"] for r in log(ref)]


def test_refused_batch_is_one_line_and_leaves_no_folder(tmp_path):
    p = run_script("mcl.py", *TINY, "--batch-size", "20", "--output-dir", tmp_path / "x",
                   check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: --batch-size 20 (per process): --levels 3 needs a multiple of 16 to fill its "
        "smallest montages; nearest valid: 16 or 32"]
    assert not (tmp_path / "x").exists()


def test_two_processes_gloo(tmp_path):
    p = run_script("mcl.py", *TINY, "--knn-every", "0", "--output-dir", tmp_path, nproc=2)
    assert "global batch 32 = 2 x 16" in p.stdout
    rows = log(tmp_path)
    assert [r["lr"] for r in rows] == pytest.approx(expected_lr(1.0 * 32 / 256, 1), rel=1e-9)
    assert rows[0]["chance_loss"] == pytest.approx(4 * 0.875 * math.log(32))
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert abs(rows[0]["loss"] - rows[0]["chance_loss"]) < 0.1 * rows[0]["chance_loss"]
    res = torchvision.models.resnet18().load_state_dict(load(tmp_path / "backbone.pth"),
                                                        strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys


@pytest.mark.parametrize("script, shown", [
    ("mcl", ["nearest (default)"]),
    ("pcl", ["default PIL GaussianBlur", "default per-process batch / 32",
             "torchvision (default)"]),
    ("detcon", ["default PIL GaussianBlur"]),
    ("pixcon", [])])
def test_help_shows_defaults_and_a_cpu_example(script, shown, capsys):
    """Issue 24.6: every flag's default is in --help, and the help ends with a CPU command."""
    import importlib
    with pytest.raises(SystemExit):
        importlib.import_module(script).get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(s in text for s in shown), [s for s in shown if s not in text]
    assert "CPU example" in text and f"python {script}.py --data demo" in text
