import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(*argv, nproc=1, timeout=600, check=True, env=None):
    """Run a repo script as a user would: `python X.py ...` or `torchrun --nproc_per_node=N`."""
    if nproc == 1:
        cmd = [sys.executable, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *argv]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                             f"--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Models run inside the pytest process too: one thread each keeps a loaded 2-core machine
    from thrashing (and matches the subprocesses, which get OMP_NUM_THREADS=1)."""
    torch.set_num_threads(1)


@pytest.fixture
def shared_samples():
    d = SHARED / "samples"
    if not d.is_dir():
        pytest.skip("../shared/samples is absent")
    return d
