#!/usr/bin/env bash
# The one-command tour, on a CPU in a few minutes (idle machine; other jobs stretch it), no download:
#   1. pre-train MoCo v2 briefly on the demo tiles (kNN monitor every epoch),
#   2. probe its frozen features and a random ResNet-18's (linear_probe.py: 20-NN and linear
#      probe; only the 20-NN is quoted, see below),
#   3. fine-tune Mask R-CNN on demo glands from the MoCo backbone (COCO AP),
#   4. pre-train b-ConCL for two epochs to draw its concept maps,
# then save the pictures (loss and kNN curves with the random-init level, concepts, detections)
# and print a summary block, with the machine and each step's time, that README quotes as-is.
#
#   bash scripts/demo.sh [OUTPUT_DIR]        (default runs/tour; rerunning resumes / reuses)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/tour}
SMALL=(--data demo --img-size 64 --batch-size 32 --queue-size 512 --workers 2)
# The linear probe's accuracy is not quoted: on the six easy demo classes a random ResNet-18
# already scores 99% with every label, and with one label per class (--label-fraction 1, five
# subsets) it scored 69.5 +- 8.3% against 3 epochs of MoCo v2's 66.9 +- 3.8% (measured, AMD EPYC,
# 2 cores): demo data cannot rank backbones by it. The 20-NN figures can.
LOAD0=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
REUSED=$([ -e "$OUT/moco/backbone.pth" ] && echo 1 || echo 0)  # then the times are not a fresh run's
START=$(date +%s)
declare -A T

echo "== 1/4 MoCo v2 pre-training on demo tiles"
t=$SECONDS
python moco.py "${SMALL[@]}" --epochs 3 --knn-every 1 --output-dir "$OUT/moco"
T[moco]=$((SECONDS - t))

echo "== 2/4 linear_probe.py (20-NN + linear probe): random init vs MoCo v2"
t=$SECONDS
python linear_probe.py --data demo --img-size 64 --runs 1 --workers 2 --pretrained random \
    --output-dir "$OUT/probe-random"
python linear_probe.py --data demo --img-size 64 --runs 1 --workers 2 \
    --pretrained "$OUT/moco/backbone.pth" --output-dir "$OUT/probe-moco"
T[probes]=$((SECONDS - t))

echo "== 3/4 Mask R-CNN on demo glands from the MoCo v2 backbone"
t=$SECONDS
# lr 0.16 at the paper's batch 16 = 0.02 at batch 2 after linear scaling
python finetune_maskrcnn.py --data demo --img-size 128 --batch-size 2 --max-iters 80 --lr 0.16 \
    --precise-bn 10 --runs 1 --vis 4 --workers 1 --pretrained "$OUT/moco/backbone.pth" \
    --output-dir "$OUT/finetune-moco"
T[finetune]=$((SECONDS - t))

echo "== 4/4 b-ConCL, two epochs, for its concept maps"
t=$SECONDS
python concl.py "${SMALL[@]}" --epochs 2 --warmup-epochs 0 --vis-every 1 --output-dir "$OUT/concl"
T[concl]=$((SECONDS - t))

python - "$OUT" "$LOAD0" \
    "moco ${T[moco]}s, probes ${T[probes]}s, Mask R-CNN ${T[finetune]}s, ConCL ${T[concl]}s" \
    "$START" "$REUSED" <<'PY'
import json, os, platform, sys, time
from pathlib import Path

import torch

from common.plots import monitor_sets, plot_logs, random_init_knn

t0 = int(time.time())
out, load0, steps, start = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
reused = " (results of an earlier run reused: for fresh times, run into a new folder)" if sys.argv[5] == "1" else ""
moco_log = out / "moco" / "log.jsonl"
ref = random_init_knn(out / "moco")  # the monitor's tiles, a fresh ResNet-18 of the run's init
concl_log = out / "concl" / "log.jsonl"
plot_logs([moco_log, concl_log, out / "finetune-moco" / "run0" / "log.jsonl"],
          knn_reference={str(moco_log): ref, str(concl_log): random_init_knn(out / "concl")}
          ).save(out / "curves.png")
knn = [r["knn_accuracy"] for r in map(json.loads, moco_log.read_text().splitlines()) if "knn_accuracy" in r]
rnd, moco = (json.loads((out / d / "metrics.json").read_text()) for d in ("probe-random", "probe-moco"))
ft = json.loads((out / "finetune-moco" / "metrics.json").read_text())
pics = sorted(map(str, [out / "curves.png", *(out / "concl").glob("concepts_epoch*.png"),
                        *(out / "finetune-moco" / "run0" / "vis").glob("*.png")]))
print("pictures:\n  " + "\n  ".join(pics))

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
           platform.processor() or platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
load1 = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
wall = int(time.time()) - start
bank, queries = monitor_sets(json.loads((out / "moco" / "args.json").read_text()))
print(f"""
---- tour summary (README quotes this block as-is) ----
machine: {cpu}, {cores} cores, {gpu}, torch {torch.__version__}; load average {load0} at the start, {load1} at the end
time: {wall // 60}m{wall % 60:02d}s in all ({steps}, pictures and summary {int(time.time()) - t0}s){reused}
kNN accuracy on the monitor's tiles (20-NN, {bank}-tile bank, {queries} queries): random init {ref:.1f}%, MoCo v2 {' -> '.join(f'{v:.1f}' for v in knn)}% after epochs {', '.join(str(e + 1) for e in range(len(knn)))}
kNN accuracy of linear_probe.py (20-NN, {moco['num_train']} labelled tiles, {moco['num_test']} test tiles): random init {rnd['knn_accuracy']:.1f}%, MoCo v2 {moco['knn_accuracy']:.1f}%
Mask R-CNN from MoCo v2, 80 steps on demo glands: box AP50 {ft['bbox']['AP50']:.1f}, mask AP50 {ft['segm']['AP50']:.1f} (AP {ft['bbox']['AP']:.1f} / {ft['segm']['AP']:.1f})""")
PY
