#!/usr/bin/env bash
# The one-command tour, on CPU in about five minutes, no download:
#   1. pre-train MoCo v2 briefly on the demo tiles (kNN monitor every epoch),
#   2. probe its frozen features and a random ResNet-18's (linear probe + 20-NN),
#   3. fine-tune Mask R-CNN on demo glands from the MoCo backbone (COCO AP),
#   4. pre-train b-ConCL for two epochs to draw its concept maps,
# then print the three numbers and save the pictures (loss curves, concepts, detections).
#
#   bash scripts/demo.sh [OUTPUT_DIR]        (default runs/tour; rerunning resumes / reuses)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/tour}
SMALL=(--data demo --img-size 64 --batch-size 32 --queue-size 512 --workers 2)

echo "== 1/4 MoCo v2 pre-training on demo tiles"
python moco.py "${SMALL[@]}" --epochs 3 --knn-every 1 --output-dir "$OUT/moco"

echo "== 2/4 linear probe + kNN: random init vs MoCo v2"
python linear_probe.py --data demo --img-size 64 --runs 1 --pretrained random \
    --output-dir "$OUT/probe-random"
python linear_probe.py --data demo --img-size 64 --runs 1 --pretrained "$OUT/moco/backbone.pth" \
    --output-dir "$OUT/probe-moco"

echo "== 3/4 Mask R-CNN on demo glands from the MoCo v2 backbone"
# lr 0.16 at the paper's batch 16 = 0.02 at batch 2 after linear scaling
python finetune_maskrcnn.py --data demo --img-size 128 --batch-size 2 --max-iters 80 --lr 0.16 \
    --precise-bn 10 --runs 1 --vis 4 --workers 1 --pretrained "$OUT/moco/backbone.pth" \
    --output-dir "$OUT/finetune-moco"

echo "== 4/4 b-ConCL, two epochs, for its concept maps"
python concl.py "${SMALL[@]}" --epochs 2 --warmup-epochs 0 --vis-every 1 --output-dir "$OUT/concl"

python -m common.plots "$OUT/moco/log.jsonl" "$OUT/concl/log.jsonl" \
    "$OUT/finetune-moco/run0/log.jsonl" --out "$OUT/curves.png" > /dev/null
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rnd, moco = (json.loads((out / d / "metrics.json").read_text()) for d in ("probe-random", "probe-moco"))
ft = json.loads((out / "finetune-moco" / "metrics.json").read_text())
print(f"\nkNN accuracy on demo tiles: random init {rnd['knn_accuracy']:.1f}%, MoCo v2 {moco['knn_accuracy']:.1f}%")
print(f"linear probe accuracy:      random init {rnd['accuracy']:.1f}%, MoCo v2 {moco['accuracy']:.1f}%")
print(f"Mask R-CNN on demo glands from MoCo v2: box AP50 {ft['bbox']['AP50']:.1f}, mask AP50 {ft['segm']['AP50']:.1f} (AP {ft['bbox']['AP']:.1f} / {ft['segm']['AP']:.1f})")
pics = sorted(map(str, [out / "curves.png", *(out / "concl").glob("concepts_epoch*.png"),
                        *(out / "finetune-moco" / "run0" / "vis").glob("*.png")]))
print("pictures:\n  " + "\n  ".join(pics))
PY
