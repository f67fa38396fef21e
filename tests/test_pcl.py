"""PCL v2's pieces against brute force and hand-written formulas, and its runs end to end."""
import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pcl
from tests.conftest import REPO, run_main, run_script


# ----------------------------------------------------------------------------- k-means
def blobs(seed, k=6, per=20, dim=8, spread=0.1, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    centres = scale * torch.randn(k, dim, generator=g)
    truth = torch.arange(k * per) % k
    return centres[truth] + spread * torch.randn(k * per, dim, generator=g), truth


def test_nearest_in_blocks_equals_brute_force():
    x, c = torch.randn(50, 5), torch.randn(7, 5)
    d = torch.cdist(x, c) ** 2
    for block in (7, 20, 10 ** 6):  # one row per block, a few rows, everything at once
        labels, d2 = pcl.nearest(x, c, block)
        assert torch.equal(labels, d.argmin(1))
        torch.testing.assert_close(d2, d.min(1).values, atol=1e-4, rtol=1e-4)


def test_kmeans_finds_separated_clusters():
    x, truth = blobs(0)
    c, labels, d2 = pcl.kmeans(x, 6, seed=3, block=30)
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == 6 and len({a for a, _ in pairs}) == 6  # a bijection with the truth
    for j in range(6):  # centroids are the means of their points, labels the nearest centroid
        torch.testing.assert_close(c[j], x[labels == j].mean(0), atol=1e-5, rtol=1e-5)
    d = torch.cdist(x, c) ** 2
    assert torch.equal(labels, d.argmin(1))
    torch.testing.assert_close(d2, d.min(1).values, atol=1e-4, rtol=1e-4)


def plain_lloyd(x, k, iters, g):
    """Textbook Lloyd from k random points, no restarts, no re-seeding."""
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        c = torch.stack([x[a == j].mean(0) if (a == j).any() else c[j] for j in range(k)])
    return (torch.cdist(x, c).min(1).values ** 2).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_inertia_not_worse_than_plain_lloyd(seed):
    x, _ = blobs(seed, k=12, per=15, spread=1.5, scale=2.0)  # overlapping blobs
    _, _, d2 = pcl.kmeans(x, 12, seed=seed)
    plain = plain_lloyd(x, 12, 20, torch.Generator().manual_seed(seed))
    assert d2.sum() <= plain * (1 + 1e-6)


def test_empty_cluster_is_reseeded_on_the_farthest_point():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [9.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [7.0, 0.0], [100.0, 100.0]])  # the third gets no point
    c1, labels, _ = pcl.lloyd(x, c, iters=1)
    # after the update: means (0.05, 0), (7, 0); the empty centroid jumps onto the point farthest
    # from its centroid, (5, 0) or (9, 0) at distance 2 (the first is not guaranteed): then the
    # final assignment gives it that point
    assert torch.allclose(c1[0], torch.tensor([0.05, 0.0]))
    assert c1[2].tolist() in ([5.0, 0.0], [9.0, 0.0]) and len(set(labels.tolist())) == 3


# ----------------------------------------------------------------------------- phi
def test_concentration_hand_computed():
    # cluster 0: distances 1, 3; 1: four 2s; 2: one point; 3: three 4s; 4: empty
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 2, 3, 3, 3])
    dist = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 2.0, 0.5, 4.0, 4.0, 4.0])
    raw = np.array([2 / math.log(12), 2 / math.log(14), 0.0, 4 / math.log(13), 0.0])
    raw[[2, 4]] = raw.max()                      # <= 1 point: the largest phi
    lo = raw.min() + 0.4 * (np.sort(raw)[1] - raw.min())  # 10th percentile: 0.4 of the first gap
    assert lo == pytest.approx(np.percentile(raw, 10))
    clipped = raw.clip(lo, raw.max())            # 90th percentile = the max here (three ties)
    expected = 0.2 * clipped / clipped.mean()
    phi = pcl.concentration(dist, labels, 5, 0.2)
    np.testing.assert_allclose(phi.numpy(), expected, rtol=1e-6)
    assert phi[1] > phi[1].new_tensor(0.2 * raw[1] / clipped.mean())  # cluster 1 was clipped up
    assert phi.mean().item() == pytest.approx(0.2)


