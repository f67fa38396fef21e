"""The one prepared GPU check (issue 23), run by scripts/gpu_check.sh: every CUDA-only path once,
in one call of at most ~10 minutes on one GPU, with a JSON of results and a log.

    python scripts/gpu_check.py OUT [--cpu]

Phases (each has a time limit, generous with --cpu, where a loaded machine may be slow; a failing
phase is recorded and the next one runs):
  versions      python, torch, torchvision, CUDA, cuDNN, NCCL, the GPU, scikit-image, pycocotools
  collectives   NCCL at world size 1 through the real collective code: the channels_last gather,
                the gather with gradients, a non-contiguous all-reduce, shuffle/unshuffle
  twins         two processes on the one GPU (gloo with CUDA tensors), every method one demo
                epoch with --amp --device-aug; SyncBN and bf16 must be seen running
  sigterm       torchrun with two processes, SIGTERM to every process of the tree: one stop after
                the current step, a checkpoint at that step, a rerun that finishes
  fp32_islands  the decision and logit functions (item 4) on bf16 inputs inside CUDA autocast
                against the same inputs without autocast: decisions identical, logits close
  step_time     benchmarks/step_time.py at the paper's per-GPU batches (8 GPUs), peak memory
  finetune      benchmarks/finetune_time.py with cuDNN autotuning on and off
--cpu runs the same phases shrunk on the CPU (gloo; no SyncBN; the test suite runs it).
"""
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sh(cmd, log, timeout, env=None):
    """Run cmd (list) in the repository, its output appended to the log; -> (rc, output)."""
    log.write(f"\n$ {' '.join(map(str, cmd))}\n")
    log.flush()
    try:
        p = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, **(env or {})})
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {timeout}s", 124
    out = out if isinstance(out, str) else out.decode(errors="replace")
    log.write(out)
    log.flush()
    return rc, out


def torchrun(n, port):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
            f"--master_port={port}"]


# -- phases ---------------------------------------------------------------------------------------

def versions(ctx):
    import torch
    import torchvision
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
         "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
         "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
         if torch.cuda.is_available() else None, "cpus": os.cpu_count(), "machine": platform.platform()}
    for mod in ("skimage", "pycocotools", "tqdm", "numpy"):
        try:
            v[mod] = getattr(__import__(mod), "__version__", "present")
        except ImportError:
            v[mod] = None
    ok = v["pycocotools"] is not None and (ctx["cpu"] or v["gpu"] is not None)
    return ok, v


