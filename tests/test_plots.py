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
