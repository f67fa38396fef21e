"""Curves drawn from log.jsonl land where the values say: rising lines rise, epoch ticks are whole
numbers, the chance-level loss is a dashed grey line at its value, under the loss curve."""
import json

import numpy as np

from common import plots
from common.plots import BOTTOM, CHANCE, COLORS, LEFT, RIGHT, TOP, _ticks, line_chart, plot_logs


def write_log(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rising_line_is_drawn_rising():
    img = np.asarray(line_chart([("y", [0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0])], "t", "x"))
    ys, xs = np.nonzero((img == COLORS[0]).all(2))
    inside = xs < img.shape[1] - 100  # leave out the legend, top right
    ys, xs = ys[inside], xs[inside]
    left, right = ys[xs < xs.min() + 10].mean(), ys[xs > xs.max() - 10].mean()
    assert right < left - 100  # image rows grow downwards: higher values sit higher up


def test_plot_logs_one_panel_per_logged_key(tmp_path):
    pre = write_log(tmp_path / "moco" / "log.jsonl",
                    [{"epoch": e, "loss": 5 - e, **({"knn_accuracy": 60 + e} if e else {})}
                     for e in range(3)])
    ft = write_log(tmp_path / "ft" / "run0" / "log.jsonl",
                   [{"iter": 20 * i, "loss": 2 / i} for i in range(1, 4)])
    sheet = plot_logs([pre, ft], size=(320, 200))
    assert sheet.size == (320, 3 * 200)  # moco: loss + knn_accuracy; ft: loss


def test_epoch_ticks_are_whole_numbers_for_a_3_epoch_log(tmp_path):
    assert 0.5 in _ticks(0, 2)  # a plain axis would tick half epochs here
    assert _ticks(0, 2, integer=True) == [0, 1, 2]
    assert _ticks(-0.5, 0.5, integer=True) == [0]  # a one-epoch log
    assert _ticks(20, 460, integer=True) == [100, 200, 300, 400]
    w, h = 320, 200
    log = write_log(tmp_path / "moco" / "log.jsonl",
                    [{"epoch": e, "loss": 3.0 - 0.4 * e} for e in range(3)])
    img = np.asarray(plot_logs([log], keys=["loss"], size=(w, h)))
    # tick marks hang 4 px below the plot frame; the y tick labels sit left of LEFT
    row = img[h - BOTTOM + 2, LEFT - 1:]
    cols = LEFT - 1 + np.nonzero((row == 0).all(1))[0]
    want = [LEFT + i * (w - LEFT - RIGHT) / 2 for i in range(3)]  # epochs 0, 1, 2 and no others
    assert len(cols) == 3 and all(abs(c - x) <= 1 for c, x in zip(cols, want)), cols


def test_chance_loss_is_a_dashed_line_at_its_level_under_the_loss(tmp_path):
    w, h = 320, 200
    log = write_log(tmp_path / "moco" / "log.jsonl",
                    [{"epoch": e, "loss": 3.0 + e, "chance_loss": 4.0} for e in range(3)])
    img = np.asarray(plot_logs([log], keys=["loss"], size=(w, h)))
    # values 3..5 padded by 5% of the range: y from 2.9 to 5.1 over the TOP..h-BOTTOM rows
    want_row = TOP + (5.1 - 4.0) / 2.2 * (h - TOP - BOTTOM)  # 28 + 68 = 96
    area = img[TOP + 1:h - BOTTOM, LEFT + 1:w - RIGHT]
    ys, xs = np.nonzero((area == CHANCE).all(2))
    assert len(ys) and np.abs(ys + TOP + 1 - want_row).max() <= 1.5  # only along that level
    level = (area[int(round(want_row)) - TOP - 1] == CHANCE).all(1)
    runs = np.count_nonzero(np.diff(level.astype(int)) == 1)
    # the loss curve crosses it mid-way (epoch 1); elsewhere dashes of 6 px, gaps of 4
    assert 0.4 < level.mean() < 0.75 and runs >= 0.8 * level.size / (plots.DASH + plots.GAP)
    # drawn beneath: where the loss (3, 4, 5) crosses the chance level 4, the loss colour shows
    cross = img[int(round(want_row)), int(round(LEFT + (w - LEFT - RIGHT) / 2))]
    assert tuple(cross) == COLORS[0]
    # no chance_loss in the log: no dashed line
    plain = write_log(tmp_path / "byol" / "log.jsonl",
                      [{"epoch": e, "loss": 3.0 + e} for e in range(3)])
    assert not (np.asarray(plot_logs([plain], keys=["loss"], size=(w, h))) == CHANCE).all(2).any()


def test_axis_titles_name_the_units(tmp_path, monkeypatch):
    calls = []
    real = plots.line_chart
    monkeypatch.setattr(plots, "line_chart",
                        lambda *a, **kw: calls.append(a) or real(*a, **kw))
    moco = write_log(tmp_path / "moco" / "log.jsonl",
                     [{"epoch": e, "loss": 3.0, "chance_loss": 4.0, "knn_accuracy": 50.0 + e}
                      for e in range(2)])
    ft = write_log(tmp_path / "ft" / "run0" / "log.jsonl",
                   [{"iter": 20 * i, "loss": 2 / i} for i in range(1, 3)])
    plot_logs([moco, ft], size=(320, 200))
    # (series, title, xlabel, size, ylabel, reference)
    assert [(c[2], c[4]) for c in calls] == [("epoch", "loss (nats)"),
                                            ("epoch", "kNN accuracy (%)"), ("iteration", "loss")]
    assert calls[0][5] == [("chance level", [0, 1], [4.0, 4.0])] and calls[2][5] == []
    # the y title is drawn, rotated, in the left margin (left of the tick labels at x 18)
    def margin_ink(ylabel):
        img = np.asarray(line_chart([("y", [0, 1], [1.0, 2.0])], "t", "epoch", (320, 200), ylabel))
        return np.nonzero((img[:, :16] < 128).all(2))  # dark pixels: rows, columns

    assert len(margin_ink("")[0]) == 0
    rows, cols = margin_ink("kNN accuracy (%)")
    assert np.ptp(rows) > 4 * np.ptp(cols) and np.ptp(rows) > 60  # text running up the axis
    assert abs((rows.min() + rows.max()) / 2 - (TOP + 200 - BOTTOM) / 2) <= 2  # centred on it


def colour_pixels(img, colour):
    ys, xs = np.nonzero((np.asarray(img) == colour).all(2))
    return ys, xs


def test_accuracy_is_drawn_on_0_to_100_so_a_few_points_stay_small(tmp_path):
    """A kNN wobble of 80 -> 86 -> 80 filled the whole panel height (a 'collapse')."""
    w, h = 320, 200
    log = write_log(tmp_path / "moco" / "log.jsonl",
                    [{"epoch": e, "knn_accuracy": v} for e, v in enumerate([80.0, 86.0, 80.0])])
    ys, xs = colour_pixels(plot_logs([log], keys=["knn_accuracy"], size=(w, h)), COLORS[0])
    curve = ys[(ys > TOP) & (xs < w - 100)]  # the curve, not the legend in the title row
    height = h - TOP - BOTTOM
    assert np.ptp(curve) < 0.1 * height  # 6 points of 100: about 6% of the height
    # 80% sits a fifth of the way down the frame
    assert abs(np.median(curve) - (TOP + 0.2 * height)) < 0.06 * height


def test_a_value_logged_once_is_a_level_across_the_panel(tmp_path):
    """A one-epoch run (or a monitor that ran after the last epoch only) was a single dot."""
    w, h = 320, 200
    log = write_log(tmp_path / "concl" / "log.jsonl", [{"epoch": 1, "loss": 3.0,
                                                        "knn_accuracy": 40.0}])
    for key in ("loss", "knn_accuracy"):
        ys, xs = colour_pixels(plot_logs([log], keys=[key], size=(w, h)), COLORS[0])
        inside = ys > TOP
        assert np.ptp(xs[inside]) > 0.9 * (w - LEFT - RIGHT), key


def test_random_init_reference_is_a_dashed_level_on_the_knn_panel(tmp_path):
    w, h = 320, 200
    log = write_log(tmp_path / "moco" / "log.jsonl",
                    [{"epoch": e, "loss": 5.0, "knn_accuracy": 70.0 + e} for e in range(3)])
    sheet = np.asarray(plot_logs([log], size=(w, h), knn_reference={str(log): 50.0}))
    loss_panel, knn_panel = sheet[:h], sheet[h:]
    assert not (loss_panel == CHANCE).all(2).any()  # no reference on the loss panel
    ys, xs = np.nonzero((knn_panel[TOP + 1:h - BOTTOM, LEFT + 1:w - RIGHT] == CHANCE).all(2))
    want = (100 - 50) / 100 * (h - TOP - BOTTOM) - 1  # 50% on the 0-100 axis, frame-relative
    assert len(ys) and np.abs(ys - want).max() <= 1.5
    assert np.ptp(xs) > 0.9 * (w - LEFT - RIGHT - 2)  # across the panel


def test_titles_say_which_loss_and_which_knn_tiles(tmp_path, monkeypatch):
    titles = []
    real = plots.line_chart
    monkeypatch.setattr(plots, "line_chart", lambda *a, **kw: titles.append(a[1]) or real(*a, **kw))
    moco = write_log(tmp_path / "moco" / "log.jsonl", [{"epoch": 0, "knn_accuracy": 50.0}])
    (tmp_path / "moco" / "args.json").write_text(json.dumps({"data": "nct", "knn_size": 300}))
    ft = write_log(tmp_path / "ft" / "run0" / "log.jsonl",
                   [{"iter": 20 * i, "loss": 2 / i} for i in range(1, 3)])
    plot_logs([moco, ft], size=(320, 200))
    assert titles == ["moco: kNN accuracy (20-NN, 300-tile bank, 100 queries)",
                      "ft/run0: Mask R-CNN loss (RPN + class + box + mask terms)"]


def test_random_init_knn_is_the_monitors_knn_of_a_fresh_backbone(tmp_path):
    """The reference equals the kNN accuracy, computed from scratch on the monitor's demo bank
    and queries, of the ResNet the run's seed initialises (saved as its backbone.pth)."""
    import torch

    from common.data import sample_seed
    from common.models import resnet
    from test_knn_monitor import knn_of_exported_backbone
    args = {"data": "demo", "seed": 3, "img_size": 32, "arch": "resnet18",
            "init": "openselfsup", "knn_every": 1, "workers": 0}
    (tmp_path / "args.json").write_text(json.dumps(args))
    torch.manual_seed(sample_seed(3, 2**31))
    torch.save(resnet("resnet18", "openselfsup").state_dict(), tmp_path / "backbone.pth")
    state = torch.random.get_rng_state()
    got = plots.random_init_knn(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert abs(got - knn_of_exported_backbone(tmp_path)) < 1e-6 + 100 / 90 / 2
    assert 100 / 6 < got < 100  # above chance, short of perfect: a real measurement
