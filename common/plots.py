"""Curves from `log.jsonl` files as PNGs, with PIL only (matplotlib is not a dependency).

    python -m common.plots runs/moco/log.jsonl runs/ft/run0/log.jsonl --out curves.png
    python -m common.plots runs/moco/log.jsonl --random-init-knn     # + the random-init level

One panel per log file and key (default: `loss`, and `knn_accuracy` where logged), x = `epoch`
(pre-training) or `iter` (fine-tuning) with whole-number ticks, y titled with its unit. Where
the log has `chance_loss` (the InfoNCE loss of a uniform guess, log(K+1) for MoCo) it is drawn
dashed in grey under the loss: a MoCo loss rising towards it while the queue fills is normal.
Accuracies are drawn on 0-100%, so a few points of noise look like noise. A key logged once
(a one-epoch run, a monitor run only after the last epoch) is a level across the panel.

`--random-init-knn` adds, on each kNN panel, the monitor's kNN accuracy of a randomly
initialised ResNet of the run's arch and init on the monitor's own bank and queries (rebuilt
from the run's `args.json`): the level that pre-training has to beat. It is computed here, in
eval mode as the monitor; seconds for demo runs, a few minutes on a CPU for NCT's 4,000 tiles.
The monitor's tiles are not the linear probe's (demo: a 180-tile bank and 90 queries against
the probe's 450 training and 300 test tiles), so the two kNN figures differ by a few points.
"""
import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
CHANCE = (110, 110, 110)              # the dashed chance-level line
LEFT, RIGHT, TOP, BOTTOM = 72, 15, 28, 36   # plot-area margins in pixels
DASH, GAP = 6, 4
# y-axis titles with units; a loss is in nats where its chance level says it is a cross-entropy
YLABELS = {"knn_accuracy": "kNN accuracy (%)", "acc": "accuracy (%)", "lr": "learning rate",
           "time": "step time (s)", "step_time_s": "step time (s)", "data_time": "data time (s)",
           "img_per_s": "images / s", "loss": "loss"}
PERCENT = ("knn_accuracy", "acc", "accuracy")  # drawn on 0-100


def _ticks(lo, hi, n=5, integer=False):
    """About n round tick values covering [lo, hi]; whole numbers only when integer."""
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    if integer:
        step = max(step, 1)  # 1, 2, 5, 10, 20, ... : whole numbers
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _dashed(d, line, fill, width=2):
    """A polyline drawn as DASH-pixel dashes with GAP-pixel gaps, the pattern running on across
    vertices."""
    pos = 0.0  # distance along the pattern
    for (xa, ya), (xb, yb) in zip(line, line[1:]):
        length = math.hypot(xb - xa, yb - ya)
        t = 0.0
        while t < length:
            in_dash = pos % (DASH + GAP) < DASH
            run = (DASH - pos % (DASH + GAP)) if in_dash else (DASH + GAP - pos % (DASH + GAP))
            run = min(run, length - t)
            if in_dash:
                a, b = t / length, (t + run) / length
                d.line([xa + a * (xb - xa), ya + a * (yb - ya), xa + b * (xb - xa),
                        ya + b * (yb - ya)], fill=fill, width=width)
            t, pos = t + run, pos + run


def _vertical_text(img, xy, text, fill="black"):
    """Text rotated 90 degrees counter-clockwise, centred vertically on xy[1]."""
    box = ImageDraw.Draw(img).textbbox((0, 0), text)
    label = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
    ImageDraw.Draw(label).text((1, 0), text, fill=fill)
    label = label.rotate(90, expand=True)
    img.paste(label, (xy[0], int(xy[1] - label.size[1] / 2)))


def line_chart(series, title, xlabel="", size=(640, 300), ylabel="", reference=(), yrange=None):
    """series: [(label, xs, ys)] -> PIL image with axes, ticks (whole numbers on x), the axis
    titles, title and legend. reference: [(label, xs, ys)] drawn dashed in CHANCE grey beneath
    the series (e.g. the chance-level loss; one value: a level across the panel). yrange:
    (lo, hi) fixed y limits (widened to include every value), else the values' range padded."""
    w, h = size
    left, right, top, bottom = LEFT, RIGHT, TOP, BOTTOM
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None]
    if not pts:
        d.text((left, h // 2), f"{title}: nothing logged", fill="black")
        return img
    pts += [(x, y) for _, xs, ys in reference for x, y in zip(xs, ys) if y is not None]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if yrange is not None:
        y0, y1 = min(y0, yrange[0]), max(y1, yrange[1])
    else:
        pad = 0.05 * (y1 - y0 or abs(y1) or 1.0)
        y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    for t in _ticks(y0, y1):
        _, yy = px(x0, t)
        d.line([left - 4, yy, left, yy], fill="black")
        d.text((18, yy - 6), f"{t:.4g}", fill="black")
    for t in _ticks(x0, x1, integer=True):
        xx, _ = px(t, y0)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 8, h - bottom + 6), f"{t:g}", fill="black")
    d.text((left, 8), title, fill="black")
    d.text((w - right - 6 * len(xlabel), h - 14), xlabel, fill="black")
    if ylabel:
        _vertical_text(img, (2, (top + h - bottom) / 2), ylabel)
    legend = []  # (label, colour, dashed), right-aligned in the title row, off the curves
    for label, xs, ys in reference:
        line = [px(x, y) for x, y in zip(xs, ys) if y is not None]
        if len(line) == 1:  # one epoch: a dashed level across the panel
            line = [(left, line[0][1]), (w - right, line[0][1])]
        _dashed(d, line, CHANCE)
        legend.append((label, CHANCE, True))
    for j, (label, xs, ys) in enumerate(series):
        c = COLORS[j % len(COLORS)]
        line = [px(x, y) for x, y in zip(xs, ys) if y is not None]
        if len(line) == 1:  # logged once: a level across the panel, not a lone dot
            d.line([(left, line[0][1]), (w - right, line[0][1])], fill=c, width=2)
        elif len(line) > 1:
            d.line(line, fill=c, width=2)
        for x, y in line:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
        legend.append((label, c, False))
    x = w - right
    for label, c, dashed in reversed(legend):
        x -= d.textbbox((0, 0), label)[2]
        d.text((x, 8), label, fill=c)
        x -= 20
        if dashed:
            _dashed(d, [(x, 14), (x + 16, 14)], c)
        else:
            d.line([x, 14, x + 16, 14], fill=c, width=2)
        x -= 12
    return img


