"""Curves drawn from log.jsonl land where the values say."""
import json

import numpy as np

from common.plots import COLORS, line_chart, plot_logs


def test_rising_line_is_drawn_rising():
    img = np.asarray(line_chart([("y", [0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0])], "t", "x"))
    ys, xs = np.nonzero((img == COLORS[0]).all(2))
    left, right = ys[xs < xs.min() + 10].mean(), ys[xs > xs.max() - 10].mean()
    assert right < left - 100  # image rows grow downwards: higher values sit higher up


def test_plot_logs_one_panel_per_logged_key(tmp_path):
    pre = tmp_path / "moco" / "log.jsonl"
    ft = tmp_path / "ft" / "run0" / "log.jsonl"
    for p in (pre, ft):
        p.parent.mkdir(parents=True)
    pre.write_text("".join(json.dumps({"epoch": e, "loss": 5 - e, **({"knn_accuracy": 60 + e} if e
                                      else {})}) + "\n" for e in range(3)))
    ft.write_text("".join(json.dumps({"iter": 20 * i, "loss": 2 / i}) + "\n" for i in range(1, 4)))
    sheet = plot_logs([pre, ft], size=(320, 200))
    assert sheet.size == (320, 3 * 200)  # moco: loss + knn_accuracy; ft: loss
