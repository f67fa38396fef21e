"""common.store and --data-store: a store holds the decoded tiles bit for bit (lossless PNG and
the real NCT TIFFs), its views equal the files' views, a killed pack continues where it stopped,
a truncated / corrupt / stale / unfinished store and a folder of mixed sizes get one line naming
what to do; --device-crop draws the same numbers and gives the same pixels as the files'
--device-aug. The script runs from a store are in test_augment (its --device-aug runs read the
store packed here)."""
import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

import byol
import moco
from common import augment as A
from common import data as cdata
from common import store
from common.demo import DemoTiles


def write_tree(root, n=16, size=64):
    """n demo tiles as PNG in class folders (--data folder), like a small NCT tree."""
    base = DemoTiles(n=n, seed=3, size=size)
    for i in range(n):
        img, y = base[i]
        p = Path(root) / base.classes[y] / f"t{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)
    return Path(root)


def namespace(root, out):
    return argparse.Namespace(data="folder", data_root=str(root), train_list=None,
                              skip_bad=False, out=str(out), workers=0, data_store=None,
                              device_crop=False)


def pack(root, out, *extra):
    rc = store.main(["--data", "folder", "--data-root", str(root), "--out", str(out),
                     "--workers", "0", *extra])
    assert rc == 0
    return Path(out)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """(source tree, store) of 16 demo tiles at 64 px; shared with test_augment's runs."""
    d = tmp_path_factory.mktemp("store")
    src = write_tree(d / "src")
    return src, pack(src, d / "tiles.store")


def test_store_holds_the_decoded_tiles_and_gives_the_files_views(tiny_store):
    src, out = tiny_store
    files, st = cdata.folder_dataset(src), cdata.StoreTiles(out)
    assert st.paths == files.paths and st.targets == files.targets and st.classes == files.classes
    assert st.tiles.shape == (16, 64, 64, 3)
    t = st.tile(0)  # a read-only shared map: a write cannot reach the file
    with pytest.raises(ValueError, match="read-only"):
        t[0, 0, 0] ^= 255
    st = cdata.StoreTiles(out)
    for i in range(len(files)):
        assert np.array_equal(st.tile(i), np.asarray(Image.open(files.paths[i]).convert("RGB")))
    views = list(byol.augmentations(32)) + [moco.augmentation("v2", 32)]
    a, b = (cdata.MultiViewDataset(ds, views, seed=5) for ds in (files, st))
    for ds in (a, b):
        ds.set_epoch(3)
    for i in range(len(files)):
        sa, sb = a[i], b[i]
        assert all(torch.equal(x, y) for x, y in zip(sa["views"], sb["views"]))
        assert all(torch.equal(x, y) for x, y in zip(sa["boxes"], sb["boxes"]))
        assert sa["flips"] == sb["flips"] and sa["label"] == sb["label"]


def test_real_nct_tiff_tiles_pack_bit_identical(shared_samples, tmp_path):
    src = tmp_path / "nct"
    for p in sorted((shared_samples / "nct_crc_he").glob("*.tif")):
        cls = p.name.split("-")[0]
        (src / cls).mkdir(parents=True)
        shutil.copy2(p, src / cls / p.name)
    out = tmp_path / "nct.store"
    assert store.main(["--data", "nct", "--data-root", str(src), "--out", str(out),
                       "--workers", "1"]) == 0
    st, files = cdata.StoreTiles(out), cdata.nct_dataset(src)
    assert len(st) == len(files) == 2 and st.targets == files.targets
    for i in range(2):
        assert np.array_equal(st.tile(i), np.asarray(cdata.read_rgb(files.paths[i])))
    assert store.verify(out) == 0
    # with --train-list: a list changed since packing makes the store stale
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{Path(q).parent.name}/{Path(q).name}\n" for q in files.paths))
    assert store.main(["--data", "nct", "--data-root", str(src), "--train-list", str(lst),
                       "--out", str(tmp_path / "l.store"), "--workers", "0"]) == 0
    cdata.StoreTiles(tmp_path / "l.store")
    lst.write_text(lst.read_text().splitlines()[0] + "\n")
    with pytest.raises(cdata.DataError, match=r"is stale: --train-list .*train.txt changed since "
                                              r"packing; delete .* and pack it again: "):
        cdata.StoreTiles(tmp_path / "l.store")


