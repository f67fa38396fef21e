#!/usr/bin/env bash
# The one prepared GPU check (issue 23): every CUDA-only path once, in one call of at most ~10
# minutes on one GPU (no network needed). Writes $OUT/gpu_check.json and $OUT/gpu_check.log
# (OUT defaults to ./gpu_check_out). Phases and what each asserts: scripts/gpu_check.py; then the
# device crop's check (scripts/gpu_check_crop.py: $OUT/gpu_check_crop.json and .log).
#
#   bash scripts/gpu_check.sh          # on the GPU machine
#   bash scripts/gpu_check.sh --cpu    # the same, shrunk, on the CPU (the test suite runs this)
#
# pycocotools travels as a wheel: prepare it where there is network with
#   pip download pycocotools -d wheels      (git-ignored folder at the repository root)
# and it is installed from there when missing.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if ! "$PY" -c "import pycocotools" 2>/dev/null; then
  if ls wheels/pycocotools-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --no-index --find-links wheels pycocotools >>"$OUT/gpu_check.log" 2>&1 \
      || echo "note: pycocotools did not install from wheels/ (see $OUT/gpu_check.log)"
  else
    echo "note: pycocotools missing and no wheels/pycocotools-*.whl (pip download pycocotools -d wheels)"
  fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$PY" scripts/gpu_check.py "$OUT" "$@"
rc=$?
if [[ " $* " != *" --cpu "* ]]; then  # the device crop (issue 25); tests/test_crop.py runs its --cpu mode
  "$PY" scripts/gpu_check_crop.py --json "$OUT/gpu_check_crop.json" 2>&1 | tee "$OUT/gpu_check_crop.log"
  crop_rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] && rc=$crop_rc
fi
exit "$rc"
