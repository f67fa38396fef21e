"""ConCL's pieces against brute force and known geometry, and its runs end to end."""
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

import concl
from common import augment as A
from common import data as cdata
from common.masks import grid_labels, kmeans
from tests.conftest import run_script
from tests.test_masks import fh_store  # noqa: F401 - 16 tiles, FH maps packed at 50 / 50
from tests.test_store import tiny_store  # noqa: F401 - the same 16 tiles, nothing packed


# ----------------------------------------------------------------------------- geometry
def block_map(h=224, w=224, block=28):
    """A full-tile label map of square blocks with distinct ids."""
    yy, xx = np.mgrid[:h, :w]
    return (yy // block) * (w // block) + xx // block


def majority_per_cell(full, box, size):
    """Brute force: the most common id of the full-resolution map in each view cell."""
    x0, y0, x1, y1 = (int(v) for v in box)
    crop = full[y0:y1, x0:x1]
    ch, cw = crop.shape[0] // size, crop.shape[1] // size
    out = np.empty((size, size), np.int64)
    for i in range(size):
        for j in range(size):
            cell = crop[i * ch:(i + 1) * ch, j * cw:(j + 1) * cw]
            out[i, j] = np.bincount(cell.ravel()).argmax()
    return out


@pytest.mark.parametrize("flip", [False, True])
def test_view_masks_equals_direct_crop_on_aligned_boxes(flip):
    full = block_map()
    # union box 0..224 seen at R=56 (4 px per ref cell); a view whose 7 cells are 16 px wide
    ref_box = torch.tensor([[0.0, 0.0, 224.0, 224.0]])
    ref = torch.from_numpy(full[2::4, 2::4].copy()).unsqueeze(0)           # nearest to 56x56
    view_box = torch.tensor([[56.0, 112.0, 168.0, 224.0]])
    got = concl.view_masks(ref, ref_box, view_box, torch.tensor([flip]), 7)[0].numpy()
    expected = majority_per_cell(full, view_box[0], 7)
    np.testing.assert_array_equal(got, expected[:, ::-1] if flip else expected)


def test_view_masks_on_random_boxes_agrees_with_brute_force():
    torch.manual_seed(0)
    full = block_map(block=32)
    agree, total = 0, 0
    for _ in range(40):
        v = []
        for _ in range(2):  # two random 7-divisible crops, as the views of one sample
            s = int(torch.randint(8, 32, ()).item()) * 7
            x0, y0 = (int(torch.randint(0, 224 - s + 1, ())) for _ in range(2))
            v.append(torch.tensor([x0, y0, x0 + s, y0 + s], dtype=torch.float32))
        ref_box = concl.union_box(v)
        x0, y0, x1, y1 = ref_box.int().tolist()
        ref = torch.from_numpy(np.asarray(Image.fromarray(full[y0:y1, x0:x1].astype(np.int32))
                                          .resize((14, 14), Image.NEAREST)).copy()).long()
        flip = bool(torch.rand(()) < 0.5)
        got = concl.view_masks(ref[None], ref_box[None], v[1][None], torch.tensor([flip]), 7)[0]
        expected = majority_per_cell(full, v[1], 7)
        expected = expected[:, ::-1] if flip else expected
        agree += int((got.numpy() == expected).sum())
        total += 49
    assert agree / total > 0.85  # only cells on block borders may differ (14x14 reference)


def test_union_box_and_grid():
    boxes = [torch.tensor([10.0, 20.0, 50.0, 60.0]), torch.tensor([30.0, 5.0, 90.0, 40.0])]
    assert concl.union_box(boxes).tolist() == [10, 5, 90, 60]
    g = grid_labels(14, 5)
    assert g.unique().tolist() == list(range(25)) and g[0, 0] == 0 and g[13, 13] == 24
    assert g[0, 3] == 1 and g[3, 0] == 5  # cell id = row * 5 + col


def test_crop_labels_renumbers_by_area_and_caps():
    full = np.zeros((100, 100), np.int64)
    full[:, 60:] = 7     # 40% of the crop
    full[:10, :10] = 3   # 1% of the crop
    out = concl.crop_labels(full, torch.tensor([0.0, 0.0, 100.0, 100.0]), 20, max_concepts=2)
    assert out[10, 0] == 0 and out[10, 19] == 1 and out[0, 0] == -1  # area order, capped


# ----------------------------------------------------------------------------- k-means
def test_kmeans_recovers_separated_clusters_and_reseeds():
    torch.manual_seed(0)
    B, N, D, K = 6, 196, 32, 8
    centres = torch.nn.functional.normalize(torch.randn(B, K, D), dim=-1)
    truth = torch.arange(N).repeat(B, 1) % K
    x = centres.gather(1, truth[..., None].expand(B, N, D)) + 0.05 * torch.randn(B, N, D)
    labels = kmeans(x, K)
    for b in range(B):  # a bijection between found and true clusters
        pairs = set(zip(labels[b].tolist(), truth[b].tolist()))
        assert len(pairs) == K and len({p for p, _ in pairs}) == K
    # fewer distinct points than clusters: every point still gets a valid label, k capped at N
    tiny = torch.randn(2, 3, 4)
    assert kmeans(tiny, 8).shape == (2, 3) and kmeans(tiny, 8).max() < 3


# ----------------------------------------------------------------------------- pooling
def test_shared_prototypes_against_brute_force():
    torch.manual_seed(1)
    B, C, S = 3, 5, 9
    fq, fk = torch.randn(B, C, S), torch.randn(B, C, S)
    lq = torch.randint(-1, 4, (B, S))
    lk = torch.randint(-1, 4, (B, S))
    pq, pk, img = concl.shared_prototypes(fq, fk, lq, lk)
    exp_q, exp_k, exp_img = [], [], []
    for b in range(B):
        for c in range(4):
            if (lq[b] == c).any() and (lk[b] == c).any():
                exp_q.append(fq[b][:, lq[b] == c].mean(1))
                exp_k.append(fk[b][:, lk[b] == c].mean(1))
                exp_img.append(b)
    torch.testing.assert_close(pq, torch.stack(exp_q))
    torch.testing.assert_close(pk, torch.stack(exp_k))
    assert img.tolist() == exp_img


def test_fixed_count_keeps_real_keys_only():
    keys = torch.arange(5.0).unsqueeze(1)
    out = concl.fixed_count(keys, 12)
    assert out.shape == (12, 1) and set(out.flatten().tolist()) == set(range(5))
    assert out[:5].flatten().tolist() == list(range(5))  # every real key kept, then duplicates
    out = concl.fixed_count(torch.arange(20.0).unsqueeze(1), 8)
    assert len(set(out.flatten().tolist())) == 8        # a subset without replacement


def concl_args(**kw):
    a = dict(arch="resnet18", dim=16, queue_size=32, moco_m=0.999, temperature=0.2, bn_splits=1,
             concept="grid", grid_size=1, num_concepts=8, cluster_stage=4, img_size=64,
             concept_weight=1.0, official_key_order=False, concept_ids=1, init="openselfsup")
    a.update(kw)
    return types.SimpleNamespace(**a)


def test_single_global_concept_reduces_to_moco_v2_loss():
    # One concept covering every cell: its masked average pool is the global average pool, so
    # the concept embedding is MoCo v2's q (and k); with the concept queue equal to the instance
    # queue the concept loss must equal the instance loss of the same step.
    torch.manual_seed(0)
    model = concl.ConCL(concl_args())
    model.concept_queue.copy_(model.queue)
    x = torch.randn(4, 3, 64, 64)
    boxes = [torch.tensor([[0.0, 0, 40, 40]] * 4), torch.tensor([[20.0, 20, 64, 64]] * 4)]
    batch = {"boxes": boxes, "flips": [torch.zeros(4, dtype=torch.bool)] * 2,
             "ref_box": torch.tensor([[0.0, 0, 64, 64]] * 4)}
    loss, parts = model(x, x.flip(3), batch, None, concepts=True)
    assert parts["shared_concepts"] == 1.0
    torch.testing.assert_close(parts["loss_concept"], parts["loss_instance"])
    torch.testing.assert_close(loss, parts["loss_concept"])
    model.args.concept_weight = 0.0  # lambda 0: the total is the instance loss alone
    model.concept_queue.copy_(model.queue)
    loss, parts = model(x, x.flip(3), batch, None, concepts=True)
    torch.testing.assert_close(loss, parts["loss_instance"])


# ----------------------------------------------------------------------------- runs
TINY = ["--data", "demo", "--demo-size", "16", "--batch-size", "8", "--img-size", "64",
        "--queue-size", "64", "--workers", "1", "--epochs", "2", "--warmup-epochs", "1"]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("concept", ["kmeans", "grid", "fh"])
def test_each_concept_source_trains(tmp_path, concept):
    extra = ["--fh-input", "tile"] if concept == "fh" else []  # the cached path (reference: 2-proc)
    run_script("concl.py", *TINY, "--concept", concept, *extra, "--vis-every", "2",
               "--output-dir", tmp_path)
    rows = log(tmp_path)
    assert "loss_concept" not in rows[0] and rows[1]["shared_concepts"] > 0
    assert rows[1]["loss"] == pytest.approx(rows[1]["loss_concept"])  # lambda = 1
    png = Image.open(tmp_path / "concepts_epoch001.png")
    assert png.size == (4 * 112, 36 + 8 * (112 + 18))  # 112 px cells at 64 px, captioned rows
    header = np.asarray(png)[:36]
    assert (header < 128).any() and (header == 255).mean() > 0.8  # dark header text on white
    if concept == "fh":
        assert len(list((tmp_path / "masks").rglob("*.png"))) == 16  # FH computed once per tile


@pytest.mark.parametrize("concept", ["grid", "fh"])
def test_concept_sources_train_on_two_processes(tmp_path, concept):
    run_script("concl.py", *TINY, "--batch-size", "4", "--concept", concept, "--vis-every", "0",
               "--output-dir", tmp_path, nproc=2)
    rows = log(tmp_path)
    assert rows[1]["shared_concepts"] > 0 and np.isfinite(rows[1]["loss_concept"])
    assert not (tmp_path / "masks").exists()  # fh segments x_r each step: nothing cached


def test_file_concepts_from_a_mask_folder(tmp_path):
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(imgs / f"t{i}.png")
        m = np.zeros((96, 96), np.uint8)
        m[:, 48:] = 255  # a binary "saliency" mask, as BASNet gives
        Image.fromarray(m).save(masks / f"t{i}.png")
    run_script("concl.py", *TINY[4:], "--data", "folder", "--data-root", imgs, "--concept",
               "file", "--concept-dir", masks, "--output-dir", tmp_path / "out")
    assert log(tmp_path / "out")[1]["shared_concepts"] > 0
    (masks / "t3.png").unlink()
    p = run_script("concl.py", *TINY[4:], "--data", "folder", "--data-root", imgs, "--concept",
                   "file", "--concept-dir", masks, "--output-dir", tmp_path / "o2", check=False)
    assert p.returncode == 2 and "t3.png" in p.stderr.strip().splitlines()[-1]


LOGGED = ("loss", "loss_instance", "acc", "loss_concept", "acc_concept", "shared_concepts")


def test_two_processes_and_resume_across_warmup_from_a_store_with_device_crop(tmp_path, tiny_store):
    """b-ConCL on two processes: from the files with --device-aug, and from the store with
    --device-crop (views and x_r cropped on the device) stopped in the warm-up epoch and resumed
    through the switch: the same log numbers and backbone bit for bit; the concept sheets of the
    store run are drawn from the device crops."""
    src, store = tiny_store
    two = ["concl.py", *TINY[4:], "--batch-size", "4", "--device-aug"]  # 2 epochs of 2 steps
    ref = tmp_path / "ref"
    run_script(*two, "--data", "folder", "--data-root", src, "--output-dir", ref, nproc=2)
    assert log(ref)[1]["shared_concepts"] > 0
    cut = tmp_path / "cut"  # stop inside the warm-up epoch, resume through the switch
    two += ["--data-store", store, "--device-crop", "--vis-every", "2", "--output-dir", cut]
    run_script(*two, "--stop-after-steps", "1", nproc=2)
    run_script(*two, nproc=2)
    a = torch.load(ref / "backbone.pth")
    b = torch.load(cut / "backbone.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [[r.get(k) for k in LOGGED] for r in log(ref)] == [[r.get(k) for k in LOGGED]
                                                              for r in log(cut)]
    assert Image.open(cut / "concepts_epoch001.png").size == (4 * 112, 36 + 8 * (112 + 18))


def test_show_concepts_on_a_trained_checkpoint(tmp_path):
    run_script("concl.py", *TINY, "--epochs", "1", "--output-dir", tmp_path)
    p = run_script("concl.py", *TINY, "--epochs", "1", "--output-dir", tmp_path,
                   "--show-concepts", "3")
    assert "concepts.png" in p.stdout
    # a header of two lines (columns; one colour = one concept), three rows with a caption each
    assert Image.open(tmp_path / "concepts.png").size == (4 * 112, 36 + 3 * (112 + 18))


def test_concept_overlay_keeps_the_tissue_readable():
    # grey tile, concept 0 on the left half, 1 on the right, none in the bottom quarter: regions
    # lightly tinted (20% of their colour), outlined in full colour where ids meet, none untouched
    img = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    labels = torch.tensor([[0, 0, 1, 1]] * 3 + [[-1] * 4])
    from common import pictures  # what save_concepts draws each panel with
    out = pictures.paint(pictures.enlarge(pictures.to_rgb(img), 16), labels).astype(int)
    P = pictures.PALETTE
    tint = lambda c: (0.8 * 100 + 0.2 * P[c].astype(float)).astype(int)
    assert (out[2, 2] == tint(0)).all() and (out[2, 13] == tint(1)).all()
    assert (out[2, 7] == P[0]).all() and (out[2, 8] == P[1]).all()
    assert (out[11, 2] == P[0]).all() and (out[14, 2] == 100).all()


# ----------------------------------------------------------------------------- fidelity (issue 12)
def test_grid_cells_cover_equal_areas_of_the_reference_view():
    # s = 5 over x_r: seen by a view equal to x_r at 10 x 10, every cell holds 2 x 2 of each id
    # (the old 14-cell raster gave rows of 3, 3, 3, 3, 2 reference cells: unequal areas)
    model = concl.ConCL(concl_args(concept="grid", grid_size=5, concept_ids=25))
    box = torch.tensor([[10.0, 20.0, 150.0, 160.0]])
    ref = model.reference_labels({"ref_box": box}, None, "cpu")
    lab = concl.view_masks(ref, box, box, torch.tensor([False]), 10)
    assert torch.bincount(lab.flatten(), minlength=25).tolist() == [4] * 25
    lab = concl.view_masks(ref, box, box, torch.tensor([False]), 15)   # 3 x 3 each at 15
    assert torch.bincount(lab.flatten(), minlength=25).tolist() == [9] * 25


def test_cluster_stages_f1_to_f5_have_the_strides_of_table_4c():
    from common.models import resnet
    net = resnet("resnet18").eval()
    x = torch.zeros(1, 3, 64, 64)
    shapes = [tuple(concl.stage_map(net, x, s).shape[1:]) for s in range(1, 6)]
    assert shapes == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    model = concl.ConCL(concl_args(concept="kmeans", cluster_stage=1, num_concepts=4))
    labels = model.reference_labels({}, torch.randn(2, 3, 64, 64), "cpu")
    assert labels.shape == (2, 32, 32) and labels.max() < 4


def views_for(args, base):
    return concl.ConceptViews(base, [concl.augmentation("v2", args.img_size)] * 2, 0, args)


def test_fh_segments_the_reference_view_by_default(monkeypatch):
    from common.demo import DemoTiles
    seen = []
    real = concl.felzenszwalb
    monkeypatch.setattr(concl, "felzenszwalb", lambda img, *a, **k: seen.append(img) or real(img, *a, **k))
    a = types.SimpleNamespace(concept="fh", fh_input="reference", fh_scale=100, img_size=64,
                              max_concepts=64, concept_threshold=None)
    s = views_for(a, DemoTiles(2, 0))[1]
    assert len(seen) == 1 and np.array_equal(seen[0], s["ref"].permute(1, 2, 0).numpy())
    expect = concl.crop_labels(real(seen[0], 100, 100), torch.tensor([0, 0, 64, 64]), 4, 64)
    assert torch.equal(s["ref_labels"], expect)


def test_concept_threshold_binarises_grey_saliency(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "t.png")
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))      # a left-to-right ramp
    (tmp_path / "m").mkdir()
    Image.fromarray(grey).save(tmp_path / "m" / "t.png")
    from common.data import folder_dataset
    base = folder_dataset(tmp_path, skip_bad=False)
    base.paths = [p for p in base.paths if "/m/" not in p]
    a = types.SimpleNamespace(concept="file", concept_dir=str(tmp_path / "m"), img_size=64,
                              max_concepts=64, concept_threshold=None)
    assert len(views_for(a, base)[0]["ref_labels"].unique()) > 2   # every grey level an id
    a.concept_threshold = 128
    s = views_for(a, base)[0]
    box = s["ref_box"].tolist()
    labels = s["ref_labels"]
    assert len(labels.unique()) == 2
    # nearest sampling of the ramp: reference cells whose centre lies at x >= 32 are salient
    centres = box[0] + (np.arange(4) + 0.5) * (box[2] - box[0]) / 4
    salient = centres >= 32
    assert salient.any() and not salient.all()
    row = labels[0].tolist()
    first = int(np.argmax(salient))
    assert [row[j] == row[first] for j in range(4)] == salient.tolist()