def test_a_killed_pack_continues_where_it_stopped(tiny_store, tmp_path, monkeypatch):
    src, done = tiny_store
    decode, calls = store._decode, []

    def dies_at_six(i):
        if len(calls) == 6:
            raise KeyboardInterrupt  # as a Ctrl-C (a SIGKILL loses at most SAVE_EVERY_S of work)
        calls.append(i)
        return decode(i)

    monkeypatch.setattr(store, "_decode", dies_at_six)
    out = tmp_path / "again.store"
    with pytest.raises(KeyboardInterrupt):
        pack(src, out)
    assert not out.exists() and (tmp_path / "again.store.partial").is_dir()
    with pytest.raises(cdata.DataError, match=r"not finished .*rerun to complete it: .*store"):
        cdata.StoreTiles(out)
    calls.clear()
    monkeypatch.setattr(store, "_decode", lambda i: calls.append(i) or decode(i))
    pack(src, out)
    assert len(calls) == 10  # only the tiles the first pack had not done
    assert (out / "tiles.u8").read_bytes() == (done / "tiles.u8").read_bytes()
    assert not (tmp_path / "again.store.partial").exists()


def test_a_broken_or_stale_store_is_one_line_naming_what_to_rerun(tiny_store, tmp_path):
    src, done = tiny_store
    rerun = r"pack it again: .*common\.store .*--data-root"

    def broken(name):
        d = tmp_path / name
        shutil.copytree(done, d)
        return d

    d = broken("truncated")
    os.truncate(d / "tiles.u8", 5000)
    with pytest.raises(cdata.DataError, match="is truncated: tiles.u8 has 5000 bytes.*" + rerun):
        cdata.StoreTiles(d)
    d = broken("corrupt")
    with open(d / "tiles.u8", "r+b") as f:  # tile 0 is among the 17 checked
        f.write(bytes([255 - (done / "tiles.u8").read_bytes()[0]]))
    with pytest.raises(cdata.DataError, match="is corrupt: tile 0 .*" + rerun):
        cdata.StoreTiles(d)
    with pytest.raises(cdata.DataError, match="does not exist; pack it first"):
        cdata.StoreTiles(tmp_path / "nowhere")
    with pytest.raises(cdata.DataError, match="exists and is not a usable store .*is corrupt"):
        store.pack(namespace(src, d))
    # stale: a source file rewritten after packing
    src2 = shutil.copytree(src, tmp_path / "src2", copy_function=shutil.copy2)
    d = pack(src2, tmp_path / "stale.store")
    first = sorted(Path(src2).rglob("*.png"))[0]
    Image.new("RGB", (64, 64), "white").save(first)
    with pytest.raises(cdata.DataError, match=r"is stale: 1 of 16 source files .*" + rerun):
        cdata.StoreTiles(d)
    # stale: a tile added to the source folder (every listed file unchanged)
    d = pack(src2, tmp_path / "added.store")
    shutil.copy2(first, first.with_name("new.png"))
    with pytest.raises(cdata.DataError, match=r"is stale: 1 image files under .* are not in "
                                              r"it \(added since packing, e\.g\. \w+/new\.png\); "
                                              r"delete .* and " + rerun):
        cdata.StoreTiles(d)
    first.with_name("new.png").unlink()
    cdata.StoreTiles(d)  # as packed again: fine
    # mixed sizes: one line, and no store
    Image.new("RGB", (48, 48), "white").save(first)
    with pytest.raises(cdata.DataError, match=r"one size, these 16 come in 2 sizes "
                                              r"\(64x64: 15, 48x48: 1\)"):
        store.pack(namespace(src2, tmp_path / "mixed.store"))
    assert not (tmp_path / "mixed.store").exists()


def _method_views(name):
    """The View lists the plain-View methods train with (DenseCL and PCL take MoCo v2's)."""
    import mcl
    import simclr
    return {"byol": lambda: list(byol.augmentations(48, blur_kernel=23)),
            "moco_v1": lambda: [moco.augmentation("v1", 48)] * 2,
            "simclr": lambda: [simclr.augmentation("simclr", 48)] * 2,
            "mcl": lambda: mcl.augmentations(48, 2)}[name]()


