"""SimCLR's loss by hand, by brute force and across two processes; its runs end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import default_collate

import simclr
from common import augment as A
from common import data as cdata
from common import dist as cdist
from common import train as ctrain
from common.demo import DemoTiles
from tests.conftest import free_port, run_script
from tests.test_store import tiny_store  # noqa: F401 - the 16 tiles and their store


def test_nt_xent_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])   # normalisation must not matter
    z2 = torch.tensor([[3.0, 0.0], [0.0, -1.0]])
    T = 0.5
    # normalised rows: a=(1,0) b=(0,1) | a'=(1,0) b'=(0,-1); cosines a.b=0 a.a'=1 a.b'=0,
    # b.a'=0 b.b'=-1, a'.b'=0
    def ce(pos, others):
        return -pos / T + math.log(sum(math.exp(v / T) for v in [pos] + others))
    expected = (ce(1, [0, 0]) + ce(-1, [0, 0]) + ce(1, [0, 0]) + ce(-1, [0, 0])) / 4
    assert simclr.nt_xent(z1, z2, T).item() == pytest.approx(expected, rel=1e-6)


def brute_force(z1, z2, T):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        others = [z[i] @ z[m] / T for m in range(n2) if m != i]
        total = total - z[i] @ z[j] / T + torch.logsumexp(torch.stack(others), 0)
    return total / n2


def test_nt_xent_matches_brute_force_and_world_size_one():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(simclr.nt_xent(z1, z2, 0.1), brute_force(z1, z2, 0.1))
    torch.testing.assert_close(simclr.distributed_nt_xent(z1, z2, 0.1), simclr.nt_xent(z1, z2, 0.1))


def _worker(rank, world, port, z1, z2, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cdist.init_distributed()
    n = z1.shape[0] // world
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = simclr.distributed_nt_xent(a, b, 0.1)
    loss.backward()
    results.put((rank, loss.item(), a.grad.tolist(), b.grad.tolist()))  # plain data: the process ends
    cdist.cleanup()


def test_two_processes_equal_one_process_on_the_whole_batch():
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, free_port(), z1, z2, results), nprocs=2,
                       start_method="spawn")
    got = sorted(results.get() for _ in range(2))
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = simclr.nt_xent(a, b, 0.1)
    full.backward()
    # DDP averages over ranks: the mean of the two losses and half of each rank's gradient
    # (which holds both ranks' contributions through the all-reducing gather) are the full ones
    assert (got[0][1] + got[1][1]) / 2 == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(torch.tensor(got[0][2] + got[1][2]) / 2, a.grad)
    torch.testing.assert_close(torch.tensor(got[0][3] + got[1][3]) / 2, b.grad)


def test_lars_excludes_bn_and_bias():
    model = simclr.SimCLR()
    decay, plain = ctrain.lars_param_groups(model, 1e-6)
    assert all(p.ndim > 1 for p in decay["params"]) and decay["lars"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bn" in names[id(p)] or "downsample.1" in names[id(p)] or "head.1" in names[id(p)]
               or "head.4" in names[id(p)] for p in plain["params"])
    assert plain["weight_decay"] == 0 and not plain["lars"]


# ----------------------------------------------------------------------------- --aug histo
class OldRandomRot90:
    """simclr.py's rotation before issue 25 (with T.RandomVerticalFlip(0.5) after it, on PIL):
    the reference RotateFlip must reproduce."""

    def __call__(self, img):
        k = int(torch.randint(4, ()))
        turns = (Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)
        return img.transpose(turns[k - 1]) if k else img


def test_rotate_flip_on_the_device_equals_pil_in_all_eight_cases():
    """One batch holding the 8 (k, vflip) cases of an image whose pixels are all distinct (red =
    column, green = row): apply_batch equals apply_pil per sample, and the geometry is PIL's:
    ROTATE_90 turns counter-clockwise (the top-right corner goes to the top left)."""
    g = simclr.RotateFlip()
    r, c = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    img = torch.stack([c * 8, r * 8, (3 * r + 5 * c) % 256]).to(torch.uint8)   # (3, 32, 32)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    params = torch.tensor([[k, f] for k in range(4) for f in (0, 1)], dtype=torch.float64)
    batch = img.expand(8, -1, -1, -1).contiguous()
    got = g.apply_batch(batch, params)
    assert got.dtype == torch.uint8 and torch.equal(batch, img.expand(8, -1, -1, -1))
    for n, p in enumerate(params):
        want = torch.from_numpy(np.array(g.apply_pil(pil, p))).permute(2, 0, 1)
        assert torch.equal(got[n], want), p.tolist()
    assert len({bytes(v.numpy()) for v in got}) == 8
    assert torch.equal(got[0], img) and torch.equal(got[1], img.flip(1))   # k 0: as is, vflip
    assert torch.equal(got[2][:, 0, 0], img[:, 0, 31])       # k 1: top right -> top left
    assert torch.equal(got[3][:, 31, 0], img[:, 0, 31])      # and flipped: bottom left
    assert torch.equal(got[4], img.flip(1, 2))               # k 2: half a turn


def test_histo_views_are_todays_pil_pipeline_seed_for_seed():
    """RotateFlip draws what RandomRot90 and T.RandomVerticalFlip(0.5) drew, in their order
    (all 8 cases come up), and the histo views on the default path (PIL, photometric ops in
    the loader) equal those of the T.Compose pipeline it replaced, bit for bit."""
    g, seen = simclr.RotateFlip(), set()
    for seed in range(64):
        torch.manual_seed(seed)
        p, after = g.sample(), torch.rand(1)
        torch.manual_seed(seed)
        k, f = int(torch.randint(4, ())), bool(torch.rand(1) < 0.5)
        assert p.dtype == torch.float64 and p.tolist() == [k, f]
        assert torch.equal(torch.rand(1), after)  # the same number of draws
        seen.add((k, f))
    assert len(seen) == 8
    view = simclr.augmentation("histo", 32, blur_kernel=3)
    old = cdata.View(32, view.scale, photometric=view.photometric,
                     geometric=T.Compose([OldRandomRot90(), T.RandomVerticalFlip(0.5)]))
    base = DemoTiles(n=8, seed=1, size=48)
    new_ds, old_ds = (cdata.MultiViewDataset(base, [v, v], seed=5) for v in (view, old))
    for ds in (new_ds, old_ds):
        ds.set_epoch(3)
    for i in range(8):
        a, b = new_ds[i], old_ds[i]
        assert all(torch.equal(x, y) for k in ("views", "boxes") for x, y in zip(a[k], b[k]))
        assert a["flips"] == b["flips"]


def test_histo_with_device_crop_from_a_store_equals_the_files(tiny_store):
    """Issue 25: --aug histo from the store with --device-crop (crop, flip, rotation and
    vertical flip on the device) against the files with --device-aug (all of it on PIL in the
    loader): the same numbers and, once the device ran its ops, the same images bit for bit."""
    src, packed = tiny_store
    st = cdata.StoreTiles(packed)
    st.device_crop = True  # as --device-crop sets it
    view = simclr.augmentation("histo", 32, blur_kernel=3)
    files, tiles = (cdata.MultiViewDataset(b, [view, view], seed=2)
                    for b in (cdata.folder_dataset(src), st))
    for ds in (files, tiles):
        ds.set_epoch(1)
    ref, dev = (A.DeviceAugment(ds, torch.device("cpu")) for ds in (files, tiles))
    cases = set()
    for b, batch in enumerate(torch.utils.data.DataLoader(tiles, batch_size=8)):
        fb = default_collate([files[i] for i in range(8 * b, 8 * b + 8)])
        for k in ("boxes", "flips", "photo"):
            assert all(torch.equal(x, y) for x, y in zip(batch[k], fb[k])), k
        assert all(torch.equal(x, y) for x, y in zip(dev(batch), ref(fb)))
        cases |= {tuple(p) for p in batch["geo"][0].tolist()}
    assert len(cases) >= 4  # rotations and flips of both kinds in play


# ----------------------------------------------------------------------------- runs
SIZES = ["--batch-size", "8", "--img-size", "32", "--workers", "1", "--epochs", "2",
         "--warmup-epochs", "1"]
TINY = ["--data", "demo", "--demo-size", "16", *SIZES]


def test_runs_single_two_processes_resume_and_histo(tmp_path, tiny_store):
    """histo on test_store's 16 tiles, from the files with --device-aug and from their store
    with --device-crop: the same model bit for bit. Two processes, killed mid-epoch and
    resumed: the uninterrupted run's backbone."""
    src, packed = tiny_store
    histo = ["simclr.py", *SIZES, "--aug", "histo"]
    run_script(*histo, "--data", "folder", "--data-root", src, "--device-aug",
               "--output-dir", tmp_path / "files")
    run_script(*histo, "--data-store", packed, "--device-crop", "--output-dir", tmp_path / "one")
    rows = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["chance_loss"] == pytest.approx(math.log(15))
    assert rows[0]["lr"] < rows[1]["lr"]  # warm-up epoch, then the cosine's first epoch
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=False)["model"]
            for d in ("files", "one"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    two = ["simclr.py", *TINY, "--batch-size", "4"]  # 2 steps an epoch
    run_script(*two, "--output-dir", tmp_path / "ref", nproc=2)
    run_script(*two, "--output-dir", tmp_path / "cut", "--stop-after-steps", "3", nproc=2)
    run_script(*two, "--output-dir", tmp_path / "cut", nproc=2)
    a, b = (torch.load(tmp_path / d / "backbone.pth") for d in ("ref", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
