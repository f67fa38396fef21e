"""The online kNN monitor: logged when labels exist, off without them, and invisible to training
(the same weights with and without it)."""
import json

import torch
from PIL import Image

from conftest import run_script

FAST = ["--epochs", "2", "--batch-size", "16", "--img-size", "64", "--queue-size", "32",
        "--workers", "0", "--demo-size", "32"]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_monitor_logs_and_does_not_touch_training(tmp_path):
    run_script("moco.py", *FAST, "--knn-every", "1", "--output-dir", tmp_path / "on")
    run_script("moco.py", *FAST, "--knn-every", "0", "--output-dir", tmp_path / "off")
    on, off = log(tmp_path / "on"), log(tmp_path / "off")
    assert all(0 <= r["knn_accuracy"] <= 100 for r in on) and len(on) == 2
    assert all("knn_accuracy" not in r for r in off)
    a = torch.load(tmp_path / "on" / "backbone.pth")
    b = torch.load(tmp_path / "off" / "backbone.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_monitor_every_n_and_last_epoch(tmp_path):
    run_script("moco.py", *FAST[:1], "3", *FAST[2:], "--knn-every", "2",
               "--output-dir", tmp_path / "r")
    assert ["knn_accuracy" in r for r in log(tmp_path / "r")] == [False, True, True]


def test_monitor_off_without_labels(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(16):  # images directly under the root: no class folders, label -1
        Image.new("RGB", (64, 64), (i * 10, 100, 200 - i * 10)).save(flat / f"{i}.png")
    p = run_script("moco.py", *FAST, "--data", "folder", "--data-root", flat, "--knn-every", "1",
                   "--output-dir", tmp_path / "r")
    assert "kNN monitor off" in p.stdout
    assert all("knn_accuracy" not in r for r in log(tmp_path / "r"))