@pytest.mark.parametrize("method", ["byol", "moco_v1", "simclr", "mcl"])
def test_device_crop_draws_the_files_numbers_and_gives_their_pixels(tiny_store, method):
    """--device-crop from the store against --device-aug from the files, for each plain-View
    method's views (MoCo v2's, DenseCL's and PCL's run in test_augment; ConCL, DetCon, PixCon
    and SimCLR histo in their files): the same boxes, flips and photometric parameters per
    sample; the same images once the device ran its ops (float64 crop = Pillow's), with 0 or 2
    workers (BYOL only: the workers' path is the same for every view list)."""
    src, out = tiny_store
    views = _method_views(method)
    files = cdata.MultiViewDataset(cdata.folder_dataset(src), views, seed=2)
    st = cdata.StoreTiles(out)
    st.device_crop = True  # as --device-crop sets it (store_dataset)
    tiles = cdata.MultiViewDataset(st, views, seed=2)
    for ds in (files, tiles):
        ds.set_epoch(1)
    ref = A.DeviceAugment(files, torch.device("cpu"))
    dev = A.DeviceAugment(tiles, torch.device("cpu"))
    assert tiles.device_crop and not files.device_crop
    s = tiles[0]
    assert "views" not in s and s["tile"].shape == (64, 64, 3) and len(s["boxes"]) == len(views)
    want = [ref(default_collate([files[i] for i in range(8 * b, 8 * b + 8)])) for b in (0, 1)]
    for w in ((0, 2) if method == "byol" else (0,)):
        for b, batch in enumerate(torch.utils.data.DataLoader(tiles, batch_size=8, num_workers=w)):
            fb = default_collate([files[i] for i in range(8 * b, 8 * b + 8)])
            for k in ("boxes", "flips", "photo"):
                assert all(torch.equal(x, y) for x, y in zip(batch[k], fb[k])), k
            got = dev(batch)
            assert all(torch.equal(x, y) for x, y in zip(got, want[b]))


def test_device_crop_refuses_views_it_cannot_crop(tiny_store):
    st = cdata.StoreTiles(tiny_store[1])
    st.device_crop = True
    pil_only = cdata.View(32, (0.2, 1.0), geometric=lambda img: img.rotate(90))
    with pytest.raises(cdata.DataError, match="geometric ops on PIL only"):
        A.DeviceAugment(cdata.MultiViewDataset(st, [pil_only] * 2), torch.device("cpu"))
    sub = type("Mine", (cdata.MultiViewDataset,), {"augment": lambda self, img, i: {}})
    with pytest.raises(cdata.DataError, match="Mine builds its views in its own file"):
        A.DeviceAugment(sub(st, [moco.augmentation("v2", 32)] * 2), torch.device("cpu"))
    with pytest.raises(cdata.DataError, match="--device-crop needs --data-store"):
        cdata.build_dataset(argparse.Namespace(data="demo", data_store=None, device_crop=True))


def test_crop_box_draws_torchvisions_numbers():
    """The loader's lean RandomResizedCrop box equals T.RandomResizedCrop.get_params seed for
    seed, the centred fallback after ten misses included (a 12 x 300 strip at scale 0.9-1)."""
    import torchvision.transforms as T
    cases = [((224, 224), (0.2, 1.0), (3 / 4, 4 / 3)), ((64, 48), (0.08, 1.0), (3 / 4, 4 / 3)),
             ((12, 300), (0.9, 1.0), (3 / 4, 4 / 3)), ((300, 12), (0.9, 1.0), (0.5, 2.0))]
    fallbacks = 0
    for (h, w), scale, ratio in cases:
        img = torch.empty(1, dtype=torch.uint8).expand(3, h, w)
        for seed in range(200):
            torch.manual_seed(seed)
            want = T.RandomResizedCrop.get_params(img, scale, ratio)
            after = torch.rand(1)
            torch.manual_seed(seed)
            assert cdata.crop_box(h, w, scale, ratio) == want, (h, w, seed)
            assert torch.equal(torch.rand(1), after)  # the same number of draws
            fallbacks += want[2:] != (h, w) and (want[0], want[1]) == ((h - want[2]) // 2,
                                                                       (w - want[3]) // 2)
    assert fallbacks > 0