# ----------------------------------------------------------------------------- --amp and host reads (issue 23)
def bf16(fn, *a, seed=3):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*a)


def test_kmeans_and_view_masks_decide_in_fp32_under_bf16_autocast():
    # bf16 changed the k-means partition of 5 of these 8 images and 3 view cells of 32 tiles
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 49, 64, generator=g) + 0.5 * torch.randn(8, 1, 64, generator=g)
    torch.manual_seed(3)
    fp32 = kmeans(x, 8)
    assert torch.equal(bf16(kmeans, x, 8, seed=3), fp32)
    B = 32
    ref = torch.randint(-1, 8, (B, 14, 14), generator=g)
    ref_box = torch.tensor([[3.0, 5.0, 200.0, 190.0]]).repeat(B, 1)
    u = torch.rand(B, 4, generator=g)
    boxes = torch.stack([u[:, 0] * 50 + 3, u[:, 1] * 50 + 5, 150 + u[:, 2] * 40,
                         140 + u[:, 3] * 40], 1)
    flips = torch.rand(B, generator=g) < 0.5
    assert torch.equal(bf16(concl.view_masks, ref, ref_box, boxes, flips, 7),
                       concl.view_masks(ref, ref_box, boxes, flips, 7))


def test_a_b_concl_step_reads_back_only_the_shared_concept_count():
    from tests.test_moco_units import HostReads
    torch.manual_seed(0)
    a = concl_args(concept="kmeans", num_concepts=4, concept_ids=4, cluster_stage=4)
    model = concl.ConCL(a)
    x = torch.randn(4, 3, 64, 64)
    geometry = {"boxes": [torch.tensor([[0.0, 0, 40, 40]] * 4), torch.tensor([[20.0, 20, 64, 64]] * 4)],
                "flips": [torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)],
                "ref_box": torch.tensor([[0.0, 0, 64, 64]] * 4)}
    model(x, x, geometry, x, concepts=True)  # warm-up: the queue pointers' one read
    with HostReads() as h:
        loss, parts = model(x, x.flip(3), geometry, x, concepts=True)
        loss.backward()
    # k-means, view masks and the queues stay on the device; the number of concepts both views
    # share sets the size of the concept batch (one nonzero)
    assert h.ops == ["nonzero"] and parts["shared_concepts"] > 0