# ----------------------------------------------------------------------------- ProtoNCE
def test_proto_nce_equals_hand_written_loss():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 4), dim=1)
    protos = F.normalize(torch.randn(6, 4), dim=1)
    phi = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25, 0.05])
    pos, neg = torch.tensor([2, 0, 2]), torch.tensor([5, 1])
    cols = pos.tolist() + neg.tolist()          # the batch's prototypes, then the negatives
    expected = 0.0
    for i in range(3):
        logit = [float(q[i] @ protos[j]) / float(phi[j]) for j in cols]
        expected += -(logit[i] - math.log(sum(math.exp(v) for v in logit))) / 3
    assert pcl.proto_nce(q, pos, neg, protos, phi).item() == pytest.approx(expected, rel=1e-5)
    # the released sampling: row 0 and row 2 share cluster 2, so row 0 meets its own prototype
    # again as a negative in column 2
    lp = pcl.proto_logits(q, pos, neg, protos, phi)
    assert lp[0, 2] == lp[0, 0] and lp[2, 0] == lp[2, 2]


def test_negatives_never_hold_a_batch_cluster():
    torch.manual_seed(1)
    for _ in range(50):
        pos = torch.randint(0, 40, (16,))             # duplicates included
        neg = pcl.sample_negatives(pos, 60, 30)
        assert len(neg) == 30 and len(set(neg.tolist())) == 30
        assert not set(neg.tolist()) & set(pos.tolist()) and neg.max() < 60
    pos = torch.arange(10)
    assert set(pcl.sample_negatives(pos, 14, 4).tolist()) == {10, 11, 12, 13}  # all free ones
    # uniform among the free ones: 2 of 4 drawn, each in half of 800 draws (sd 14)
    counts = torch.bincount(torch.cat([pcl.sample_negatives(pos, 14, 2) for _ in range(800)]),
                            minlength=14)
    assert counts[:10].sum() == 0 and ((counts[10:] - 400).abs() < 70).all()
    # fewer free clusters than r is refused before training (check_pcl_args), not per step


def test_model_loss_is_instance_plus_mean_proto_nce():
    # r = every free cluster, so the negatives are a known set (their order does not matter)
    args = types.SimpleNamespace(arch="resnet18", dim=16, queue_size=32, moco_m=0.999,
                                 temperature=0.2, bn_splits=1, pcl_r=3, num_clusters=[6, 7])
    torch.manual_seed(0)
    model = pcl.PCL(args, 10)
    index = torch.tensor([7, 2, 5, 9])
    pos = [torch.tensor([0, 0, 2, 3]), torch.tensor([1, 4, 5, 6])]  # 3 and 4 clusters used
    for c, p, k in zip(model.clusters, pos, (6, 7)):
        c.im2cluster[index] = p
        c.prototypes.copy_(F.normalize(torch.randn(k, 16), dim=1))
        c.phi.copy_(0.1 + 0.2 * torch.rand(k))
    x_q, x_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    q = F.normalize(model.encoder_q(x_q), dim=1)  # train-mode BN: what forward sees
    expected = []
    for c, p, k in zip(model.clusters, pos, (6, 7)):
        free = torch.tensor([j for j in range(k) if j not in p.tolist()])
        expected.append(pcl.proto_nce(q, p, free, c.prototypes, c.phi))
    loss, parts = model(x_q, x_k, index)
    torch.testing.assert_close(parts["loss_proto"], torch.stack(expected).mean())
    torch.testing.assert_close(loss, parts["loss_instance"] + parts["loss_proto"])
    loss, parts = model(x_q, x_k)  # warm-up: MoCo v2 alone
    assert "loss_proto" not in parts and loss == parts["loss_instance"]


# ----------------------------------------------------------------------------- the E-step
E_STEP = """
import sys; sys.path.insert(0, {repo!r})
import torch
import pcl
from common import data as cdata, dist as cdist, train as ctrain
args = pcl.get_args(sys.argv[1:])
run = ctrain.Run(args, "pcl")
pcl.check_moco_args(args, run)
base = cdata.build_dataset(args)
model = pcl.PCL(args, len(base))
pcl.e_step(model, base, run, args, epoch=3)
if run.main:
    torch.save({{k: v for k, v in model.state_dict().items() if k.startswith("clusters")}},
               run.out / "clusters.pth")
cdist.cleanup()
"""


