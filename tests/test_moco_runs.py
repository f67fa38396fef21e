"""moco.py end to end as a user runs it: demo data, 1 and 2 processes, pre-emption and exact
resume, the backbone export, and the one-line errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tests.conftest import MOCO_TWO, REPO, run_main, run_script

TINY = ["--data", "demo", "--demo-size", "24", "--batch-size", "8", "--img-size", "64",
        "--queue-size", "64", "--workers", "1"]


def backbone(out):
    return torch.load(out / "backbone.pth", map_location="cpu")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run (3 steps per epoch) that the resume tests must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    run_script("moco.py", *TINY, "--epochs", "3", "--output-dir", out)
    return out


def test_demo_run_writes_the_contract_files(reference):
    assert sorted(p.name for p in reference.iterdir()) == \
        ["args.json", "backbone.pth", "checkpoint.pth", "log.jsonl"]
    rows = log(reference)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"loss", "acc", "lr", "img_per_s", "data_time", "chance_loss"} <= r.keys()
        assert np.isfinite(r["loss"]) and 0 <= r["acc"] <= 100
    assert rows[0]["chance_loss"] == pytest.approx(np.log(65))
    # per-epoch cosine from 0.03 * 8 / 256
    assert [r["lr"] for r in rows] == pytest.approx(
        [0.03 * 8 / 256 * 0.5 * (1 + np.cos(np.pi * e / 3)) for e in range(3)])
    args = json.loads((reference / "args.json").read_text())
    assert args["version"] == "v2" and args["temperature"] == 0.2 and args["bn_splits"] == 1


def test_backbone_loads_into_torchvision_resnet18_missing_only_fc(reference):
    net = torchvision.models.resnet18()
    res = net.load_state_dict(backbone(reference), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    ck = torch.load(reference / "checkpoint.pth", map_location="cpu", weights_only=False)
    enc = {k[len("encoder_q.0."):]: v for k, v in ck["model"].items() if k.startswith("encoder_q.0.")}
    assert same_weights(enc, backbone(reference))  # the query encoder's backbone is exported
    assert not same_weights(backbone(reference), torchvision.models.resnet18().state_dict())


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """(folder, stdout) of the reference's command stopped after 4 steps ("SIGTERM" at epoch 1,
    step 1: a mid-epoch checkpoint), left as it stopped; tests work on copies of it."""
    out = tmp_path_factory.mktemp("preempted") / "run"
    p = run_script("moco.py", *TINY, "--epochs", "3", "--output-dir", out,
                   "--stop-after-steps", "4")
    return out, p.stdout


def test_preempted_run_resumes_to_identical_weights(reference, preempted, tmp_path):
    # "SIGTERM" after 4 steps: epoch 1, step 1 -> mid-epoch checkpoint, exit, rerun.
    shutil.copytree(preempted[0], tmp_path, dirs_exist_ok=True)
    assert "stopped by --stop-after-steps at epoch 1 step 1" in preempted[1]
    assert not (tmp_path / "backbone.pth").exists() or len(log(tmp_path)) == 1
    p = run_script("moco.py", *TINY, "--epochs", "3", "--output-dir", tmp_path)
    assert "resumed from" in p.stdout and "epoch 1, step 1" in p.stdout
    assert same_weights(backbone(tmp_path), backbone(reference))
    assert [r["loss"] for r in log(tmp_path)] == [r["loss"] for r in log(reference)]


def _wait_for(path, proc, seconds=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < seconds
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_identical_weights(reference, tmp_path, sig):
    cmd = [sys.executable, "moco.py", *TINY, "--epochs", "3", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # as run_script
    _wait_for(tmp_path / "checkpoint.pth", proc)  # after epoch 0: kill it somewhere in epoch 1
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM and proc.returncode != 0:  # it may have finished already
        assert proc.returncode == 143 and "stopped by SIGTERM" in out, err
    run_script(*cmd[1:])
    assert same_weights(backbone(tmp_path), backbone(reference))


def test_two_processes_gloo_and_resume(moco_two_reference, tmp_path):
    ref, stdout = moco_two_reference  # the uninterrupted run test_cluster's SIGTERM test shares
    assert "global batch 8 = 2 x 4" in stdout and "2 steps/epoch" in stdout
    assert len(log(ref)) == 3 and "knn_accuracy" in log(ref)[-1]
    cut = tmp_path / "cut"
    p = run_script(*MOCO_TWO, "--output-dir", cut, "--stop-after-steps", "3", nproc=2)
    assert "stopped by --stop-after-steps at epoch 1 step 1" in p.stdout  # inside an epoch
    run_script(*MOCO_TWO, "--output-dir", cut, nproc=2)
    assert same_weights(backbone(cut), backbone(ref))
    # the interrupted epoch's line too: every rank's partial sums came back (not rank 0's twice)
    timing = ("img_per_s", "data_time", "step_time_s")
    for a, b in zip(log(cut), log(ref), strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == \
            pytest.approx({k: v for k, v in b.items() if k not in timing}, rel=1e-9)


def test_moco_v1_runs(tmp_path):
    run_script("moco.py", *TINY, "--version", "v1", "--epochs", "1", "--output-dir", tmp_path)
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["temperature"] == 0.07 and args["schedule"] == "step"
    assert args["lr_steps"] == [1, 1]  # 0.6 and 0.8 of 1 epoch, rounded


def one_error_line(p):
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("warning")]
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    return lines[0]


def test_bad_input_gives_one_clear_line(tmp_path, monkeypatch, capsys):
    code, err = run_main("moco.py", ["--data", "nct", "--data-root", tmp_path / "missing",
                                     "--output-dir", tmp_path / "o"], monkeypatch, capsys)
    assert "--data-root" in one_error_line(subprocess.CompletedProcess([], code, "", err)) \
        and "does not exist" in err  # in this process; the next two are fresh processes
    (tmp_path / "imgs").mkdir()
    for i in range(10):
        Image.fromarray(np.full((72, 72, 3), 20 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "imgs" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    small = ["--data", "folder", "--data-root", tmp_path / "imgs", "--batch-size", "4",
             "--img-size", "32", "--queue-size", "8", "--epochs", "1", "--workers", "1"]
    p = run_script("moco.py", *small, "--output-dir", tmp_path / "o2", check=False)
    line = one_error_line(p)  # a broken header: named at dataset build, before any training
    assert p.returncode == 2 and "not readable images: 3.png" in line
    # a header that reads but pixels that do not: found when the sampler draws it
    good = (tmp_path / "imgs" / "4.png").read_bytes()
    (tmp_path / "imgs" / "3.png").write_bytes(good[:60])
    p = run_script("moco.py", *small, "--output-dir", tmp_path / "o3", check=False)
    line = one_error_line(p)
    assert p.returncode == 2 and "unreadable image" in line and "3.png" in line
    p = run_script("moco.py", *small, "--output-dir", tmp_path / "o4", "--skip-bad")
    assert "unreadable images skipped" in p.stdout and log(tmp_path / "o4")[0]["skipped"] >= 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(preempted, tmp_path):
    shutil.copytree(preempted[0], tmp_path, dirs_exist_ok=True)  # a checkpoint at epoch 1, step 1
    before = (tmp_path / "checkpoint.pth").read_bytes()
    p = run_script("moco.py", *TINY, "--epochs", "3", "--output-dir", tmp_path, "--lr", "1e38",
                   check=False)
    assert p.returncode == 1 and "non-finite loss" in one_error_line(p) and "acc" in p.stderr
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