def collectives_worker():
    """Under torchrun --nproc_per_node=1: the collective code paths with a real process group."""
    import torch
    import torch.distributed as dist
    from common import dist as cdist
    os.environ.setdefault("DIST_BACKEND", "")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    cdist.is_dist = lambda: True  # world size 1 would skip the collectives: force them
    res = {"backend": dist.get_backend()}
    x = torch.randn(4, 8, 5, 6, device=dev).contiguous(memory_format=torch.channels_last)
    res["gather_channels_last"] = torch.equal(cdist.concat_all_gather(x), x)
    y = x.clone().requires_grad_()
    g = cdist.gather_with_grad(y)
    g.sum().backward()
    res["gather_with_grad"] = torch.equal(g.detach(), x) and torch.equal(y.grad, torch.ones_like(x))
    t = torch.arange(12., device=dev).view(3, 4).t()
    res["all_reduce_non_contiguous"] = torch.equal(cdist.all_reduce(t.clone()), t)
    k = torch.randn(8, 16, device=dev)
    s, u = cdist.batch_shuffle(k)
    res["shuffle_unshuffle"] = torch.equal(cdist.batch_unshuffle(s, u), k)
    print("RESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()


def collectives(ctx):
    rc, out = sh(torchrun(1, ctx["port"]) + [__file__, "--collectives-worker"], ctx["log"],
                 300 if ctx["cpu"] else 120)
    res = [json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")]
    ok = rc == 0 and bool(res) and all(v for k, v in res[0].items() if k != "backend")
    return ok, res[0] if res else {"rc": rc}


def twins(ctx):
    from tests.twin_driver import METHODS
    folder = ctx["out"] / "twins"
    # --cpu: two methods (tests/test_twins.py runs them all on the CPU)
    methods = ["byol"] if ctx["cpu"] else list(METHODS)
    # the driver's per-method settings (queues of 16, 8 PCL clusters) hold for a global batch of
    # 8 (4 per process): keep it, and check the GPU path at the paper's image size
    extra = (["--device-aug"] if ctx["cpu"] else
             ["--device-aug", "--demo-size", "64", "--img-size", "224"])
    rc, out = sh(torchrun(2, ctx["port"] + 1) + ["tests/twin_driver.py", folder, *methods, "--",
                                                 *extra],
                 ctx["log"], 300 if ctx["cpu"] else 240, env={"DIST_BACKEND": "gloo"})
    lines = {}
    for line in out.splitlines():
        if line.startswith("twin "):
            _, m, *rest = line.split()
            lines.setdefault(m, " ".join(rest))
    want_sync = not ctx["cpu"]
    good = {m: l.startswith("ok") and "bfloat16" in l and "channels_last=True" in l
            and (f"syncbn={want_sync}" in l or m in ("moco", "densecl", "pcl", "concl"))
            for m, l in lines.items()}
    return rc == 0 and set(good) == set(methods) and all(good.values()), {"rc": rc, **lines}


def process_tree(pid):
    """pid and all its descendants (from /proc)."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += kids.get(out[-1], [])
    return out


def sigterm(ctx):
    import torch
    folder = ctx["out"] / "sigterm"
    cmd = torchrun(2, ctx["port"] + 2) + [
        "moco.py", "--data", "demo", "--demo-size", "16" if ctx["cpu"] else "512", "--batch-size",
        "4" if ctx["cpu"] else "64", "--img-size", "32" if ctx["cpu"] else "224", "--queue-size",
        "64" if ctx["cpu"] else "1024", "--epochs", "2" if ctx["cpu"] else "10",
        "--workers", "1" if ctx["cpu"] else "4",
        "--knn-every", "0", "--output-dir", folder]
    env = {**os.environ, "DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    ctx["log"].write(f"\n$ {' '.join(map(str, cmd))}  (SIGTERM to the tree after epoch 0)\n")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    t0 = time.time()
    while not (folder / "checkpoint.pth").exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    time.sleep(0.3 if ctx["cpu"] else 0.1)  # into epoch 1 (an H200 runs 8 steps in well under 1 s)
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    ctx["log"].write(out)
    stops = [l.split("stopped by SIGTERM at ")[1].split(";")[0] for l in out.splitlines()
             if "stopped by SIGTERM at " in l]
    res = {"stops": stops, "aborted": "KeyboardInterrupt" in out or "Connection closed" in out}
    if (folder / "checkpoint.pth").exists():
        ck = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=False)
        res["checkpoint"] = f"epoch {ck['epoch']} step {ck['step']}"
    rc, out = sh([c for c in cmd], ctx["log"], 300, env={"DIST_BACKEND": "gloo"})
    res["rerun_rc"] = rc
    res["resumed"] = "resumed from" in out
    at_step = bool(stops) and (stops[0] == res.get("checkpoint") or
                               stops[0].startswith("the end of epoch"))
    return len(stops) == 1 and not res["aborted"] and at_step and rc == 0 and res["resumed"], res


def fp32_islands(ctx):
    """Item 4's functions on bf16 inputs inside autocast vs outside: the same results."""
    import torch
    import densecl
    import moco
    import pcl
    import simclr
    from common import masks
    dev = torch.device("cpu" if ctx["cpu"] else "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dev, torch.bfloat16)
    q, k, z1, z2, cells = r(4, 64, 49), r(4, 64, 49), r(32, 128), r(32, 128), r(2, 49, 32)
    queue = torch.nn.functional.normalize(r(256, 128).float(), dim=1)
    cases = {
        "densecl.match": (lambda: densecl.match(q, k), "equal"),
        "moco.moco_logits": (lambda: moco.moco_logits(z1, z2, queue, 0.2), "close"),
        "simclr.nt_xent": (lambda: simclr.nt_xent(z1, z2, 0.1), "close"),
        "pcl.kmeans": (lambda: pcl.kmeans(z1.float(), 4, iters=5, redo=2)[1], "equal"),
        "masks.kmeans": (lambda: masks.kmeans(cells, 4), "equal"),
    }
    res, ok = {}, True
    for name, (fn, how) in cases.items():
        try:
            torch.manual_seed(0)  # k-means inits draw from the global RNG
            plain = fn()
            torch.manual_seed(0)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                auto = fn()
            plain, auto = (x[0] if isinstance(x, tuple) else x for x in (plain, auto))
            same = torch.equal(plain, auto) if how == "equal" else \
                torch.allclose(plain.float(), auto.float(), rtol=1e-5, atol=1e-5)
            res[name] = {"same": bool(same), "dtype": str(auto.dtype)}
            ok &= bool(same)
        except Exception as e:  # noqa: BLE001 - an API change is a finding, not a crash
            res[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            ok = False
    return ok, res


def step_time(ctx):
    res, ok = {}, True
    groups = ([("moco_v2", 8)] if ctx["cpu"] else
              [("simclr,byol,detcon_S,detcon_B", 128),  # global 1024 / 8 GPUs
               ("moco_v2,densecl,concl_kmeans,mcl,pixcon_sim", 32)])  # global 256 / 8
    for methods, batch in groups:
        js = ctx["out"] / f"step_time_{batch}.json"
        cmd = [sys.executable, "benchmarks/step_time.py", "--methods", methods, "--json", js]
        cmd += (["--quick", "--warmup", "0", "--steps", "1", "--samples", "8", "--data-workers",
                 "1"] if ctx["cpu"] else
                ["--batch-size", batch, "--steps", "3", "--samples", "100"])
        rc, out = sh(cmd, ctx["log"], 300 if ctx["cpu"] else 200)
        table = [l for l in out.splitlines() if l.startswith("|")]
        res[f"batch_{batch}"] = {"rc": rc, "table": table}
        ok &= rc == 0
    return ok, res


def finetune(ctx):
    res, ok = {}, True
    small = ["--size", "128", "96", "--rois-per-image", "16", "--proposals", "50", "--warmup",
             "0", "--steps", "1", "--batch-size", "1"]
    for on in ((False,) if ctx["cpu"] else (True, False)):  # cuDNN: nothing to compare on a CPU
        js = ctx["out"] / f"finetune_cudnn_{'on' if on else 'off'}.json"
        code = ("import runpy, sys, torch; torch.backends.cudnn.benchmark = %s; "
                "sys.argv = ['finetune_time.py'] + sys.argv[1:]; "
                "runpy.run_path('benchmarks/finetune_time.py', run_name='__main__')" % on)
        cmd = [sys.executable, "-c", code, "--json", js] + (small if ctx["cpu"] else [])
        rc, out = sh(cmd, ctx["log"], 300 if ctx["cpu"] else 120)
        res["cudnn_benchmark_" + ("on" if on else "off")] = {
            "rc": rc, "last": [l for l in out.splitlines() if l.strip()][-3:]}
        ok &= rc == 0
    return ok, res


PHASES = [versions, collectives, twins, sigterm, fp32_islands, step_time, finetune]


def main():
    if "--collectives-worker" in sys.argv:
        return collectives_worker()
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cpu = "--cpu" in sys.argv
    import random
    ctx = {"out": out, "cpu": cpu, "port": random.randint(20000, 40000),
           "log": open(out / "gpu_check.log", "a")}
    results = {"mode": "cpu" if cpu else "gpu", "phases": {}}
    t_all = time.time()
    for phase in PHASES:
        t0 = time.time()
        try:
            ok, details = phase(ctx)
        except Exception as e:  # noqa: BLE001 - record and go on
            ok, details = False, {"error": f"{type(e).__name__}: {e}"[:500]}
        results["phases"][phase.__name__] = {"ok": bool(ok), "seconds": round(time.time() - t0, 1),
                                             **({"details": details})}
        line = f"{phase.__name__}: {'ok' if ok else 'FAILED'} ({time.time() - t0:.0f}s)"
        print(line, flush=True)
        ctx["log"].write(f"\n=== {line}\n")
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    results["seconds"] = round(time.time() - t_all, 1)
    results["ok"] = all(p["ok"] for p in results["phases"].values())
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"gpu_check: {'all ok' if results['ok'] else 'FAILURES'} in {results['seconds']:.0f}s; "
          f"{out / 'gpu_check.json'}, {out / 'gpu_check.log'}", flush=True)
    sys.exit(0 if results["ok"] else 1)


if __name__ == "__main__":
    main()