def test_e_step_identical_on_one_and_two_processes(tmp_path):
    script = tmp_path / "e_step.py"
    script.write_text(E_STEP.format(repo=str(REPO)))
    flags = ["--data", "demo", "--demo-size", "21", "--img-size", "64", "--batch-size", "4",
             "--workers", "0", "--queue-size", "64", "--num-clusters", "3", "5", "7",
             "--kmeans-redo", "2"]
    got = []
    for nproc in (1, 2):  # 21 tiles, batches of 16: shares of 16 and 5; k=5 comes from rank 1
        out = tmp_path / f"n{nproc}"
        p = run_script(script, *flags, "--output-dir", out, nproc=nproc)
        assert "E-step epoch 3: 21 x 128 embeddings" in p.stdout and "k=7: cluster sizes" in p.stdout
        got.append(torch.load(out / "clusters.pth"))
    one, two = got
    assert one.keys() == two.keys() and len(one) == 9
    for k in one:
        assert torch.equal(one[k], two[k]), k
    for i, k in enumerate((3, 5, 7)):
        assert one[f"clusters.{i}.im2cluster"].max() < k
        torch.testing.assert_close(one[f"clusters.{i}.prototypes"].norm(dim=1), torch.ones(k))
        assert one[f"clusters.{i}.phi"].mean().item() == pytest.approx(0.2)


# ----------------------------------------------------------------------------- runs
TINY = ["pcl.py", "--data", "demo", "--demo-size", "24", "--batch-size", "8", "--img-size", "64",
        "--queue-size", "64", "--workers", "0", "--epochs", "2", "--warmup-epochs", "1",
        "--num-clusters", "12", "16", "--pcl-r", "4"]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("pcl") / "ref"
    return out, run_script(*TINY, "--output-dir", out)


def check_log(rows):
    assert "loss_proto" not in rows[0] and "e_step_s" not in rows[0]  # warm-up: MoCo v2
    r = rows[1]
    assert r["loss"] == pytest.approx(r["loss_instance"] + r["loss_proto"])
    assert 0 < r["loss_proto"] < 20 and 0 <= r["acc_proto"] <= 100 and r["e_step_s"] > 0


def test_single_process_run_across_the_warmup(single):
    out, p = single
    check_log(log(out))
    assert "E-step epoch 1: 24 x 128" in p.stdout and "k=16: cluster sizes" in p.stdout
    assert "E-step epoch 0" not in p.stdout
    from PIL import Image  # clusters.png: up to 6 rows of up to 8 member tiles of 128 px
    w, h = Image.open(out / "clusters.png").size
    assert 8 + 136 <= w <= 8 + 8 * 136 and h > 128


def test_clusters_picture_rows_are_the_largest_clusters_nearest_first(tmp_path, monkeypatch):
    from common import pictures
    seen = {}
    monkeypatch.setattr(pictures, "sheet", lambda rows, *a, **kw: seen.setdefault("rows", rows)
                        and types.SimpleNamespace(save=lambda path: None))
    c = pcl.Clusters(7, 3, 2)
    c.im2cluster.copy_(torch.tensor([2, 0, 2, 1, 2, 0, 1]))
    c.prototypes.copy_(torch.tensor([[1.0, 0], [0, 1], [0.6, 0.8]]))
    x = F.normalize(torch.tensor([[0.6, 0.8], [1, 0], [0.0, 1], [0, 1], [1, 0.1], [1, 0.2],
                                  [0.1, 1]]), dim=1)
    from PIL import Image
    base = [(Image.new("RGB", (40, 40), (10 * i, 0, 0)), i % 2) for i in range(7)]
    args = types.SimpleNamespace(num_clusters=[3], img_size=32)
    pcl.save_clusters(x, [c], base, args, 4, tmp_path / "c.png", n_clusters=2)
    rows = seen["rows"]
    assert [len(r) for r in rows] == [3, 2]                     # cluster 2 (3 tiles), then 0 or 1
    assert rows[0][0][1].startswith("cluster 2: 3 tiles") and "tile 0, class 0, cos 1.00" in \
        rows[0][0][1]
    assert [r[1].split("tile ")[-1].split(",")[0] for r in rows[0]] == ["0", "2", "4"]
    assert rows[0][1][0][0, 0, 0] == 20                          # tile 2's own pixels


def test_two_processes_across_the_warmup(tmp_path):
    out = tmp_path / "two"
    argv = list(TINY)
    argv[argv.index("--batch-size") + 1] = "4"
    p = run_script(*argv, "--output-dir", out, nproc=2)
    check_log(log(out))
    assert p.stdout.count("E-step epoch 1") == 1  # printed once, by rank 0