def test_only_the_geometry_is_handed_to_the_model():
    batch = {"views": [torch.zeros(2, 3, 8, 8)] * 2, "ref": torch.zeros(2, 3, 8, 8),
             "boxes": [torch.zeros(2, 4)] * 2, "flips": [torch.zeros(2, dtype=torch.bool)] * 2,
             "ref_box": torch.zeros(2, 4), "skipped": torch.zeros(2), "label": torch.zeros(2)}
    got = concl.concept_inputs(batch, torch.device("cpu"))
    assert sorted(got) == ["boxes", "flips", "ref_box"]  # no images: DDP would copy them
    batch["ref_labels"] = torch.zeros(2, 4, 4, dtype=torch.long)
    assert sorted(concl.concept_inputs(batch, torch.device("cpu"))) == ["boxes", "flips", "ref_box", "ref_labels"]


# ----------------------------------------------------------------------------- --device-crop (issue 25)
@pytest.mark.parametrize("concept", ["kmeans", "fh-tile", "fh-reference", "file"])
def test_device_crop_gives_the_files_reference_view_and_concepts(concept, fh_store, tmp_path):
    """From the store (--device-crop: the loader sends tiles and numbers) and from the files
    (--device-aug): the same boxes, flips, photometric numbers, x_r box and concept labels; the
    views and x_r cropped on the device equal the loader's Pillow crops; fh --fh-input tile
    reads the maps packed beside the store (no per-tile cache written)."""
    src, store = fh_store
    flags = ["--img-size", "64", "--concept", concept.split("-")[0], "--fh-scale", "50"]
    if concept.startswith("fh"):
        flags += ["--fh-input", concept.split("-")[1]]
    if concept == "file":
        (tmp_path / "m").mkdir()
        for i, p in enumerate(sorted(src.rglob("*.png"))):  # a different split per tile
            m = np.zeros((64, 64), np.uint8)
            m[:, 4 * i:] = 1
            m[40:, :] = 2
            Image.fromarray(m).save(tmp_path / "m" / p.name)
        flags += ["--concept-dir", str(tmp_path / "m")]
    got = []
    for where in (["--data", "folder", "--data-root", str(src), "--device-aug"],
                  ["--data-store", str(store), "--device-crop"]):
        a = concl.get_args([*where, *flags, "--output-dir", str(tmp_path / where[0][2:])])
        ds = concl.ConceptViews(cdata.build_dataset(a), [concl.augmentation("v2", 64)] * 2, 0, a)
        aug = A.DeviceAugment(ds, torch.device("cpu"))
        ds.set_epoch(2)
        got.append((torch.utils.data.default_collate([ds[i] for i in range(8)]), aug))
    (fb, _), (sb, aug) = got
    assert "views" not in sb and "ref" not in sb and sb["tile"].shape == (8, 64, 64, 3)
    for k in ("boxes", "flips", "photo"):
        assert all(torch.equal(x, y) for x, y in zip(fb[k], sb[k])), k
    assert all(torch.equal(x, y) for x, y in zip(fb["views"], aug.views(sb)))  # crops, no colour
    assert torch.equal(concl.reference_view(sb, 64), fb["ref"])     # x_r on the tiles' device
    assert torch.equal(fb["ref_box"], sb["ref_box"])
    if concept != "kmeans":
        assert torch.equal(fb["ref_labels"], sb["ref_labels"]) and fb["ref_labels"].max() > 0
    if concept == "fh-tile":
        assert not (tmp_path / "data-store" / "masks").exists()    # read from the pack
        assert len(list((tmp_path / "data" / "masks").rglob("*.png"))) == 8   # files: computed
