"""linear_probe.py and common/knn.py: the kNN vote, the metrics and the linear probe against
independent references, then the script end to end on demo tiles and a small folder tree."""
import argparse
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common.data import IMAGENET_MEAN, IMAGENET_STD, DataError
from common.demo import DemoTiles
from common.knn import accuracy, extract_features, knn_predict, macro_f1, tile_loader
from common.models import resnet
from conftest import run_script
from linear_probe import datasets, get_args, predict, stratified_subset, train_linear

def probe(*argv):
    """linear_probe.py run in this process, as `python linear_probe.py` runs its main (a
    subprocess costs ~7 s of start-up here; the command line itself is run below) -> stdout."""
    import linear_probe
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        linear_probe.main([str(a) for a in argv])
    return argparse.Namespace(stdout=buf.getvalue())


SMALL = ["--data", "demo", "--img-size", "64", "--demo-size", "60", "--demo-test-size", "30",
         "--workers", "0", "--probe-epochs", "30"]


# ----------------------------------------------------------------------------- kNN
def brute_force_knn(train_f, train_y, test_f, num_classes, k, T):
    """One test row at a time in plain Python: cosine to every train row, the k largest,
    exp(sim / T) summed per class."""
    preds = []
    for q in test_f.tolist():
        sims = []
        for f, y in zip(train_f.tolist(), train_y.tolist()):
            dot = sum(a * b for a, b in zip(q, f))
            norm = math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in f))
            sims.append((dot / norm, y))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / T)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return preds


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(30, 8, generator=g), torch.randn(10, 8, generator=g)
    train_y = torch.randint(0, 3, (30,), generator=g)
    want = brute_force_knn(train_f, train_y, test_f, 3, k=5, T=0.07)
    assert knn_predict(train_f, train_y, test_f, 3, k=5, T=0.07, chunk=3).tolist() == want
    # a larger temperature flattens the weights towards a plain majority vote: still the same
    want = brute_force_knn(train_f, train_y, test_f, 3, k=5, T=1.0)
    assert knn_predict(train_f, train_y, test_f, 3, k=5, T=1.0).tolist() == want


def test_knn_k1_on_its_own_bank_is_perfect_and_k_is_clamped():
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(25, 16, generator=g), torch.randint(0, 4, (25,), generator=g)
    assert accuracy(knn_predict(f, y, f, 4, k=1), y) == 100.0
    # k larger than the bank: every row sees all 25 neighbours; no error
    assert knn_predict(f, y, f, 4, k=1000).shape == (25,)


# ----------------------------------------------------------------------------- metrics
def test_accuracy_and_macro_f1_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    pred = torch.tensor([0, 0, 1, 1, 1, 0, 2, 0])
    # confusion matrix (rows true, columns predicted):
    #          p0 p1 p2 p3
    #     t0 [ 2  1  0  0 ]
    #     t1 [ 0  2  0  0 ]
    #     t2 [ 1  0  1  0 ]
    #     t3 [ 1  0  0  0 ]      class 3 is never predicted
    # class 0: tp 2, fp 2, fn 1 -> P 1/2, R 2/3, F1 = 2 * (1/2)(2/3) / (1/2 + 2/3) = 4/7
    # class 1: tp 2, fp 1, fn 0 -> P 2/3, R 1,   F1 = 4/5
    # class 2: tp 1, fp 0, fn 1 -> P 1,   R 1/2, F1 = 2/3
    # class 3: tp 0, fp 0, fn 1 -> F1 = 0
    # class 4 (num_classes=5) is in neither: left out of the mean
    assert accuracy(pred, target) == 100 * 5 / 8
    want = 100 * (4 / 7 + 4 / 5 + 2 / 3 + 0) / 4  # 50.95...
    assert abs(macro_f1(pred, target, 5) - want) < 1e-9
    # a class only predicted (4) counts too, with F1 0: (1 + 0 + 0) / 3 over classes {0, 1, 4}
    assert abs(macro_f1(torch.tensor([0, 4]), torch.tensor([0, 1]), 5) - 100 / 3) < 1e-9
    assert macro_f1(target, target, 5) == 100.0