def test_kill_and_resume_is_bit_identical(single, tmp_path):
    ref, _ = single
    cut = tmp_path / "cut"  # 3 steps per epoch
    run_script(*TINY, "--output-dir", cut, "--stop-after-steps", "3")  # at the warm-up's end
    p = run_script(*TINY, "--output-dir", cut, "--stop-after-steps", "2")  # inside epoch 1
    assert "E-step epoch 1" in p.stdout  # recomputed from the checkpoint's weights
    assert int(torch.load(cut / "checkpoint.pth", weights_only=False)["model"]["cluster_epoch"]) == 1
    p = run_script(*TINY, "--output-dir", cut)
    assert "E-step epoch 1" not in p.stdout  # the checkpoint's prototypes, not recomputed ones
    a, b = torch.load(ref / "backbone.pth"), torch.load(cut / "backbone.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = log(ref), log(cut)
    for key in ("loss", "loss_instance", "loss_proto", "acc_proto"):
        assert ra[1][key] == rb[1][key], key


@pytest.mark.parametrize("flags, culprit", [
    (["--num-clusters", "12", "30"], "--num-clusters 30: more clusters than the 24 training tiles"),
    (["--num-clusters", "12", "16", "--pcl-r", "5"], "--pcl-r 5 exceeds the negatives available"),
])
def test_counts_the_data_cannot_hold_fail_clearly(tmp_path, flags, culprit, monkeypatch, capsys):
    # pcl.py's __main__ in this process (conftest.run_main): no torch import per case
    code, err = run_main(TINY[0], [*TINY[1:], *flags, "--output-dir", tmp_path / "bad"],
                         monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and culprit in last and "--num-clusters 48 96 --pcl-r 16" in last
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- issue 22.4
def test_e_step_sees_the_released_resize_and_centre_crop(tmp_path):
    """The E-step embeds Resize(256) + CenterCrop(224) scaled to --img-size (a 1.14x zoom), by
    torchvision on the PIL tile, not the identity view of the kNN loader."""
    import torch.nn as nn
    import torchvision.transforms as T
    from PIL import Image
    from common import data as cdata
    rng = np.random.default_rng(0)
    tiles = [(Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), np.uint8)), 0)
             for i in range(5)]
    encoder = nn.Sequential(nn.AvgPool2d(4), nn.Flatten())                # 3 x 8 x 8 = 192
    args = types.SimpleNamespace(batch_size=2, img_size=32, workers=0, dim=192)
    run = types.SimpleNamespace(world=1, rank=0, main=True, device=torch.device("cpu"))
    got = pcl.embed_tiles(encoder, tiles, run, args)
    view = T.Compose([T.Resize(37), T.CenterCrop(32)])                     # 32 * 256 / 224
    x = torch.stack([torch.from_numpy(np.asarray(view(img))).permute(2, 0, 1) for img, _ in tiles])
    want = F.normalize(encoder(cdata.to_device(x, run.device)), dim=1)
    torch.testing.assert_close(got, want)


def test_default_init_is_torchvisions_backbone_and_head():
    """The released PCL code keeps torchvision's ResNet init (Kaiming fan_out) and PyTorch's
    Linear defaults (uniform, std 1/sqrt(3 fan_in), bias drawn); --init openselfsup: moco.py's."""
    args = pcl.get_args(["--queue-size", "256", "--bn-splits", "1"])
    assert args.init == "torchvision"
    model = pcl.PCL(args, 10)
    conv1 = model.encoder_q[0].conv1.weight                                # fan_out = 64 x 49
    assert conv1.std().item() == pytest.approx(math.sqrt(2 / (64 * 49)), rel=0.1)
    fc = model.encoder_q[1][0]
    assert fc.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 512), rel=0.05)
    assert fc.bias.abs().max().item() > 0
    q, k = model.encoder_q.state_dict(), model.encoder_k.state_dict()
    assert all(torch.equal(q[n], k[n]) for n in q)
    flags = ["--init", "openselfsup", "--queue-size", "256", "--bn-splits", "1"]
    other = pcl.PCL(pcl.get_args(flags), 10)
    assert other.encoder_q[1][0].weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    conv1 = other.encoder_q[0].conv1.weight                              # fan_in = 3 x 49
    assert conv1.std().item() == pytest.approx(math.sqrt(2 / 147), rel=0.1)
