"""BYOL's pieces against hand-computed values and brute force, and its runs end to end."""
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
from PIL import Image

import byol
from common import data as cdata
from common import train as ctrain
from tests.conftest import run_script


@pytest.fixture(autouse=True)
def one_thread():
    """In-process forwards on one thread, as run_script's subprocesses: on the 2-core CI machine,
    with a run or another test busy, torch's intra-op threads made these tests 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the loss
def test_regression_loss_hand_computed():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert byol.regression_loss(e1, e1).item() == pytest.approx(0.0, abs=1e-7)   # identical
    assert byol.regression_loss(e1, -e1).item() == pytest.approx(4.0)            # opposite
    assert byol.regression_loss(e1, e2).item() == pytest.approx(2.0)             # orthogonal
    # 45 degrees: 2 - 2 / sqrt(2); and the batch mean of rows (0, 4, 2 - sqrt 2)
    diag = torch.tensor([[1.0, 1.0]])
    assert byol.regression_loss(e1, diag).item() == pytest.approx(2 - math.sqrt(2))
    p = torch.cat([e1, e1, e1])
    z = torch.cat([e1, -e1, diag])
    assert byol.regression_loss(p, z).item() == pytest.approx((0 + 4 + 2 - math.sqrt(2)) / 3)
    # invariant to the scale of either argument (per row), and equal to ||p^ - z^||^2
    torch.manual_seed(0)
    p, z = torch.randn(6, 16), torch.randn(6, 16)
    scale_p, scale_z = torch.rand(6, 1) * 10 + 0.1, torch.rand(6, 1) * 10 + 0.1
    ref = byol.regression_loss(p, z)
    torch.testing.assert_close(byol.regression_loss(p * scale_p, z * scale_z), ref)
    diff = F.normalize(p, dim=1) - F.normalize(z, dim=1)
    torch.testing.assert_close(ref, diff.pow(2).sum(1).mean())


def test_cosine_momentum_schedule():
    m = [ctrain.cosine_momentum(0.996, k, 100) for k in range(101)]
    assert m[0] == pytest.approx(0.996)
    assert m[25] == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)  # 0.996586
    assert m[50] == pytest.approx(0.998)
    assert m[100] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(m, m[1:]))


# ----------------------------------------------------------------------------- the model
def test_target_is_an_exact_frozen_copy_of_backbone_and_projector():
    torch.manual_seed(0)
    model = byol.BYOL(hidden_dim=512, dim=256)
    online, target = model.online.state_dict(), model.target.state_dict()
    assert online.keys() == target.keys()
    assert all(torch.equal(online[k], target[k]) for k in online)
    assert not any(p.requires_grad for p in model.target.parameters())
    # no predictor in the target: it is backbone + projector, and nothing is shared with online
    pred_shapes = [tuple(p.shape) for p in model.predictor.parameters()]
    assert pred_shapes == [(512, 256), (512,), (512,), (512,), (256, 512), (256,)]
    assert not any("predictor" in n for n, _ in model.target.named_modules())
    assert len(list(model.target.parameters())) == len(list(model.online.parameters()))
    assert not {id(p) for p in model.target.parameters()} & {id(p) for p in model.parameters()
                                                             if p.requires_grad}
    # heads: 512-512-BN-ReLU-256 and 256-512-BN-ReLU-256; projector Kaiming (std sqrt(2/fan_in)),
    # predictor N(0, 0.01), biases 0
    proj, pred = model.online[1], model.predictor
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert proj[0].weight.shape == (512, 512) and proj[3].weight.shape == (256, 512)
    assert proj[0].weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.02)
    assert pred[0].weight.std().item() == pytest.approx(0.01, rel=0.03)
    assert all(torch.all(m.bias == 0) for m in (proj[0], proj[3], pred[0], pred[3]))
    # LARS groups: exactly the online network and the predictor; every 1-D parameter (incl. the
    # heads' BN, pitfall P11) without decay or trust ratio
    decay, plain = ctrain.lars_param_groups(model, 1.5e-6)
    trainable = list(model.online.parameters()) + list(model.predictor.parameters())
    assert {id(p) for p in decay["params"] + plain["params"]} == {id(p) for p in trainable}
    assert {id(proj[1].weight), id(pred[1].bias)} <= {id(p) for p in plain["params"]}
    assert all(p.ndim > 1 for p in decay["params"]) and plain["weight_decay"] == 0


def test_forward_is_symmetric_with_per_view_bn():
    torch.manual_seed(1)
    model = byol.BYOL(hidden_dim=32, dim=16)
    model.momentum_update(0.0)  # target = online, then make them differ
    with torch.no_grad():
        for p in model.target.parameters():
            p.mul_(0.9)
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    ref = copy.deepcopy(model)
    loss, parts = model(x1, x2)

    def cos_loss(p, z):  # brute force, row by row
        rows = [2 - 2 * float(p[i] @ z[i] / (p[i].norm() * z[i].norm())) for i in range(len(p))]
        return sum(rows) / len(rows)

    with torch.no_grad():  # each view on its own through every network: BN statistics per view
        p1, p2 = ref.predictor(ref.online(x1)), ref.predictor(ref.online(x2))
        z1, z2 = ref.target(x1), ref.target(x2)
    assert loss.item() == pytest.approx(cos_loss(p1, z2) + cos_loss(p2, z1), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(loss.item())
    with torch.no_grad():  # a joint forward of both views would give another loss
        joint = ref.predictor(ref.online(torch.cat([x1, x2])))
        zj = ref.target(torch.cat([x2, x1]))
    assert abs(cos_loss(joint, zj) * 2 - loss.item()) > 1e-3


def test_one_training_step_updates_target_as_ema_after_the_optimiser_step():
    torch.manual_seed(2)
    model = byol.BYOL(hidden_dim=32, dim=16)
    with torch.no_grad():  # online BN buffers unlike the target's: an EMA of buffers would show
        for name, buf in model.online.named_buffers():
            if "running_mean" in name:
                buf.fill_(5.0)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    old_target = {n: p.clone() for n, p in model.target.named_parameters()}
    old_online = {n: p.clone() for n, p in model.online.named_parameters()}
    target_alone = copy.deepcopy(model.target)  # what the target's own forwards do to its buffers
    with torch.no_grad():
        target_alone(x1), target_alone(x2)

    logged = []
    trainer = types.SimpleNamespace(
        epoch=0, steps_per_epoch=1, global_step=lambda: 0,
        steps=lambda epoch: iter([(0, {"views": [x1, x2]})]),
        check=lambda loss, parts: None, update=lambda parts, lr: logged.append((parts, lr)))
    # the real optimiser step, around the stand-in's check
    trainer.backward_step = lambda *a: ctrain.Trainer.backward_step(trainer, *a)
    run = types.SimpleNamespace(images=lambda v: v, autocast=contextlib.nullcontext)
    args = types.SimpleNamespace(scaled_lr=10.0, epochs=1, warmup_epochs=0, base_momentum=0.5)
    optimizer = ctrain.LARS(ctrain.lars_param_groups(model, 1.5e-6), lr=10.0)
    byol.train_one_epoch(model, optimizer, trainer, run, args)

    m = 0.5  # cosine_momentum(0.5, step 0, ...) = base
    assert logged[0][0]["m"] == m and logged[0][1] == 10.0
    new_online = dict(model.online.named_parameters())
    assert not all(torch.allclose(new_online[n], old_online[n]) for n in old_online)
    after = [old_target[n] * m + (1 - m) * new_online[n] for n in old_target]    # P17 order
    before = [old_target[n] * m + (1 - m) * old_online[n] for n in old_target]   # wrong order
    got = [p for _, p in model.target.named_parameters()]
    for g, e in zip(got, after):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    assert not all(torch.allclose(g, b) for g, b in zip(got, before))
    # buffers: exactly the target's own train-mode forwards, untouched by the EMA
    for (name, b), (_, b_ref) in zip(model.target.named_buffers(), target_alone.named_buffers()):
        assert torch.equal(b, b_ref), name
    assert all(p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


# ----------------------------------------------------------------------------- augmentation
def test_asymmetric_augmentation(monkeypatch):
    view1, view2 = byol.augmentations(32)
    for v in (view1, view2):
        assert v.scale == (0.08, 1.0) and v.interpolation == Image.BICUBIC and v.flip_p == 0.5
    blurred = []
    real_blur = cdata.GaussianBlur.__call__
    monkeypatch.setattr(cdata.GaussianBlur, "__call__",
                        lambda self, img: blurred.append(1) or real_blur(self, img))
    # A white tile: crop, jitter (brightness >= 0.6 -> >= 153; contrast, saturation and hue do
    # nothing to grey), grey and blur keep it uniform and >= 153, so only solarisation takes it
    # below 128 (to 255 - x <= 102).
    white = Image.new("RGB", (48, 48), (255, 255, 255))
    n = 400
    torch.manual_seed(0)
    stats = {}
    for name, view in (("view1", view1), ("view2", view2)):
        blurred.clear()
        means = [view(white)[0].float().mean().item() for _ in range(n)]
        assert all(m >= 153 or m <= 102 for m in means)
        stats[name] = (sum(m < 128 for m in means) / n, len(blurred) / n)
    assert stats["view1"] == (0.0, 1.0)             # never solarised, always blurred
    solarised, blur = stats["view2"]
    assert 0.15 < solarised < 0.25 and 0.05 < blur < 0.15  # p 0.2 and 0.1 (sd 0.02, 0.015)


# ----------------------------------------------------------------------------- runs
TINY = ["--data", "demo", "--demo-size", "24", "--batch-size", "8", "--img-size", "64",
        "--workers", "1", "--epochs", "3"]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expected_schedules(base_lr, steps_per_epoch=3, epochs=3, warmup_epochs=2, base_m=0.996):
    """Per-epoch means of the lr and m the script should have used, written out by hand."""
    total, warm = steps_per_epoch * epochs, warmup_epochs * steps_per_epoch
    lrs, ms = [], []
    for e in range(epochs):
        lr_e, m_e = [], []
        for k in range(e * steps_per_epoch, (e + 1) * steps_per_epoch):
            lr = base_lr * 0.5 * (1 + math.cos(math.pi * e / epochs))
            lr_e.append(lr * (1 - (1 - k / warm) * (1 - 1e-4)) if k < warm else lr)
            m_e.append(1 - (1 - base_m) * (math.cos(math.pi * k / total) + 1) / 2)
        lrs.append(np.mean(lr_e))
        ms.append(np.mean(m_e))
    return lrs, ms


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("byol_ref")
    run_script("byol.py", *TINY, "--output-dir", out)
    return out


def test_run_writes_the_contract_files_and_logs_schedules(reference):
    assert sorted(p.name for p in reference.iterdir()) == \
        ["args.json", "backbone.pth", "checkpoint.pth", "log.jsonl"]
    rows = log(reference)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert 3.0 < rows[0]["loss"] < 5.0  # random predictions: cos ~ 0, two terms of ~2
    assert all({"loss", "m", "std", "lr", "img_per_s", "data_time"} <= r.keys() for r in rows)
    lrs, ms = expected_schedules(0.2 * 8 / 1024)
    assert [r["lr"] for r in rows] == pytest.approx(lrs, rel=1e-9)
    assert [r["m"] for r in rows] == pytest.approx(ms, rel=1e-12)
    args = json.loads((reference / "args.json").read_text())
    assert args["weight_decay"] == 1.5e-6 and args["warmup_epochs"] == 2 and args["dim"] == 256


def test_backbone_is_the_online_resnet_and_loads_into_torchvision(reference):
    res = torchvision.models.resnet18().load_state_dict(load(reference / "backbone.pth"),
                                                        strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    model = load(reference / "checkpoint.pth")["model"]
    def part(prefix):
        return {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
    assert same(part("online.0."), load(reference / "backbone.pth"))
    assert not same(part("target.0."), part("online.0."))  # the EMA lags behind
    assert not any(k.startswith("target.") and "predictor" in k for k in model)


def test_preempted_run_resumes_to_identical_weights(reference, tmp_path):
    p = run_script("byol.py", *TINY, "--output-dir", tmp_path, "--stop-after-steps", "4")
    assert "stopped by --stop-after-steps at epoch 1 step 1" in p.stdout
    p = run_script("byol.py", *TINY, "--output-dir", tmp_path)
    assert "resumed from" in p.stdout and "epoch 1, step 1" in p.stdout
    assert same(load(tmp_path / "backbone.pth"), load(reference / "backbone.pth"))
    # the target too: its momentum came from the global step, not from saved state
    assert same(load(tmp_path / "checkpoint.pth")["model"],
                load(reference / "checkpoint.pth")["model"])
    assert [r["loss"] for r in log(tmp_path)] == [r["loss"] for r in log(reference)]


def test_two_processes_gloo_and_resume(reference, tmp_path):
    two = ["byol.py", *TINY, "--batch-size", "4"]
    p = run_script(*two, "--output-dir", tmp_path / "ref", nproc=2)
    assert "global batch 8 = 2 x 4" in p.stdout
    rows, ref = log(tmp_path / "ref"), log(reference)
    # same global batch: same steps per epoch, lr and EMA momentum as the single process
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref]
    assert [r["m"] for r in rows] == [r["m"] for r in ref]
    assert all(np.isfinite(r["loss"]) for r in rows)
    res = torchvision.models.resnet18().load_state_dict(load(tmp_path / "ref" / "backbone.pth"),
                                                        strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    run_script(*two, "--output-dir", tmp_path / "cut", "--stop-after-steps", "4", nproc=2)
    run_script(*two, "--output-dir", tmp_path / "cut", nproc=2)
    assert same(load(tmp_path / "cut" / "checkpoint.pth")["model"],
                load(tmp_path / "ref" / "checkpoint.pth")["model"])


def test_head_bn_normalises_in_groups_of_the_per_gpu_batch():
    # With 2 head-BN groups the projector on 8 images equals a plain-BN projector run on each
    # group of 4 (images 0, 2, 4, 6 and 1, 3, 5, 7), as on 2 GPUs of 4 images each
    torch.manual_seed(0)
    split = byol.BYOL(hidden_dim=32, dim=16, head_bn_splits=2).online[1]
    plain = byol.mlp(512, 32, 16, "kaiming")
    plain.load_state_dict(split.state_dict())
    x = torch.randn(8, 512)
    out = split(x)
    for g in range(2):
        assert torch.allclose(out[g::2], plain(x[g::2]), atol=1e-5)
    assert not torch.allclose(out, plain(x), atol=1e-3)  # one BN over all 8 differs


def test_head_bn_group_flag_sets_the_splits(tmp_path):
    from tests.conftest import run_script
    import json
    run_script("byol.py", "--data", "demo", "--demo-size", "16", "--batch-size", "8",
               "--img-size", "64", "--epochs", "1", "--workers", "0", "--knn-every", "0",
               "--head-bn-group", "4", "--output-dir", tmp_path)
    assert json.loads((tmp_path / "args.json").read_text())["head_bn_splits"] == 2
    p = run_script("byol.py", "--data", "demo", "--demo-size", "16", "--batch-size", "8",
                   "--img-size", "64", "--epochs", "1", "--workers", "0", "--head-bn-group", "3",
                   "--output-dir", tmp_path / "b", check=False)
    assert p.returncode == 2 and "--head-bn-group 3" in p.stderr
