"""Run by tests/test_cluster.py under `torchrun --nproc_per_node=2` (gloo): cases that need a
real process group. Prints "ok <case>" on every rank that passes; anything else fails the test.

node-local: every rank gets its own folder at "the same path" (as node-local storage would) and
    must refuse to start with one line; the same folder for both starts.
headers: the image headers are read by local rank 0 only, and both ranks name the bad file.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import moco  # noqa: E402
from common import data as cdata  # noqa: E402
from common import dist as cdist  # noqa: E402
from common import train as ctrain  # noqa: E402


def run_in(folder):
    signal.signal = lambda *a: None  # noqa: E731 - no handlers needed here
    args = moco.get_args(["--data", "demo", "--batch-size", "4", "--output-dir", str(folder)])
    return ctrain.Run(args, "moco")


def main(base):
    rank, world, local, _ = cdist.init_distributed()
    # node-local: rank r's folder holds only what rank r wrote (looked for again for 2 s, not
    # the 30 s a shared file system's cache may need)
    os.environ["OUTPUT_DIR_WAIT_S"] = "2"
    try:
        run_in(base / f"node{rank}")
        print(f"rank {rank}: node-local folders were accepted", flush=True)
    except cdata.DataError as e:
        assert "storage every node sees" in str(e), e
        print("ok node-local", flush=True)
    run_in(base / "shared")  # one folder for both: accepted

    # headers: 5 images and a broken one, checked by local rank 0 only
    imgs = base / "imgs"
    if rank == 0:
        imgs.mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(imgs / f"{i}.png")
        (imgs / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cdist.barrier()
    calls = []
    header_error = cdata._header_error
    cdata._header_error = lambda p: calls.append(p) or header_error(p)
    try:
        cdata.folder_dataset(imgs)
        print(f"rank {rank}: the broken file was not named", flush=True)
    except cdata.DataError as e:
        assert "5.png" in str(e), e
        assert len(calls) == (6 if local == 0 else 0), (rank, len(calls))
        print("ok headers", flush=True)
    cdist.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
