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


# One counter per worker process, though tests import this file both as `conftest` and as
# `tests.conftest` (two module objects): it lives on a module of its own.
_PORTS = sys.modules.setdefault("_free_port_counters", type(sys)("_free_port_counters")).__dict__


def free_port():
    """A port for a torchrun rendezvous or a process group, free now. The suite runs on two
    pytest-xdist workers (pytest.ini), so a port the OS picked and released could be taken by the
    other worker's processes before it is bound again. Instead: below Linux's ephemeral range
    (32768-60999: no outgoing connection takes it meanwhile), each worker from its own block of
    2,000, starting at an offset of the process id (a second pytest run elsewhere starts
    elsewhere), the next port in turn that binds now."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    n = int(worker[2:]) % 10 if worker[2:].isdigit() else 0
    if n not in _PORTS:
        _PORTS[n] = os.getpid() % 2000
    for _ in range(2000):
        _PORTS[n] = (_PORTS[n] + 1) % 2000
        port = 12000 + 2000 * n + _PORTS[n]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {12000 + 2000 * n}-{12000 + 2000 * n + 1999}")


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


def run_main(script, argv, monkeypatch, capsys):
    """`python SCRIPT ARGV...`'s __main__ run in this process, for a start that must be refused:
    no interpreter and torch import per case (~6 s of CPU each). -> (exit code, stderr). What a
    start sets for its process (signal handlers, the seed, common.train's record of the run and
    of the folder it made) is put back afterwards. Keep one refusal per script in a fresh
    process (run_script), as a user sees it."""
    import runpy
    import signal

    from common import train as ctrain
    for name in ("_run", "_new_run_folder", "_unfinished_start"):
        monkeypatch.setattr(ctrain, name, [] if name == "_unfinished_start" else None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    capsys.readouterr()
    try:
        with torch.random.fork_rng():
            runpy.run_path(str(REPO / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, capsys.readouterr().err


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Models run inside the pytest process too: one thread each keeps a loaded 2-core machine
    from thrashing (and matches the subprocesses, which get OMP_NUM_THREADS=1)."""
    torch.set_num_threads(1)


# moco.py on two processes (gloo), 3 epochs of 2 steps, uninterrupted: the reference that both
# test_cluster's SIGTERM test and test_moco_runs' two-process resume test must reproduce (one
# torchrun run for the two when they share a pytest-xdist worker, one per worker otherwise; the
# monitor runs after the last epoch, as by default)
MOCO_TWO = ["moco.py", "--data", "demo", "--demo-size", "16", "--img-size", "32", "--queue-size",
            "64", "--batch-size", "4", "--epochs", "3", "--workers", "1"]


@pytest.fixture(scope="session")
def moco_two_reference(tmp_path_factory):
    """(folder, stdout) of the uninterrupted MOCO_TWO run."""
    out = tmp_path_factory.mktemp("moco_two") / "ref"
    return out, run_script(*MOCO_TWO, "--output-dir", out, nproc=2).stdout


@pytest.fixture
def shared_samples():
    d = SHARED / "samples"
    if not d.is_dir():
        pytest.skip("../shared/samples is absent")
    return d
