"""Run by tests/test_twins.py (and scripts/gpu_check.sh), alone or under torchrun: every
pre-training method for one tiny epoch with --amp (bf16 autocast, on the CPU too) and
--channels-last, all in one process (imports once). For each method one line:
"twin <method> ok <conv output dtypes seen> <channels_last conv inputs seen>" or
"twin <method> FAIL <error>". Extra arguments are passed to every method (e.g. --device-aug).

    python tests/twin_driver.py OUT_DIR [method ...] [-- extra flags]
"""
import importlib
import json
import math
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common import dist as cdist  # noqa: E402

METHODS = ("simclr", "moco", "byol", "densecl", "pcl", "detcon", "mcl", "pixcon", "concl")
BASE = ["--data", "demo", "--demo-size", "8", "--batch-size", "4", "--img-size", "32",
        "--workers", "0", "--epochs", "1", "--knn-every", "0", "--amp", "--channels-last"]
EXTRA = {  # the smallest settings each method accepts; warm-ups off so every loss term runs
    "simclr": ["--warmup-epochs", "0"], "byol": ["--warmup-epochs", "0"],
    "moco": ["--queue-size", "16"], "densecl": ["--queue-size", "16"],
    "pcl": ["--queue-size", "16", "--warmup-epochs", "0", "--num-clusters", "8", "--pcl-r", "2"],
    "detcon": ["--warmup-epochs", "0"], "mcl": ["--warmup-epochs", "0", "--levels", "2"],
    "pixcon": ["--queue-size", "16", "--warmup-epochs", "0", "--blur-kernel", "3"],
    "concl": ["--queue-size", "16", "--warmup-epochs", "0"],
}


def main(out, methods, extra):
    seen = set()
    conv_forward = nn.Conv2d.forward

    def recording(self, x):
        y = conv_forward(self, x)
        if torch.is_grad_enabled():
            seen.add((str(y.dtype).replace("torch.", ""),
                      x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                      and not x.is_contiguous()))
        return y
    nn.Conv2d.forward = recording
    sync_forward = nn.SyncBatchNorm.forward

    def recording_sync(self, x):
        seen.add(("syncbn", None))
        return sync_forward(self, x)
    nn.SyncBatchNorm.forward = recording_sync
    for m in methods:
        seen.clear()
        folder = out / m
        sys.argv = [f"{m}.py", *BASE, *EXTRA[m], *extra, "--output-dir", str(folder)]
        try:
            importlib.import_module(m).main()
            losses = [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
            assert losses and all(math.isfinite(v) for v in losses), losses
            dtypes = sorted({d for d, c in seen if c is not None})
            print(f"twin {m} ok {','.join(dtypes)} channels_last={any(c for _, c in seen)} "
                  f"syncbn={('syncbn', None) in seen}", flush=True)
        except BaseException as e:  # noqa: BLE001 - report and go on (or stop: a rank may hang)
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            print(f"twin {m} FAIL {last}", flush=True)
            traceback.print_exc()
            if cdist.get_world_size() > 1:
                sys.exit(1)
    cdist.cleanup()


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    main(Path(argv[0]), argv[1:] or list(METHODS), extra)
