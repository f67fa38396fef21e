"""The shared FH mask cache (common.masks.FHCache) and its precompute command."""
import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import data as cdata
from common import masks
from common.masks import FHCache


def halves(size, vertical, colours=((200, 30, 30), (30, 30, 200))):
    """A tile split into two flat colours, left/right (vertical cut) or top/bottom."""
    a = np.empty((size, size, 3), np.uint8)
    if vertical:
        a[:, : size // 2], a[:, size // 2:] = colours
    else:
        a[: size // 2], a[size // 2:] = colours
    return a


@pytest.fixture
def twins(tmp_path):
    """Two tiles both named x.png in different sub-folders, different content."""
    root = tmp_path / "data"
    for sub, vertical in (("a", True), ("b", False)):
        (root / sub).mkdir(parents=True)
        Image.fromarray(halves(64, vertical)).save(root / sub / "x.png")
    return root


def test_same_named_tiles_get_their_own_maps_in_concl(twins, tmp_path):
    """Issue 12 bug 1: ConCL's fh concepts of a/x.png and b/x.png each follow their own image
    (keyed by the stem, b/x.png used a/x.png's map)."""
    import concl
    base = cdata.folder_dataset(twins)
    args = argparse.Namespace(concept="fh", fh_input="tile", mask_cache=str(tmp_path / "cache"),
                              output_dir=None, fh_scale=50, img_size=64, max_concepts=64,
                              data_root=str(twins))
    ds = concl.ConceptViews(base, [cdata.View(64, scale=(1.0, 1.0), ratio=(1, 1), flip_p=0)], 0, args)
    for i in range(2):
        img = base[i][0]
        expect = concl.crop_labels(masks.felzenszwalb(img, 50, 50), torch.tensor([0, 0, 64, 64]),
                                   4, 64)
        assert torch.equal(ds[i]["ref_labels"], expect), base.paths[i]
    # the two maps really differ: left/right versus top/bottom halves
    assert not torch.equal(ds[0]["ref_labels"], ds[1]["ref_labels"])
    files = sorted(p.relative_to(ds.fh.folder).as_posix() for p in ds.fh.folder.rglob("*.png"))
    assert files == ["a/x.png.png", "b/x.png.png"]


def test_stale_entry_is_recomputed(tmp_path, monkeypatch):
    calls = []
    real = masks.felzenszwalb
    monkeypatch.setattr(masks, "felzenszwalb", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = FHCache(tmp_path, 50, 50)
    left = Image.fromarray(halves(64, True))
    seg, computed = cache.load("t.png", left)
    assert computed and len(calls) == 1 and seg.dtype == np.int32
    assert np.array_equal(seg, real(left, 50, 50))
    seg2, computed = cache.load("t.png", left)                 # a hit: no FH call
    assert not computed and len(calls) == 1 and np.array_equal(seg2, seg)
    top = Image.fromarray(halves(64, False))                   # same key and size, new pixels
    seg3, computed = cache.load("t.png", top)
    assert computed and np.array_equal(seg3, real(top, 50, 50))
    small = Image.fromarray(halves(48, False))                 # same key, another size
    seg4, computed = cache.load("t.png", small)
    assert computed and seg4.shape == (48, 48)
    cache.path("t.png").write_bytes(b"torn")                   # a torn file: recomputed
    assert cache.load("t.png", small)[1]
    assert cache.load("t.png", small)[1] is False


def test_keys(twins):
    base = cdata.folder_dataset(twins)
    assert [FHCache.key(base, i, twins) for i in range(2)] == ["a/x.png", "b/x.png"]
    assert FHCache.key(cdata.ImageList([], [], []), 3, None, seed=7) == "demo-seed7/000003"


def test_unwritable_cache_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(cdata.DataError, match="--mask-cache .*not a writable folder"):
        FHCache(blocker / "cache", 50, 50)


def test_precompute_fills_resumes_and_matches(twins, tmp_path, capsys):
    """`python -m common.masks` fills the cache with the maps training would compute, skips
    what is there on a rerun (resume), and training then finds every map (no FH call). Run
    in this process (its entry point, as `python -m` calls it): a subprocess each took ~7 s."""
    cache = tmp_path / "cache"
    cmd = ["--data", "folder", "--data-root", str(twins), "--mask-cache", str(cache),
           "--fh-scale", "50", "--fh-min-size", "50", "--workers", "2"]

    def run_script(*argv):
        masks.precompute(list(argv))
        return argparse.Namespace(stdout=capsys.readouterr().out)

    out = run_script(*cmd).stdout
    assert "computed 2 missing" in out and "tiles/s" in out, out
    fh = FHCache(cache, 50, 50)
    base = cdata.folder_dataset(twins)
    for i in range(2):
        seg, computed = fh.load(FHCache.key(base, i, twins), base[i][0])
        assert not computed and np.array_equal(seg, masks.felzenszwalb(base[i][0], 50, 50))
    fh.path("b/x.png").unlink()                                # as if killed before the last
    cmd[-1] = "0"                                              # and in this process
    out = run_script(*cmd).stdout
    assert "1 already cached and valid; computed 1 missing and 0 stale" in out, out
    # swapped files exist but belong to the other image: checked as training checks, recomputed
    a, b = fh.path("a/x.png"), fh.path("b/x.png")
    a.rename(tmp_path / "swap"), b.rename(a), (tmp_path / "swap").rename(b)
    out = run_script(*cmd).stdout
    assert "0 already cached and valid; computed 0 missing and 2 stale" in out, out
    for i in range(2):
        assert not fh.load(FHCache.key(base, i, twins), base[i][0])[1]


def test_precompute_help_names_the_command(capsys):
    with pytest.raises(SystemExit):
        masks.precompute(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m common.masks ")


# ---------------------------------------------------------------------------------------------
# FH maps packed beside a tile store (python -m common.masks --data-store STORE)

@pytest.fixture(scope="module")
def fh_store(tmp_path_factory):
    """(source tree, store of its 16 tiles with FH maps packed for scale = min_size = 50)."""
    from test_store import pack, write_tree
    d = tmp_path_factory.mktemp("fhstore")
    src = write_tree(d / "src")
    out = pack(src, d / "tiles.store")
    masks.precompute(["--data-store", str(out), "--fh-scale", "50", "--fh-min-size", "50",
                      "--workers", "0"])
    return src, out


def test_packed_maps_equal_the_computed_ones_and_are_read_without_the_image(fh_store, tmp_path,
                                                                           monkeypatch, capsys):
    src, out = fh_store
    files = cdata.folder_dataset(src)
    ref = FHCache(tmp_path / "ref", 50, 50)
    want = [ref(FHCache.key(files, i, src), files[i][0]) for i in range(len(files))]
    assert max(w.max() for w in want) > 1  # several segments: a real comparison
    monkeypatch.setattr(masks, "felzenszwalb", lambda *a, **k: pytest.fail("FH ran"))
    fh = FHCache(tmp_path / "unused", 50, 50, store=out)
    assert fh.packed is not None and fh.packed.dtype == np.int16
    st = cdata.StoreTiles(out)
    for i in range(len(files)):
        key = FHCache.key(st, i, st.index["root"])    # as DetCon / ConCL key a store's tiles
        assert key == FHCache.key(files, i, src) and fh.has(key)
        seg, computed = fh.load(key, lambda: pytest.fail("the image was read"))
        assert not computed and seg.dtype == np.int32 and np.array_equal(seg, want[i]), key
        assert np.array_equal(fh(key, files[i][0]), want[i])
    assert not (tmp_path / "unused").exists()       # the per-tile cache is never touched
    # other parameters: not packed, so the per-tile cache serves them (callable img called)
    other = FHCache(tmp_path / "other", 60, 60, store=out)
    assert other.packed is None and not other.has("x")
    monkeypatch.undo()
    seg, computed = other.load("ADI/t00.png", lambda: files[0][0])
    assert computed and np.array_equal(seg, masks.felzenszwalb(files[0][0], 60, 60))
    # a rerun has nothing to do
    capsys.readouterr()
    masks.precompute(["--data-store", str(out), "--fh-scale", "50", "--fh-min-size", "50"])
    assert "complete and up to date (16 maps); nothing to do" in capsys.readouterr().out


def test_a_broken_pack_is_one_error_naming_the_command(fh_store, tmp_path):
    import shutil
    src, out = fh_store
    rerun = r"pack the maps again: python -m common\.masks --data-store .* --fh-scale 50 " \
            r"--fh-min-size 50"

    def copy(name):
        return Path(shutil.copytree(out, tmp_path / name))

    d = copy("truncated")
    os.truncate(d / "fh-50-50.npy", 3000)
    with pytest.raises(cdata.DataError, match=r"fh-50-50\.npy is truncated .*" + rerun):
        FHCache(tmp_path / "c", 50, 50, store=d)
    d = copy("corrupt")
    m = np.load(d / "fh-50-50.npy", mmap_mode="r+")
    m[0, 0, 0] += 1
    m.flush()
    del m
    with pytest.raises(cdata.DataError, match=r"FH map 0 .*does not match its CRC; " + rerun):
        FHCache(tmp_path / "c", 50, 50, store=d)
    d = copy("foreign")  # maps of other parameters under this name
    (d / "fh-50-50.json").write_text((d / "fh-50-50.json").read_text()
                                     .replace('"scale": 50', '"scale": 70'))
    with pytest.raises(cdata.DataError, match=r"other parameters .*" + rerun):
        FHCache(tmp_path / "c", 50, 50, store=d)
    # stale: the store was repacked from changed tiles after the maps were packed
    src2 = Path(shutil.copytree(src, tmp_path / "src2"))
    first = sorted(src2.rglob("*.png"))[0]
    Image.fromarray(halves(64, True)).save(first)
    from test_store import pack
    d = pack(src2, tmp_path / "stale.store")
    for f in ("fh-50-50.npy", "fh-50-50.json"):
        shutil.copy(out / f, d / f)
    with pytest.raises(cdata.DataError, match=r"is stale: the store's tiles changed .*" + rerun):
        FHCache(tmp_path / "c", 50, 50, store=d)
    # the command it names replaces the stale pack with the maps of the new tiles
    masks.precompute(["--data-store", str(d), "--fh-scale", "50", "--fh-min-size", "50",
                      "--workers", "0"])
    fh = FHCache(tmp_path / "c", 50, 50, store=d)
    seg = fh.load(first.relative_to(src2).as_posix(), None)[0]
    assert np.array_equal(seg, masks.felzenszwalb(Image.open(first).convert("RGB"), 50, 50))


def test_a_killed_pack_continues_and_unfinished_is_an_error(fh_store, tmp_path, monkeypatch):
    import shutil
    src, out = fh_store
    d = Path(shutil.copytree(out, tmp_path / "again.store"))
    for f in ("fh-50-50.npy", "fh-50-50.json"):
        (d / f).unlink()
    real, calls = masks._pack_one, []

    def dies_at_five(i):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(i)
        return real(i)

    monkeypatch.setattr(masks, "_pack_one", dies_at_five)
    argv = ["--data-store", str(d), "--fh-scale", "50", "--fh-min-size", "50", "--workers", "0"]
    with pytest.raises(KeyboardInterrupt):
        masks.precompute(argv)
    with pytest.raises(cdata.DataError, match=r"are not finished; rerun to complete them: "
                                              r"python -m common\.masks --data-store"):
        FHCache(tmp_path / "c", 50, 50, store=d)
    calls.clear()
    monkeypatch.setattr(masks, "_pack_one", lambda i: calls.append(i) or real(i))
    masks.precompute(argv)
    assert len(calls) == 11 and not (d / "fh-50-50.partial").exists()
    assert (d / "fh-50-50.npy").read_bytes() == (out / "fh-50-50.npy").read_bytes()
