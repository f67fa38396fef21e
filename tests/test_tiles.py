"""common.tiles: large images cut into tiles for --data folder, instance folders cut into
training crops with their label maps, checked against hand-made images and hand-counted grids."""
import numpy as np
import pytest
from PIL import Image

from common import glands
from common.data import DataError
from common.tiles import cut_folder, cut_instances, grid
from common.tiles import main as tiles_main


def test_grid_hand_values():
    assert grid(10, 4, 4) == [0, 4, 6]  # the last tile flush with the far edge
    assert grid(8, 4, 4) == [0, 4]  # exact fit: no extra tile
    assert grid(4, 4, 4) == [0]
    assert grid(3, 4, 4) == []  # shorter than a tile
    assert grid(10, 4, 2) == [0, 2, 4, 6]  # stride 2: 6 is both on the grid and flush


def test_cut_folder_tiles_are_the_image_pixels(tmp_path):
    src = tmp_path / "src"
    (src / "TUM").mkdir(parents=True)
    a = np.arange(7 * 10 * 3, dtype=np.uint8).reshape(7, 10, 3)  # 10 wide, 7 high
    Image.fromarray(a).save(src / "TUM" / "big.png")
    rgba = np.dstack([a, np.full((7, 10), 255, np.uint8)])  # opaque RGBA reads as its RGB
    Image.fromarray(rgba).save(src / "flat.png")
    Image.fromarray(a[:3, :3]).save(src / "small.png")  # smaller than a tile: skipped
    Image.fromarray(a).save(src / "held.png")
    n, cut, small, dropped = cut_folder([src], tmp_path / "out", 4, exclude={"held"})
    assert (n, cut, small, dropped) == (12, 2, 1, 0)  # 3 columns (0, 4, 6) x 2 rows (0, 3), twice
    out = tmp_path / "out"
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert names == sorted([f"TUM/big_{y}_{x}.png" for y in (0, 3) for x in (0, 4, 6)]
                           + [f"flat_{y}_{x}.png" for y in (0, 3) for x in (0, 4, 6)])
    for y in (0, 3):
        for x in (0, 4, 6):
            for name in (f"TUM/big_{y}_{x}.png", f"flat_{y}_{x}.png"):
                assert np.array_equal(np.array(Image.open(out / name)), a[y:y + 4, x:x + 4])


def test_min_tissue_drops_glass_and_names_clash(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = np.full((4, 8, 3), 255, np.uint8)
    a[:, :4] = 100  # left tile tissue, right tile glass
    Image.fromarray(a).save(src / "x.png")
    assert cut_folder([src], tmp_path / "o", 4, min_tissue=0.5) == (1, 1, 0, 1)
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["x_0_0.png"]
    other = tmp_path / "src2"
    other.mkdir()
    Image.fromarray(a).save(other / "x.png")
    with pytest.raises(DataError, match="would both write tiles"):
        cut_folder([src, other], tmp_path / "o2", 4)


def test_cut_instances_keeps_ids_and_the_finetuner_reads_it(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for split in ("train", "test"):
        (src / split / "images").mkdir(parents=True)
        (src / split / "masks").mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    label = np.zeros((6, 10), np.uint16)
    label[1:3, 1:3], label[3:6, 6:9] = 700, 2  # a 16-bit id survives the cut
    Image.fromarray(rgb).save(src / "train" / "images" / "a.png")
    Image.fromarray(label).save(src / "train" / "masks" / "a.png")
    Image.fromarray(rgb).save(src / "test" / "images" / "t.png")
    np.save(src / "test" / "masks" / "t.npy", label.astype(np.int32))
    assert cut_instances(src, out, 4) == {"test": 1, "train": 6}  # x 0, 4, 6; y 0, 2
    for y in (0, 2):
        for x in (0, 4, 6):
            name = f"a_{y}_{x}.png"
            assert np.array_equal(np.array(Image.open(out / "train" / "images" / name)),
                                  rgb[y:y + 4, x:x + 4])
            assert np.array_equal(np.array(Image.open(out / "train" / "masks" / name)),
                                  label[y:y + 4, x:x + 4])
    assert np.array_equal(np.load(out / "test" / "masks" / "t.npy"), label)  # copied whole
    train = glands.build_gland_dataset("instances", out, "train", True)
    assert len(train) == 6  # every crop holds a piece of a nucleus
    test = glands.build_gland_dataset("instances", out, "test", False)
    assert test[0][0].shape == (3, 6, 10) and len(test[0][1]["boxes"]) == 2


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:  # in process: python -m common.tiles runs main()
        tiles_main([str(tmp_path / "nope"), str(tmp_path / "o")])
    assert str(e.value) == f"error: source {tmp_path / 'nope'} is not a folder"
    with pytest.raises(SystemExit) as e:
        tiles_main([str(tmp_path), str(tmp_path / "o"), "--min-tissue", "2"])
    assert str(e.value) == "error: --min-tissue 2.0: need a fraction in [0, 1]"


def test_real_glas_image_cut_at_224(tmp_path, shared_samples):
    src = tmp_path / "src"
    src.mkdir()
    image = shared_samples / "glas_images_only" / "train_1.bmp"  # 775 x 522
    (src / image.name).symlink_to(image)
    tiles_main([str(src), str(tmp_path / "out"), "--size", "224"])
    tiles = sorted((tmp_path / "out").glob("*.png"))
    # x 0, 224, 448, 551 (flush) and y 0, 224, 298 (flush): 12 tiles
    assert len(tiles) == 12
    whole = np.array(Image.open(image).convert("RGB"))
    assert np.array_equal(np.array(Image.open(tmp_path / "out" / "train_1_298_551.png")),
                          whole[298:, 551:])


def test_a_rerun_with_other_options_leaves_no_old_tile(tmp_path, capsys):
    """OUT holds one cut: a rerun with another --size clears the earlier tiles (one line says
    so); a rerun with the same options rewrites them; other folders are refused untouched."""
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "TUM").mkdir(parents=True)
    a = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    Image.fromarray(a).save(src / "TUM" / "big.png")

    def tiles():
        return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))

    tiles_main([str(src), str(out), "--size", "4"])
    assert tiles() == [f"TUM/big_{y}_{x}.png" for y in (0, 4) for x in (0, 4)]
    capsys.readouterr()
    tiles_main([str(src), str(out), "--size", "8"])
    assert tiles() == ["TUM/big_0_0.png"]  # the 4 px tiles are gone
    assert "held an earlier cut with other options (size 4 -> 8, stride 4 -> 8): its 4 files " \
           "removed" in capsys.readouterr().out
    tiles_main([str(src), str(out), "--size", "8"])
    assert tiles() == ["TUM/big_0_0.png"]  # the same cut again: said too, as nothing is silent
    assert "held an earlier cut: its 1 file removed" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        tiles_main([str(src), str(other), "--size", "8"])
    assert str(e.value).startswith(f"error: OUT {other} is not empty and holds no tiles.json")
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    with pytest.raises(SystemExit) as e:
        tiles_main([str(src), str(tmp_path), "--size", "8"])
    assert str(e.value) == f"error: OUT {tmp_path} holds the source {src}: choose another folder"