# ----------------------------------------------------------------------------- probe parts
def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 32, generator=g) * 3

    def sample(n):
        y = torch.arange(n) % 4
        return centres[y] + 0.3 * torch.randn(n, 32, generator=g), y

    (x, y), (xt, yt) = sample(200), sample(100)
    clf, hist = train_linear(x, y, 4, epochs=30, lr=1e-3, weight_decay=1e-5, batch_size=32, seed=0)
    with torch.no_grad():
        assert accuracy(clf(xt).argmax(1), yt) == 100.0
    assert hist["loss"][-1] < 0.1 * math.log(4) and hist["epoch"] == 30  # no val: the last epoch
    assert len(hist["loss"]) == 30 and hist["val_macro_f1"] == []


@pytest.mark.parametrize("lr", [0.2, 0.05])  # best at epoch 3 of 10; ties from epoch 5 on
def test_validation_picks_the_best_epoch_and_returns_its_classifier(lr):
    """Ciga et al.'s protocol: the classifier of the epoch with the best validation macro F1.
    Expected values come from classifiers trained from scratch for 1, 2, ..., E epochs without
    a validation set (same seed: scoring must not change the training)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g)

    def sample(n):  # overlapping classes and a large lr: the validation score goes up and down
        y = torch.arange(n) % 3
        return centres[y] + 1.5 * torch.randn(n, 16, generator=g), y

    (x, y), (xv, yv), (xt, yt) = sample(48), sample(30), sample(30)
    kw = dict(lr=lr, weight_decay=0.0, batch_size=8, seed=0)
    E = 10
    clf, hist = train_linear(x, y, 3, E, val=(xv, yv), **kw)
    scores, test_preds = [], []
    for e in range(1, E + 1):
        c, h = train_linear(x, y, 3, e, **kw)
        assert h["loss"] == hist["loss"][:e]  # the same training, step for step
        scores.append(macro_f1(predict(c, xv), yv, 3))
        test_preds.append(predict(c, xt))
    best = max(range(E), key=lambda i: (scores[i], -i))  # the first of equal scores
    assert hist["val_macro_f1"] == pytest.approx(scores, abs=1e-12)
    assert hist["epoch"] == best + 1
    assert best + 1 < E  # the last epoch would be the wrong answer
    assert torch.equal(predict(clf, xt), test_preds[best])
    if lr == 0.2:  # a clearly better epoch mid-way: its test predictions are not the last ones
        assert scores[best] > scores[-1] and not torch.equal(test_preds[best], test_preds[-1])


def test_stratified_subset_keeps_every_class():
    y = torch.tensor([0] * 50 + [1] * 10 + [2] * 3)
    idx = stratified_subset(y, 0.1, torch.Generator().manual_seed(0))
    assert torch.bincount(y[idx]).tolist() == [5, 1, 1]  # round(0.3) = 0 -> at least one
    assert len(set(idx.tolist())) == len(idx)
    assert len(stratified_subset(y, 1.0, torch.Generator().manual_seed(0))) == len(y)


def test_extract_features_leaves_the_backbone_alone():
    net = resnet("resnet18").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = tile_loader(DemoTiles(6, seed=0, size=64), 32, 4, 0)
    f, y = extract_features(net, loader, torch.device("cpu"))
    assert f.shape == (6, 512) and f.dtype == torch.float32 and y.tolist() == [0, 1, 2, 3, 4, 5]
    assert net.training  # mode restored
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def demo_probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("lp") / "probe"
    argv = [*SMALL, "--pretrained", "random", "--label-fraction", "10", "100",
            "--runs", "2", "--output-dir", out]
    return out, argv, probe(*argv)


def test_demo_fractions_cache_and_metrics(demo_probe):
    out, argv, first = demo_probe
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "knn_accuracy"):
        assert 0 <= m[key] <= 100
    assert set(m["by_fraction"]) == {"10", "100"} and len(m["runs"]) == 4
    assert m["accuracy"] == m["by_fraction"]["100"]["accuracy"]["mean"]
    # 10 demo tiles per class; --val-fraction 0.25 holds out round(2.5) = 2 of each (12), the
    # 8 left give 10%: round(0.8) -> 1 per class (6) and 100%: 48
    assert (m["num_train"], m["num_val"], m["num_test"]) == (48, 12, 30)
    assert {r["num_train"] for r in m["runs"]} == {6, 48}
    assert all(1 <= r["epoch"] <= 30 and 0 <= r["val_macro_f1"] <= 100 for r in m["runs"])
    assert m["pretrained"] == "random" and m["load_report"]
    assert json.loads((out / "args.json").read_text())["script"] == "linear_probe"
    assert "| 10% | 2 |" in first.stdout
    mtime = (out / "features.pt").stat().st_mtime_ns
    second = probe(*argv)
    assert "reusing cached features" in second.stdout
    assert (out / "features.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "metrics.json").read_text())["runs"] == m["runs"]  # deterministic
    # a cache whose key still matches but whose features are not this network's is caught
    feats = torch.load(out / "features.pt", weights_only=True)
    feats["train"] = (torch.randn_like(feats["train"][0]), feats["train"][1])
    torch.save(feats, out / "features.pt")
    third = probe(*argv)
    assert "differ from a fresh extraction: recomputing" in third.stdout
    assert json.loads((out / "metrics.json").read_text())["runs"] == m["runs"]


def test_torchvision_state_dict_loads_and_gives_its_features(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")  # with fc: the probe ignores it
    out = tmp_path / "probe"
    probe(*SMALL, "--pretrained", tmp_path / "tv.pth", "--runs", "1", "--val-fraction", "0",
          "--output-dir", out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["load_report"].startswith("loaded") and 0 <= m["accuracy"] <= 100
    # --val-fraction 0: all 60 tiles train, the last of the 30 epochs is reported
    assert (m["num_train"], m["num_val"]) == (60, 0)
    assert m["runs"][0]["epoch"] == 30 and m["runs"][0]["val_macro_f1"] is None
    # the cached features are that network's pooled features of the tiles, computed here by hand
    tv.fc = torch.nn.Identity()
    tiles = DemoTiles(60, seed=0, size=64)
    x = torch.stack([torch.from_numpy(np.asarray(tiles[i][0], np.float32) / 255).permute(2, 0, 1)
                     for i in range(3)])
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        want = tv.eval()(x)
    got = torch.load(out / "features.pt", weights_only=True)["train"][0][:3]
    assert torch.allclose(got, want, atol=1e-4)


def test_garbage_checkpoint_is_one_line_exit_2(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"this is not a checkpoint")
    p = run_script("linear_probe.py", *SMALL, "--pretrained", tmp_path / "bad.pth",
                   "--output-dir", tmp_path / "out", check=False)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --pretrained") and "bad.pth" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before any folder was made


def test_folder_tree_with_held_out_fraction(tmp_path):
    rng = np.random.default_rng(0)
    for c, colour in (("pink", (230, 120, 200)), ("blue", (90, 60, 160))):
        (tmp_path / "tiles" / c).mkdir(parents=True)
        for i in range(10):
            a = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / "tiles" / c / f"{i}.png")
    out = tmp_path / "probe"
    probe("--data", "folder", "--data-root", tmp_path / "tiles", "--img-size", "32",
          "--workers", "0", "--runs", "1", "--probe-epochs", "20", "--output-dir", out)
    m = json.loads((out / "metrics.json").read_text())
    # 10 per class: 0.2 -> 2 each tested, 0.25 of the 8 left -> 2 each validate, 6 each train
    assert m["classes"] == ["blue", "pink"]
    assert (m["num_train"], m["num_val"], m["num_test"]) == (12, 4, 4)
    assert m["knn_accuracy"] == 100.0  # two flat colours: trivially separable
    args = argparse.Namespace(data="folder", data_root=tmp_path / "tiles", train_list=None,
                              test_root=tmp_path / "nowhere", skip_bad=False)
    with pytest.raises(DataError, match="--test-root .*nowhere is not an existing folder"):
        datasets(args)
    (tmp_path / "tiles" / "stray.png").write_bytes((tmp_path / "tiles/blue/0.png").read_bytes())
    args.test_root = None
    with pytest.raises(DataError, match="class sub-folder"):
        datasets(args)


# ----------------------------------------------------------------------------- flags and folders
BAD = [("--probe-epochs", "0"), ("--probe-epochs", "-3"), ("--batch-size", "0"),
       ("--batch-size", "1"), ("--runs", "0"), ("--workers", "-1"), ("--knn-k", "0"),
       ("--knn-t", "0"), ("--img-size", "0"), ("--img-size", "16"), ("--demo-size", "0"),
       ("--demo-size", "5"), ("--demo-test-size", "5"), ("--label-fraction", "0"),
       ("--label-fraction", "101"), ("--test-fraction", "0"), ("--test-fraction", "1"),
       ("--val-fraction", "1"), ("--val-fraction", "-0.1"), ("--lr", "0"), ("--lr", "nan"),
       ("--weight-decay", "-1"), ("--seed", "-1"), ("--runs", "two")]


def test_every_nonsense_count_is_refused_naming_its_flag(capsys):
    """get_args is the script's own parser: each bad value exits 2 with one error line naming the
    flag (checked in-process for speed; test_garbage_checkpoint_is_one_line_exit_2 runs the
    command line)."""
    for flag, value in BAD:
        with pytest.raises(SystemExit) as e:
            get_args([flag, value])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, (flag, value)
        assert [line for line in err if "error:" in line] == [err[-1]], (flag, value)
        assert f"error: argument {flag}" in err[-1] and value in err[-1], (flag, value, err[-1])
    for ok in (["--val-fraction", "0"], ["--batch-size", "2"], ["--label-fraction", "100"]):
        get_args(ok)
    with pytest.raises(SystemExit):
        get_args(["--probe-epochs", "0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: argument --probe-epochs: expected a whole number >= 1, got '0'")


def snapshot(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_moco_run_folder_is_refused_and_untouched(tmp_path):
    out = tmp_path / "moco"
    run_script("moco.py", "--data", "demo", "--img-size", "32", "--demo-size", "8",
               "--batch-size", "8", "--queue-size", "16", "--epochs", "1", "--knn-every", "0",
               "--workers", "0", "--output-dir", out)
    before = snapshot(out)
    assert {"args.json", "backbone.pth", "log.jsonl"} <= before.keys()
    with pytest.raises(DataError) as e:  # main_guard prints it as one line, exit 2 (as below)
        probe(*SMALL, "--pretrained", out / "backbone.pth", "--output-dir", out)
    assert str(e.value) == f"{out} holds a moco run; choose another --output-dir"
    assert snapshot(out) == before


def test_probe_folder_is_refused_by_moco_and_untouched(demo_probe):
    out = demo_probe[0]
    before = snapshot(out)
    p = run_script("moco.py", "--data", "demo", "--img-size", "32", "--workers", "0",
                   "--output-dir", out, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (f"error: {out} holds a linear_probe run; "
                                                 "choose another --output-dir")
    assert snapshot(out) == before


def test_failed_start_leaves_no_folder(tmp_path, capsys):
    """An unreadable tile stops feature extraction (after the folder was made): the empty folder
    goes again."""
    for c, grey in (("a", 50), ("b", 200)):
        (tmp_path / "tiles" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), grey, np.uint8)).save(tmp_path / "tiles" / c /
                                                                       f"{i}.png")
    (tmp_path / "tiles" / "b" / "3.png").write_bytes(b"not an image")
    out = tmp_path / "probe"
    from common.train import main_guard  # in this process, as `python linear_probe.py` runs
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: probe("--data", "folder", "--data-root", tmp_path / "tiles",
                                 "--img-size", "32", "--workers", "0", "--output-dir", out))
    assert e.value.code == 2 and "3.png" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


def test_tile_loader_caps_workers_at_the_available_cores(monkeypatch):
    """--workers 8 on a 2-core machine started 8 workers and DataLoader's warning; the loader
    asks for no more than the cores this process may run on (here pretended to be 2, then 1)."""
    import warnings

    import common.knn as knn
    ds = DemoTiles(4, size=32)
    for cores in (2, 1):
        monkeypatch.setattr(knn, "available_cores", lambda: cores)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # DataLoader's "suggested max number of worker"
            loader = tile_loader(ds, 32, 2, 8)
        assert loader.num_workers == cores
    assert tile_loader(ds, 32, 2, 0).num_workers == 0  # fewer than the cores: as asked


# ----------------------------------------------------------------------------- tile stores
def test_stores_give_the_files_features_and_metrics(tmp_path):
    """--data-store / --test-store (tiles packed by common.store) against --data-root /
    --test-root: the same cached features bit for bit and the same metrics; a mismatched
    store is one line naming it."""
    from test_store import pack, write_tree
    train_src = write_tree(tmp_path / "train", n=24)                # 4 per class, 64 px
    test_src = write_tree(tmp_path / "test", n=12, size=48)         # other tiles: 48 px
    train_st, test_st = pack(train_src, tmp_path / "train.store"), pack(test_src, tmp_path / "t.st")
    flags = ["--img-size", "32", "--workers", "0", "--runs", "1", "--probe-epochs", "5",
             "--label-fraction", "50", "100"]
    probe("--data", "folder", "--data-root", train_src, "--test-root", test_src, *flags,
          "--output-dir", tmp_path / "files")
    probe("--data-store", train_st, "--test-store", test_st, *flags,
          "--output-dir", tmp_path / "stores")
    a, b = (torch.load(tmp_path / d / "features.pt", weights_only=True)
            for d in ("files", "stores"))
    for split, n in (("train", 24), ("test", 12)):
        assert a[split][0].shape[0] == n and a[split][0].abs().sum() > 0
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("files", "stores"))
    assert ma["runs"] == mb["runs"] and ma["classes"] == mb["classes"] and ma["num_test"] == 12
    assert mb["data"] == "folder"  # read from the store

    def refused(*argv):
        with pytest.raises(DataError) as e:
            datasets(get_args([*argv, "--output-dir", str(tmp_path / "x")]))
        return str(e.value)

    msg = refused("--data-store", str(train_st), "--test-store", str(train_st))
    assert "--test-store: 24 test tiles are training tiles too" in msg
    msg = refused("--data-store", str(train_st), "--test-store", str(test_st), "--test-root",
                  str(train_src))
    assert msg.startswith(f"--test-root {train_src} differs from the folder --test-store")
    two = tmp_path / "two"                                          # other classes
    for c in ("x", "y"):
        (two / c).mkdir(parents=True)
        Image.new("RGB", (48, 48), "white").save(two / c / "a.png")
    msg = refused("--data-store", str(train_st), "--test-store", str(pack(two, tmp_path / "2.st")))
    assert msg.startswith("--test-store classes ['x', 'y'] differ from the training classes")
    msg = refused("--data", "demo", "--test-store", str(test_st))
    assert msg.startswith("--test-store: --data demo")
    assert "drop --device-crop" in refused("--data-store", str(train_st), "--device-crop")
