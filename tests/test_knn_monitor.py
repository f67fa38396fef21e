"""The online kNN monitor: logged when labels exist, off without them, invisible to training
(the same weights with and without it), equal to the kNN accuracy of the exported backbone on
one and two processes, and safe to pre-empt."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import IMAGENET_MEAN, IMAGENET_STD, sample_seed
from common.demo import DemoTiles
from common.models import resnet
from conftest import run_script

FAST = ["--epochs", "2", "--batch-size", "16", "--img-size", "64", "--queue-size", "32",
        "--workers", "0", "--demo-size", "32"]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def knn_of_exported_backbone(out):
    """20-NN accuracy of out/backbone.pth on the monitor's demo bank and queries, computed here
    from scratch: own preprocessing, full similarity matrix, a vote per query."""
    args = json.loads((out / "args.json").read_text())
    net = resnet(args["arch"])
    net.load_state_dict(torch.load(out / "backbone.pth"))
    net.eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def embed(tiles):
        x = torch.stack([torch.from_numpy(np.asarray(tiles[i][0]).copy()).permute(2, 0, 1)
                         for i in range(len(tiles))]).float() / 255
        with torch.no_grad():
            f = net((x - mean) / std)
        return f / f.norm(dim=1, keepdim=True), torch.tensor(tiles.targets)

    bank_f, bank_y = embed(DemoTiles(180, sample_seed(args["seed"], 1), args["img_size"]))
    query_f, query_y = embed(DemoTiles(90, sample_seed(args["seed"], 2), args["img_size"]))
    correct = 0
    for f, y in zip(query_f, query_y):
        sims = (bank_f @ f).tolist()
        top = sorted(range(len(sims)), key=lambda j: -sims[j])[:20]
        votes = {}
        for j in top:
            votes[int(bank_y[j])] = votes.get(int(bank_y[j]), 0.0) + float(np.exp(sims[j] / 0.07))
        correct += max(votes, key=votes.get) == int(y)
    return 100 * correct / len(query_y)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """A 2-epoch demo MoCo run with the monitor after every epoch (shared: the SIGTERM test's
    uninterrupted run is this one)."""
    out = tmp_path_factory.mktemp("knn") / "on"
    run_script("moco.py", *FAST, "--knn-every", "1", "--output-dir", out)
    return out


def test_monitor_logs_and_does_not_touch_training(monitored, tmp_path):
    run_script("moco.py", *FAST, "--knn-every", "0", "--output-dir", tmp_path / "off")
    on, off = log(monitored), log(tmp_path / "off")
    assert len(on) == 2
    # the logged value is the kNN accuracy of the backbone exported at that epoch (one query
    # of 90 may flip on a float-level tie between batched and unbatched features)
    assert abs(on[-1]["knn_accuracy"] - knn_of_exported_backbone(monitored)) <= 100 / 90 + 1e-6
    assert all("knn_accuracy" not in r for r in off)
    a = torch.load(monitored / "backbone.pth")
    b = torch.load(tmp_path / "off" / "backbone.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_monitor_every_n_and_last_epoch(tmp_path):
    run_script("moco.py", *FAST[:1], "3", *FAST[2:], "--knn-every", "2",
               "--output-dir", tmp_path / "r")
    assert ["knn_accuracy" in r for r in log(tmp_path / "r")] == [False, True, True]


def test_monitor_off_without_labels(tmp_path, capsys):
    """In this process: the Trainer builds the monitor with KNNMonitor.build and logs
    knn_accuracy only when it got one."""
    import argparse

    from common import data as cdata
    from common.train import KNNMonitor
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(16):  # images directly under the root: no class folders, label -1
        Image.new("RGB", (64, 64), (i * 10, 100, 200 - i * 10)).save(flat / f"{i}.png")
    args = argparse.Namespace(knn_every=1, data="folder", seed=0, knn_size=12, knn_data_root=None,
                              workers=0, img_size=64)
    run = argparse.Namespace(args=args, rank=0, world=1, device=torch.device("cpu"), print=print)
    assert KNNMonitor.build(run, cdata.folder_dataset(flat)) is None
    assert "kNN monitor off" in capsys.readouterr().out


def moco_with_monitor_hook(path, hook):
    """A moco.py whose kNN monitor first runs `hook` (Python lines with `self`, `backbone`,
    `os`, `signal`, `sys`, `torch` in scope): the test reaches inside the run it launches."""
    path.write_text("import os, signal, sys\nsys.path.insert(0, os.getcwd())\nimport torch\n"
                    "import common.train as ct\nimport moco\n"
                    "original = ct.KNNMonitor.__call__\n"
                    "def hooked(self, backbone):\n"
                    + "".join(f"    {line}\n" for line in hook) +
                    "    return original(self, backbone)\n"
                    "ct.KNNMonitor.__call__ = hooked\nct.main_guard(moco.main)\n")
    return path


def test_monitor_on_two_processes_scores_the_exported_backbone(tmp_path):
    # Without SyncBN every process keeps its own BN running statistics and backbone.pth holds
    # rank 0's; the monitor must score those, over the whole bank and query set in order. Rank
    # 1's statistics are made grossly wrong just before each monitor (they play no part in
    # training, which normalises with batch statistics): a monitor that used them would be far off.
    wrapper = moco_with_monitor_hook(tmp_path / "moco_rank1_bn_off.py", [
        "if self.run.rank == 1:",
        "    for m in backbone.modules():",
        "        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):",
        "            m.running_mean.add_(3.0)",
        "            m.running_var.mul_(50.0)"])
    out = tmp_path / "r"
    run_script(wrapper, *FAST, "--batch-size", "8", "--knn-every", "1", "--output-dir", out,
               nproc=2)
    logged = [r["knn_accuracy"] for r in log(out)]
    assert len(logged) == 2
    assert abs(logged[-1] - knn_of_exported_backbone(out)) <= 100 / 90 + 1e-6


def test_sigterm_during_the_monitor_keeps_the_finished_epoch(monitored, tmp_path):
    # The scheduler pre-empts while epoch 0's monitor runs: the epoch's steps are done, so its
    # checkpoint, log line and backbone must be written before the exit, and the rerun must
    # finish exactly as an uninterrupted run.
    wrapper = moco_with_monitor_hook(tmp_path / "moco_sigterm_in_monitor.py", [
        "if not os.path.exists(os.path.join(sys.argv[-1], 'checkpoint.pth')):  # epoch 0 only",
        "    os.kill(os.getpid(), signal.SIGTERM)"])
    args = [*FAST, "--knn-every", "1", "--output-dir"]
    p = run_script(wrapper, *args, tmp_path / "cut", check=False)
    assert p.returncode == 143 and "stopped by SIGTERM at the end of epoch 0" in p.stdout, p.stdout
    assert [r["epoch"] for r in log(tmp_path / "cut")] == [0]
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=False)["epoch"] == 1
    run_script("moco.py", *args, tmp_path / "cut")
    straight = monitored  # the same flags, never interrupted

    def numbers(out):  # everything but timings
        return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k}
                for r in log(out)]
    assert numbers(tmp_path / "cut") == numbers(straight)
    a = torch.load(tmp_path / "cut" / "backbone.pth")
    b = torch.load(straight / "backbone.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_monitor_reads_a_store_as_the_files(tmp_path):
    """--data-store: the monitor draws its bank and queries from the store's tiles (the
    training dataset) and gets the files' features and accuracy exactly."""
    import argparse

    from common import data as cdata
    from common.train import KNNMonitor
    from test_store import pack, write_tree
    src = write_tree(tmp_path / "src", n=24)
    files, st = cdata.folder_dataset(src), cdata.StoreTiles(pack(src, tmp_path / "s.store"))
    args = argparse.Namespace(knn_every=1, data="folder", seed=0, knn_size=12, knn_data_root=None,
                              workers=0, img_size=32)
    run = argparse.Namespace(args=args, rank=0, world=1, device=torch.device("cpu"), print=print)
    torch.manual_seed(0)
    net = resnet("resnet18")
    a, b = KNNMonitor.build(run, files), KNNMonitor.build(run, st)
    assert len(a.bank) == 12 and len(a.queries) == 4
    for x, y in ((a.bank, b.bank), (a.queries, b.queries)):
        fx, fy = a._embed(net, x), b._embed(net, y)
        assert fx[0].abs().sum() > 0 and torch.equal(fx[0], fy[0]) and torch.equal(fx[1], fy[1])
    assert a(net) == b(net)
