"""Curves from `log.jsonl` files as PNGs, with PIL only (matplotlib is not a dependency).

    python -m common.plots runs/moco/log.jsonl runs/ft/run0/log.jsonl --out curves.png

One panel per log file and key (default: `loss`, and `knn_accuracy` where logged), x = `epoch`
(pre-training) or `iter` (fine-tuning).
"""
import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(series, title, xlabel="", size=(640, 300)):
    """series: [(label, xs, ys)] -> PIL image with axes, ticks, title and legend."""
    w, h = size
    left, right, top, bottom = 60, 15, 28, 36
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None]
    if not pts:
        d.text((left, h // 2), f"{title}: nothing logged", fill="black")
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = 0.05 * (y1 - y0 or abs(y1) or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    for t in _ticks(y0, y1):
        _, yy = px(x0, t)
        d.line([left - 4, yy, left, yy], fill="black")
        d.text((4, yy - 6), f"{t:.4g}", fill="black")
    for t in _ticks(x0, x1):
        xx, _ = px(t, y0)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 8, h - bottom + 6), f"{t:g}", fill="black")
    d.text((left, 8), title, fill="black")
    d.text((w - right - 6 * len(xlabel), h - 14), xlabel, fill="black")
    for j, (label, xs, ys) in enumerate(series):
        c = COLORS[j % len(COLORS)]
        line = [px(x, y) for x, y in zip(xs, ys) if y is not None]
        if len(line) > 1:
            d.line(line, fill=c, width=2)
        for x, y in line:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
        d.text((left + 8, top + 6 + 12 * j), label, fill=c)
    return img


def read_log(path):
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}") from None


def plot_logs(paths, keys=("loss", "knn_accuracy"), size=(640, 260)):
    """One panel per (log file, key present in it), stacked; -> PIL image."""
    panels = []
    for path in paths:
        recs = read_log(path)
        xkey = "iter" if recs and "iter" in recs[0] else "epoch"
        parent = Path(path).parent  # fine-tuning logs sit in <output-dir>/run<i>/
        name = f"{parent.parent.name}/{parent.name}" if parent.name.startswith("run") else parent.name
        for key in keys:
            if any(key in r for r in recs):
                xs = [r[xkey] for r in recs if key in r]
                ys = [r[key] for r in recs if key in r]
                panels.append(line_chart([(key, xs, ys)], f"{name}: {key}", xkey, size))
    if not panels:
        raise SystemExit(f"error: none of {', '.join(keys)} in {', '.join(map(str, paths))}")
    sheet = Image.new("RGB", (size[0], size[1] * len(panels)), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, (0, i * size[1]))
    return sheet


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Draw log.jsonl curves into one PNG.")
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--keys", nargs="+", default=["loss", "knn_accuracy"])
    ap.add_argument("--out", default="curves.png")
    a = ap.parse_args()
    plot_logs(a.logs, a.keys).save(a.out)
    print(a.out)