def read_log(path):
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}") from None


def monitor_sets(args):
    """(bank, queries) sizes of the kNN monitor of a run with these args.json values."""
    if args.get("data") == "demo":
        return 180, 90  # common.train.KNNMonitor.build
    n = args.get("knn_size", 3000)
    return n, max(1, n // 3)


def random_init_knn(run_dir):
    """kNN accuracy (%) that the run's monitor gives a randomly initialised backbone of the run's
    arch and init, on the monitor's own bank and queries, rebuilt from `run_dir/args.json`; None
    where the run has no monitor."""
    import types

    import torch

    from common import data as cdata
    from common import train as ctrain
    from common.models import resnet
    args = types.SimpleNamespace(**json.loads((Path(run_dir) / "args.json").read_text()))
    if not getattr(args, "knn_every", 0):
        return None
    base = None
    if args.data == "nct":
        base = cdata.nct_dataset(args.data_root, getattr(args, "train_list", None),
                                 getattr(args, "skip_bad", False))
    elif args.data == "folder":
        base = cdata.folder_dataset(args.data_root, getattr(args, "skip_bad", False))
    run = types.SimpleNamespace(args=args, rank=0, world=1, device=torch.device("cpu"),
                                print=lambda *a: None)
    monitor = ctrain.KNNMonitor.build(run, base)
    if monitor is None:
        return None
    with torch.random.fork_rng():  # the training scripts' model-init seed; the caller's RNG
        torch.manual_seed(cdata.sample_seed(args.seed, 2**31))  # (loaders draw from it) is kept
        backbone = resnet(args.arch, getattr(args, "init", "openselfsup"))
        return monitor(backbone)


def plot_logs(paths, keys=("loss", "knn_accuracy"), size=(640, 260), knn_reference=None):
    """One panel per (log file, key present in it), stacked; -> PIL image. knn_reference:
    {log path: random-init kNN accuracy} drawn as a dashed level on that log's kNN panel."""
    panels = []
    for path in paths:
        recs = read_log(path)
        xkey = "iter" if recs and "iter" in recs[0] else "epoch"
        parent = Path(path).parent  # fine-tuning logs sit in <output-dir>/run<i>/
        name = f"{parent.parent.name}/{parent.name}" if parent.name.startswith("run") else parent.name
        try:
            run_args = json.loads((parent / "args.json").read_text())
        except (OSError, json.JSONDecodeError):
            run_args = {}
        for key in keys:
            if not any(key in r for r in recs):
                continue
            xs = [r[xkey] for r in recs if key in r]
            ys = [r[key] for r in recs if key in r]
            ylabel, reference, title, label = YLABELS.get(key, key), [], f"{name}: {key}", key
            if key == "loss" and any("chance_loss" in r for r in recs):
                ylabel = "loss (nats)"  # a cross-entropy: its chance level is logged
                reference = [("chance level", [r[xkey] for r in recs if "chance_loss" in r],
                              [r["chance_loss"] for r in recs if "chance_loss" in r])]
            if key == "loss" and xkey == "iter":  # torchvision's detector: five terms summed
                title = f"{name}: Mask R-CNN loss (RPN + class + box + mask terms)"
                if len(xs) > 1:
                    label = f"mean of {xs[1] - xs[0]} iterations"
            if key == "knn_accuracy":
                bank, queries = monitor_sets(run_args)
                title = f"{name}: kNN accuracy (20-NN, {bank}-tile bank, {queries} queries)"
                ref = (knn_reference or {}).get(str(path))
                if ref is not None:
                    reference = [("random init", [xs[0]], [ref])]
            panels.append(line_chart([(label, xs, ys)], title,
                                     "iteration" if xkey == "iter" else xkey, size, ylabel,
                                     reference, (0, 100) if key in PERCENT else None))
    if not panels:
        raise SystemExit(f"error: none of {', '.join(keys)} in {', '.join(map(str, paths))}")
    sheet = Image.new("RGB", (size[0], size[1] * len(panels)), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, (0, i * size[1]))
    return sheet


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m common.plots",
                                 description="Draw log.jsonl curves into one PNG.")
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--keys", nargs="+", default=["loss", "knn_accuracy"])
    ap.add_argument("--out", default="curves.png")
    ap.add_argument("--random-init-knn", action="store_true",
                    help="draw a random-init backbone's kNN accuracy on the monitor's tiles on "
                         "every kNN panel (computed now from each run's args.json)")
    a = ap.parse_args()
    refs = {}
    if a.random_init_knn:
        for log in a.logs:
            if (Path(log).parent / "args.json").is_file() and any(
                    "knn_accuracy" in r for r in read_log(log)):
                refs[str(log)] = random_init_knn(Path(log).parent)
                print(f"random-init kNN accuracy on the monitor's tiles of {log}: "
                      f"{refs[str(log)]:.1f}%")
    plot_logs(a.logs, a.keys, knn_reference=refs).save(a.out)
    print(a.out)
