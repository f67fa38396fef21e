"""Which self-supervised objective transfers best: ConCL's Table 1 in one command, on any data,
resumable, with its run-to-run noise.

For each method: pre-train it with its own paper recipe (only the flags given here are shared
and override it), fine-tune Mask R-CNN from its backbone on each target with the paper's
protocol (`finetune_maskrcnn.py`, --runs seeds), optionally probe its frozen features
(`linear_probe.py`: linear + kNN). Every step is a plain call of the repository's scripts into
its own folder, so a rerun skips what is finished and resumes what is not (the scripts resume
themselves); every command line is logged in OUT/commands.sh, so any cell can be rerun alone.

    # ConCL Table 1 (NCT pre-training, GlaS + CRAG fine-tuning, 5 runs): GPU work
    python benchmarks/transfer.py --preset table1 --data-root /data/NCT-CRC-HE-100K-NONORM \\
        --target glas=/data/GlaS crag=/data/CRAG_v2 --launcher "torchrun --nproc_per_node=8" \\
        --out runs/table1
    # every method on the demo data, CPU, minutes (a smoke test, not science)
    python benchmarks/transfer.py --preset demo --out runs/transfer-demo
    # real H&E on the CPU: sample images cut into tiles, CPM-15 nuclei, image07 held out
    python benchmarks/transfer.py --preset real-cpu --samples ../shared/samples --out runs/real
    # your own selection: configurations by name, `random`, backbones you bring, variants
    python benchmarks/transfer.py --methods moco_v2 concl_kmeans random in1k=r18_in1k.pth \\
        "gconcl_s3=concl_grid --grid-size 3" --data nct --data-root /data/NCT \\
        --target glas=/data/GlaS --runs 5 --probe --out runs/mine

A method is a configuration name (`--list` prints them with their scripts and flags), `random`,
`NAME=PATH` (a backbone file: any checkpoint `finetune_maskrcnn.py --pretrained` loads), or
`NAME=CONFIG FLAGS...` (a configuration with extra flags of its script, e.g. another grid).

OUT holds `pretrain/<method>/`, `finetune/<target>/<method>/`, `probe/<method>/` (each a script's
own output folder), `steps/` (a record per finished step: its command; a step is redone only
when its command changes, and then the script resumes), `steps.jsonl` (every attempt: command,
start, wall seconds, exit status), `logs/` (each step's output), `commands.sh`, and the report:
`results.md` (Table 1's layout, mean ± std over runs, probe columns, pre-training cost, and
which differences are within the run-to-run noise by Welch's t-test), `results.json` (every
run's numbers) and `results.png` (one panel per target and metric: runs as points, mean ± std).
"""
import argparse
import datetime
import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# ---------------------------------------------------------------------------------------------
# Configurations: name -> (script, flags selecting it, label as Table 1 prints it). Everything
# else is the script's default, i.e. the paper's NCT recipe.
CONFIGS = {
    "moco_v1": ("moco.py", ["--version", "v1"], "MoCo-v1"),
    "moco_v2": ("moco.py", ["--version", "v2"], "MoCo-v2"),
    "simclr": ("simclr.py", [], "SimCLR"),
    "simclr_histo": ("simclr.py", ["--aug", "histo"], "SimCLR (Ciga et al.'s aug.)"),
    "byol": ("byol.py", [], "BYOL"),
    "densecl": ("densecl.py", [], "DenseCL"),
    "pcl": ("pcl.py", [], "PCL-v2"),
    "concl_grid": ("concl.py", ["--concept", "grid"], "g-ConCL (s=5)"),
    "concl_fh": ("concl.py", ["--concept", "fh"], "fh-ConCL (s=500)"),
    "concl_kmeans": ("concl.py", ["--concept", "kmeans"], "b-ConCL (f4)"),
    "detcon_S": ("detcon.py", ["--variant", "S"], "DetCon_S"),
    "detcon_B": ("detcon.py", ["--variant", "B"], "DetCon_B"),
    "mcl": ("mcl.py", [], "MCL"),
    "pixcon_sr": ("pixcon.py", ["--match", "sr"], "PixCon-SR"),
    "pixcon_sim": ("pixcon.py", ["--match", "sim"], "PixCon-Sim"),
    "pixcon_coord": ("pixcon.py", ["--match", "coord"], "PixCon-Coord"),
}
ALL = ["random", *CONFIGS]  # `--methods all`

# Table 1's rows (Supervised needs your ImageNet file: add `supervised=r18_in1k.pth`; bas-ConCL
# needs BASNet's saliency maps: add "bas=concl_file --concept-dir MASKS --concept-threshold 128").
# The paper trained PCL-v2 with the released code; here it is pcl.py.
TABLE1 = ["random", "simclr", "byol", "pcl", "moco_v1", "moco_v2", "densecl",
          "concl_grid_s3=concl_grid --grid-size 3", "concl_grid",
          "concl_grid_s7=concl_grid --grid-size 7", "concl_fh_s50=concl_fh --fh-scale 50",
          "concl_fh", "concl_kmeans", "concl_kmeans_f5=concl_kmeans --cluster-stage 5"]
CONFIGS["concl_file"] = ("concl.py", ["--concept", "file"], "bas-ConCL / your masks")
LABELS = {"concl_grid_s3": "g-ConCL (s=3)", "concl_grid_s7": "g-ConCL (s=7)",
          "concl_fh_s50": "fh-ConCL (s=50)", "concl_kmeans_f5": "b-ConCL (f5)"}

# Flags that fit a run of a few hundred tiles (queues, clusters and warm-ups of NCT's 100,000
# would not): the demo and real-cpu presets append them to each configuration's own flags.
SMALL = {"moco.py": ["--queue-size", "256"], "densecl.py": ["--queue-size", "256"],
         "concl.py": ["--queue-size", "256", "--warmup-epochs", "1", "--vis-every", "0"],
         # k - batch >= r (pcl.py refuses less); k <= tiles (demo preset: 64)
         "pcl.py": ["--queue-size", "256", "--warmup-epochs", "1", "--num-clusters", "32", "48",
                    "--pcl-r", "16"],
         "pixcon.py": ["--queue-size", "256", "--warmup-epochs", "1"],
         "simclr.py": ["--warmup-epochs", "1"], "byol.py": ["--warmup-epochs", "1"],
         "detcon.py": ["--warmup-epochs", "1", "--vis-tiles", "0"],
         "mcl.py": ["--warmup-epochs", "1"]}

# The metric columns of Table 1 (the paper prints AP and AP75; AP50 is added)
COLUMNS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"),
           ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75")]
TARGET_LABELS = {"glas": "GlaS", "crag": "CRAG", "instances": "instances", "demo": "demo glands",
                 "testA": "Test A", "testB": "Test B"}


def col_title(t, k, html=True):
    sup = "bb" if t == "bbox" else "mk"
    sub = k[2:]
    if not html:
        return f"AP{sup}{sub}"
    return f"AP<sup>{sup}</sup>" + (f"<sub>{sub}</sub>" if sub else "")


# ---------------------------------------------------------------------------------------------
# Welch's t-test, with the t distribution's CDF from the regularised incomplete beta function
# (a continued fraction, Lentz's method): no scipy at run time.

def _betacf(a, b, x, iters=300, eps=1e-15):
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """Regularised incomplete beta I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast here
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df = inf: the normal)."""
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def welch(a, b):
    """Welch's unequal-variance t-test of two samples -> (t, df, two-sided p); None for p where
    either sample has fewer than 2 values. Zero variance in both: p 1 if the means are equal,
    else 0 (the runs are deterministic and differ)."""
    a, b = [x for x in a if x is not None], [x for x in b if x is not None]
    if len(a) < 2 or len(b) < 2:
        return None, None, None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0:
        return (0.0, None, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), None, 0.0)
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return t, df, 2.0 * (1.0 - t_cdf(abs(t), df))


def mean_std(values):
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None)


# ---------------------------------------------------------------------------------------------
# Methods and steps

class Method:
    """kind: pretrain (script + flags), random, or file (a backbone someone brings)."""

    def __init__(self, spec):
        self.spec = spec
        name, sep, rest = spec.partition("=")
        name, rest = name.strip(), rest.strip()
        if not sep:
            rest = name
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise SystemExit(f"error: method {spec!r}: the name {name!r} must be letters, digits, "
                             "_ . + - (it names folders)")
        self.name, self.extra, self.config = name, [], None
        tokens = shlex.split(rest)
        if rest == "random":
            self.kind, self.label = "random", "Rand. Init."
        elif tokens and tokens[0] in CONFIGS:
            self.kind, self.config, self.extra = "pretrain", tokens[0], tokens[1:]
            self.script, self.flags, label = CONFIGS[self.config]
            self.label = LABELS.get(name, label if not self.extra else name)
        elif sep and (Path(rest).exists() or rest.endswith((".pth", ".pt", ".tar", ".ckpt"))):
            self.kind, self.path, self.label = "file", rest, name
        else:
            raise SystemExit(f"error: method {spec!r}: not a configuration ({', '.join(ALL)}), "
                             "nor NAME=PATH of a backbone file, nor NAME=CONFIG FLAGS")


def launcher_argv(launcher):
    """'python' -> this interpreter; 'torchrun ...' -> python -m torch.distributed.run ... (the
    same program, found without PATH)."""
    words = shlex.split(launcher)
    if not words:
        raise SystemExit("error: --launcher is empty")
    if words[0] in ("python", "python3"):
        return [sys.executable, *words[1:]]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    return words


def devices(launcher):
    """Processes the launcher starts (nproc_per_node x nnodes; 1 for python)."""
    words, n, nodes = shlex.split(launcher), 1, 1
    for i, w in enumerate(words):
        for flag in ("--nproc_per_node", "--nproc-per-node", "--nnodes"):
            if w == flag or w.startswith(flag + "="):
                v = w.split("=", 1)[1] if "=" in w else words[i + 1]
                v = int(v.split(":")[-1]) if v.split(":")[-1].isdigit() else 1
                if flag == "--nnodes":
                    nodes = v
                else:
                    n = v
    return n * nodes


class Steps:
    """Runs each step once: a step whose record in OUT/steps/ holds the same command and whose
    output exists is skipped (no process started); any other is run, and resumes itself."""

    def __init__(self, out, launcher, dry_run=False):
        self.out, self.launcher, self.dry_run = Path(out), launcher, dry_run
        self.devices = devices(launcher)
        self.commands, self.failed = [], []
        for d in ("steps", "logs"):
            (self.out / d).mkdir(parents=True, exist_ok=True)

    def record(self, step):
        return self.out / "steps" / (step.replace("/", "__") + ".json")

    @staticmethod
    def inputs(argv):
        """What a step reads besides its command: the backbone file it fine-tunes or probes
        (its path stays the same when its pre-training is redone), by size and mtime."""
        if "--pretrained" in argv:
            f = Path(argv[argv.index("--pretrained") + 1])
            if f.is_file():
                st = f.stat()
                return [str(f), st.st_size, st.st_mtime_ns]
        return None

    def done(self, step, argv, product, launcher):
        r = self.record(step)
        if not (r.exists() and Path(product).exists()):
            return False
        rec = json.loads(r.read_text())
        if rec["argv"] != argv:
            return False
        inputs = self.inputs(argv)  # (records of older versions hold no inputs)
        if rec.get("launcher") == launcher and rec.get("inputs", inputs) == inputs:
            return True
        if "--output-dir" not in argv:
            return False
        # same command, but another launcher (another global batch) or a redone backbone: the
        # step's folder (which the scripts would resume or reuse) is moved aside, not reused
        folder = Path(argv[argv.index("--output-dir") + 1])
        if folder.exists():
            stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
            while (aside := folder.with_name(f"{folder.name}.old-{stamp}"
                                             + (f"-{n}" if n else ""))).exists():
                n += 1
            folder.rename(aside)
            print(f"note: {step}: its launcher or backbone changed; {folder} moved to {aside}")
        return False

    def run(self, step, argv, product, parallel=True):
        """argv: the script and its flags (relative paths from the repository root). product:
        the file that exists once the step finished. parallel: run under the launcher (else
        plain python: data preparation)."""
        argv = [str(a) for a in argv]
        launcher = self.launcher if parallel else "python"
        self.commands.append((step, f"{launcher} {shlex.join(argv)}"))
        if self.done(step, argv, product, launcher):
            return True
        if self.dry_run:
            return False
        log = self.out / "logs" / (step.replace("/", "__") + ".log")
        cmd = launcher_argv(launcher) + argv
        start = time.time()
        print(f"[{datetime.datetime.now():%H:%M:%S}] {step}: {launcher} {shlex.join(argv)}",
              flush=True)
        rc, cpu0 = None, resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            with open(log, "a") as f:
                f.write(f"\n$ {shlex.join(cmd)}\n")
                f.flush()
                proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
                try:
                    rc = proc.wait()
                except BaseException:  # Ctrl-C or SIGTERM (a pre-empted job): the script
                    proc.terminate()    # checkpoints after its step; wait for it, then stop
                    rc = proc.wait()
                    raise
        finally:
            wall, cpu1 = time.time() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
            with open(self.out / "steps.jsonl", "a") as f:  # cpu_s: every process it started
                f.write(json.dumps({"step": step, "command": cmd, "start": start,
                                    "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "rc": rc,
                                    "devices": self.devices if parallel else 1}) + "\n")
        ok = rc == 0 and Path(product).exists()
        print(f"    {'done' if ok else 'FAILED'} in {wall:.0f} s" + ("" if ok else
              f" (exit {rc}); its output: {log}\n      " + "\n      ".join(
                  log.read_text().strip().splitlines()[-8:])), flush=True)
        if ok:
            tmp = self.record(step).with_suffix(".tmp")
            tmp.write_text(json.dumps({"argv": argv, "launcher": launcher,
                                       "inputs": self.inputs(argv),
                                       "finished": datetime.datetime.now().isoformat()}, indent=2))
            os.replace(tmp, self.record(step))
        else:
            self.failed.append(step)
        return ok

    def cost(self, step):
        """Wall seconds, device-hours and CPU seconds over every attempt of a step (resumed
        runs add up)."""
        wall, dev_h, cpu, path = 0.0, 0.0, 0.0, self.out / "steps.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                if r["step"] == step:
                    wall += r["wall_s"]
                    dev_h += r["wall_s"] * r["devices"] / 3600
                    cpu += r.get("cpu_s", 0.0)
        return wall, dev_h, cpu

    def write_commands(self):
        lines = ["#!/usr/bin/env bash",
                 "# Every step of this benchmark, in order; run from the repository root. Each",
                 "# line alone reproduces its cell (a finished step's folder is resumed: remove",
                 "# it to recompute).", "set -euo pipefail", f"cd {shlex.quote(str(REPO))}"]
        for step, cmd in self.commands:
            lines += [f"# {step}", cmd]
        (self.out / "commands.sh").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Presets

def preset_args(a):
    """Fill the flags a preset sets where the user left them unset."""
    def default(name, value):
        if getattr(a, name) in (None, []):
            setattr(a, name, value)

    if a.preset == "demo":
        default("methods", ALL)
        default("data", "demo")
        default("demo_size", 64)
        default("epochs", 2)
        default("batch_size", 16)  # MCL's montages need a multiple of 16
        default("img_size", 64)
        default("workers", 0)
        default("target", ["demo"])
        default("runs", 2)
        default("finetune_args", "--demo-size 8 --img-size 64 --batch-size 2 --max-iters 20 "
                                 "--lr 0.16 --precise-bn 2 --workers 0 --vis 1 --log-every 10")
        default("probe_args", "--data demo --demo-size 120 --demo-test-size 60 --img-size 64 "
                              "--probe-epochs 20 --batch-size 32 --runs 1 --workers 0")
        a.small = True
        default("probe", True)
    elif a.preset == "table1":
        default("methods", TABLE1)
        default("data", "nct")
        default("runs", 5)
        if not a.data_root:
            raise SystemExit("error: --preset table1 needs --data-root (NCT-CRC-HE-100K; add "
                             "--train-list for ConCL's 80,000 tiles)")
        if not a.target or any("=" not in t for t in a.target):
            raise SystemExit("error: --preset table1 needs --target glas=GLAS_ROOT "
                             "crag=CRAG_ROOT")
    elif a.preset == "real-cpu":
        if not a.samples:
            raise SystemExit("error: --preset real-cpu needs --samples (the folder with "
                             "glas_images_only/ and cpm15_nuclei/)")
        samples = Path(a.samples).resolve()
        for sub in ("glas_images_only", "cpm15_nuclei"):
            if not (samples / sub).is_dir():
                raise SystemExit(f"error: --samples {samples}: no {sub}/ in it")
        data = Path(a.out).resolve() / "data"
        default("methods", ALL)
        default("data", "folder")
        default("data_root", str(data / "tiles"))
        default("epochs", 5)
        default("batch_size", 16)
        default("img_size", 64)
        default("workers", 0)
        default("runs", 3)
        default("target", [f"instances={data / 'cpm'}"])
        # tests/test_instances.py's real-nucleus recipe: 60 steps of four 128-px crops at native
        # scale, image07 scored whole at its 439 px
        default("finetune_args", "--img-size 439 --train-sizes 128 128 --rois-per-image 32 "
                                 "--proposals 300 --detections 400 --batch-size 4 --max-iters 60 "
                                 "--lr 0.32 --precise-bn 4 --workers 0 --vis 1 --log-every 10")
        a.small = True
        a.prepare = [  # (step, argv, product)
            ("prepare/tiles", ["-m", "common.tiles", samples / "glas_images_only",
                               samples / "cpm15_nuclei", data / "tiles", "--size", "128",
                               "--exclude", "image07"], data / "tiles"),
            ("prepare/cpm", ["-m", "common.glands", "convert-cpm", "--src",
                             samples / "cpm15_nuclei", "--out", data / "cpm_whole", "--test",
                             "image07"], data / "cpm_whole" / "test"),
            ("prepare/cpm-crops", ["-m", "common.tiles", data / "cpm_whole", data / "cpm",
                                   "--size", "128", "--instances"], data / "cpm" / "test")]


# ---------------------------------------------------------------------------------------------
# The plan

def pretrain_argv(a, m, folder):
    shared = []
    for flag, v in (("--data", a.data), ("--data-root", a.data_root),
                    ("--train-list", a.train_list), ("--epochs", a.epochs),
                    ("--batch-size", a.batch_size), ("--img-size", a.img_size),
                    ("--workers", a.workers), ("--seed", a.seed), ("--arch", a.arch),
                    ("--init", a.init), ("--demo-size", a.demo_size)):
        if v is not None:
            shared += [flag, v]
    shared += ["--amp"] if a.amp else []
    small = SMALL.get(m.script, []) if a.small else []
    return [m.script, *m.flags, *small, *shared, *shlex.split(a.pretrain_args or ""), *m.extra,
            "--output-dir", folder]


def backbone_of(a, m):
    if m.kind == "random":
        return "random"
    if m.kind == "file":
        return str(Path(m.path).resolve())
    return str(Path(a.out).resolve() / "pretrain" / m.name / "backbone.pth")


def run_all(a, methods, targets, steps):
    out = Path(a.out).resolve()
    for step, argv, product in getattr(a, "prepare", []):
        if not steps.run(step, argv, product, parallel=False) and not steps.dry_run:
            raise SystemExit(f"error: {step} failed; see {out / 'logs'}")
    for m in methods:
        if m.kind == "pretrain":
            folder = out / "pretrain" / m.name
            if not steps.run(f"pretrain/{m.name}", pretrain_argv(a, m, folder),
                             folder / "backbone.pth") and not steps.dry_run:
                continue
        for t, root in targets:
            folder = out / "finetune" / t / m.name
            argv = ["finetune_maskrcnn.py", "--data", t, *(["--data-root", root] if root else []),
                    "--pretrained", backbone_of(a, m), "--runs", a.runs, "--seed", a.ft_seed,
                    *(["--arch", a.arch] if a.arch else []), *(["--amp"] if a.amp else []),
                    *shlex.split(a.finetune_args or ""), "--output-dir", folder]
            steps.run(f"finetune/{t}/{m.name}", argv, folder / "summary.json")
        if a.probe:
            folder = out / "probe" / m.name
            argv = ["linear_probe.py", *shlex.split(a.probe_args or default_probe(a)),
                    "--pretrained", backbone_of(a, m), *(["--arch", a.arch] if a.arch else []),
                    "--output-dir", folder]
            steps.run(f"probe/{m.name}", argv, folder / "metrics.json", parallel=False)
        if not steps.dry_run:
            report(a, methods, targets, steps)
        steps.write_commands()


def default_probe(a):
    if a.data in (None, "demo"):
        return "--data demo"
    return f"--data {a.data} --data-root {shlex.quote(a.data_root)}"


# ---------------------------------------------------------------------------------------------
# The report

def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def get(metrics, group, t, k):
    d = metrics.get(group, {}) if group else metrics
    return d.get(t, {}).get(k)


def collect(a, methods, targets, steps):
    """Every run's numbers from the scripts' own files."""
    out = Path(a.out).resolve()
    res = {"runs": a.runs, "targets": [t for t, _ in targets], "methods": {}}
    for m in methods:
        r = {"label": m.label, "kind": m.kind, "spec": m.spec, "backbone": backbone_of(a, m),
             "finetune": {}}
        if m.kind == "pretrain":
            wall, dev_h, cpu = steps.cost(f"pretrain/{m.name}")
            logf = out / "pretrain" / m.name / "log.jsonl"
            rows = [json.loads(x) for x in logf.read_text().splitlines()] if logf.exists() else []
            knn = [x["knn_accuracy"] for x in rows if x.get("knn_accuracy") is not None]
            r["pretrain"] = {"wall_s": round(wall, 1), "device_hours": round(dev_h, 4),
                             "cpu_s": round(cpu, 1),
                             "epochs_logged": len(rows), "knn_accuracy": knn[-1] if knn else None}
        for t, _ in targets:
            folder = out / "finetune" / t / m.name
            runs = [read_json(folder / f"run{i}" / "metrics.json") for i in range(a.runs)]
            runs = [x for x in runs if x is not None]
            if not runs:
                continue
            groups = [None] + [g for g, v in runs[0].items() if isinstance(v, dict) and "bbox" in v]
            wall, dev_h, cpu = steps.cost(f"finetune/{t}/{m.name}")
            r["finetune"][t] = {
                "folder": str(folder), "per_run": runs, "wall_s": round(wall, 1),
                "device_hours": round(dev_h, 4), "cpu_s": round(cpu, 1),
                "groups": {g or "all": {col_title(tt, k, False): [get(x, g, tt, k) for x in runs]
                                        for tt, k in COLUMNS} for g in groups}}
        probe = read_json(out / "probe" / m.name / "metrics.json") if a.probe else None
        if probe:
            top = probe.get("by_fraction", {}).get(f"{probe.get('label_fraction', 100):g}", {})
            r["probe"] = {k: {"mean": probe.get(k), "std": top.get(k, {}).get("std")}
                          for k in ("accuracy", "macro_f1", "knn_accuracy")}
        res["methods"][m.name] = r
    return res


def fmt(values, decimals=1):
    m, sd = mean_std(values)
    if m is None:
        return "—"
    return f"{m:.{decimals}f}" + (f" ± {sd:.{decimals}f}" if sd is not None else "")


def significance(res, targets):
    """Per target, group and column: every pair's Welch test, and the ranking by mean."""
    sig = {}
    for t in targets:
        for g in ("all", "testA", "testB"):
            for tt, k in COLUMNS:
                c = col_title(tt, k, False)
                vals = {n: r["finetune"][t]["groups"][g][c] for n, r in res["methods"].items()
                        if t in r["finetune"] and g in r["finetune"][t]["groups"]}
                vals = {n: v for n, v in vals.items() if mean_std(v)[0] is not None}
                if not vals:
                    continue
                rank = sorted(vals, key=lambda n: -mean_std(vals[n])[0])
                pairs = {}
                for i, x in enumerate(rank):
                    for y in rank[i + 1:]:
                        tv, df, p = welch(vals[x], vals[y])
                        pairs[f"{x} vs {y}"] = {"t": tv, "df": df, "p": p}
                sig[f"{t}/{g}/{c}"] = {"rank": rank, "pairs": pairs}
    return sig


def cell(res, sig, t, g, tt, k, name):
    c = col_title(tt, k, False)
    ft = res["methods"][name]["finetune"].get(t)
    if not ft or g not in ft["groups"]:
        return "—"
    text = fmt(ft["groups"][g][c])
    s = sig.get(f"{t}/{g}/{c}")
    if s and text != "—":
        best = s["rank"][0]
        if name == best:
            return f"**{text}**"
        p = s["pairs"][f"{best} vs {name}"]["p"]
        if p is not None and p >= 0.05:
            return text + " ≈"
    return text


def hms(seconds):
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def report(a, methods, targets, steps):
    res = collect(a, methods, targets, steps)
    tnames = [t for t, _ in targets]
    sig = significance(res, tnames)
    res["welch"] = sig
    names = [m.name for m in methods]
    L = [f"# Transfer: {len(methods)} method(s), " + (
            f"{', '.join(TARGET_LABELS.get(t, t) for t in tnames)}, {a.runs} fine-tuning run(s) "
            "each" if tnames else "pre-training only"), "",
         f"Pre-training: `--data {a.data or 'demo'}`"
         + (f" ({a.data_root})" if a.data_root else "") + f", launcher `{a.launcher}`. "
         "Each cell: mean ± std (sample std) over the runs, in percent (COCO AP). **Bold**: the "
         "best mean of the column; ≈: within the run-to-run noise of the best (Welch's t-test "
         "over runs, p ≥ 0.05); with one run no test is possible. Commands: `commands.sh`.", ""]
    head = "| method | " + " | ".join(f"{TARGET_LABELS.get(t, t)} {col_title(tt, k)}"
                                     for t in tnames for tt, k in COLUMNS) + " |"
    L += [head, "|---" * (1 + 6 * len(tnames)) + "|"] if tnames else ["(no fine-tuning)"]
    for n in names if tnames else []:
        L.append(f"| {res['methods'][n]['label']} (`{n}`) | " + " | ".join(
            cell(res, sig, t, "all", tt, k, n) for t in tnames for tt, k in COLUMNS) + " |")
    subs = [(t, g) for t in tnames for g in ("testA", "testB")
            if any(g in r["finetune"].get(t, {}).get("groups", {}) for r in res["methods"].values())]
    if subs:
        L += ["", "GlaS's two test sets alone (the table above: Test A + Test B, as the paper):", "",
              "| method | " + " | ".join(f"{TARGET_LABELS.get(g)} {col_title(tt, k)}"
                                       for t, g in subs for tt, k in COLUMNS) + " |",
              "|---" * (1 + 6 * len(subs)) + "|"]
        for n in names:
            L.append(f"| `{n}` | " + " | ".join(cell(res, sig, t, g, tt, k, n)
                                               for t, g in subs for tt, k in COLUMNS) + " |")
    L += ["", "Cost (wall time over every attempt of a step; device-hours = wall x processes of "
          "the launcher; CPU time of every process the step started)" + (" and frozen-feature probes (linear_probe.py: linear "
          "classifier and 20-NN accuracy, %)" if a.probe else "") + ":", ""]
    ph = " | linear acc. | linear macro F1 | kNN acc." if a.probe else ""
    L += [f"| method | pre-training wall | device-hours | CPU time | kNN monitor (last) | "
          f"fine-tuning wall (all targets and runs){ph} |",
          "|---|---|---|---|---|---|" + ("---|---|---|" if a.probe else "")]
    for n in names:
        r = res["methods"][n]
        p = r.get("pretrain")
        ft_wall = sum(f["wall_s"] for f in r["finetune"].values())
        row = (f"| `{n}` | {hms(p['wall_s'])} | {p['device_hours']:.3f} | {hms(p['cpu_s'])} | "
               + (f"{p['knn_accuracy']:.1f}" if p["knn_accuracy"] is not None else "—")
               if p else f"| `{n}` | — | — | — | —") + f" | {hms(ft_wall)} |"
        if a.probe:
            pr = r.get("probe")
            row += "".join(
                f" {pr[k]['mean']:.1f}" + (f" ± {pr[k]['std']:.1f}" if pr[k]['std'] else "")
                + " |" if pr and pr[k]["mean"] is not None else " — |"
                for k in ("accuracy", "macro_f1", "knn_accuracy"))
        L.append(row)
    L += ["", "Ranking by mean and whether neighbours differ beyond the noise (Welch p; ≈: p ≥ "
          "0.05, >: p < 0.05; every pair's test is in results.json):", ""]
    for t in tnames:
        for tt, k in (("bbox", "AP"), ("segm", "AP")):
            s = sig.get(f"{t}/all/{col_title(tt, k, False)}")
            if not s:
                continue
            chain = []
            for i, n in enumerate(s["rank"]):
                vals = res["methods"][n]["finetune"][t]["groups"]["all"][col_title(tt, k, False)]
                if i:
                    p = welch(prev, vals)[2]
                    chain.append("vs (no test: 1 run)" if p is None else (
                        f"≈ (p {p:.2f})" if p >= 0.05 else f"> (p {p:.2g})"))
                chain.append(f"`{n}` {mean_std(vals)[0]:.1f}")
                prev = vals
            L.append(f"- {TARGET_LABELS.get(t, t)} {col_title(tt, k)}: " + " ".join(chain))
    if steps.failed:
        L += ["", "Failed steps (see logs/): " + ", ".join(steps.failed)]
    out = Path(a.out)
    (out / "results.md").write_text("\n".join(L) + "\n")
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    try:
        chart(res, tnames).save(out / "results.png")
    except ValueError:
        pass  # nothing fine-tuned yet
    return res


# ---------------------------------------------------------------------------------------------
# The picture: PIL only, as common/plots.py

def chart(res, tnames, panel_h=300):
    from PIL import Image, ImageDraw

    from common.plots import COLORS, _ticks, _vertical_text
    names = list(res["methods"])
    panels = [(t, tt, k) for t in tnames for tt, k in COLUMNS
              if any(t in res["methods"][n]["finetune"] for n in names)]
    if not panels:
        raise ValueError("nothing to draw")
    left, right, top, bottom = 62, 10, 26, 110
    slot = 22
    w = max(200, left + right + slot * len(names))
    sheet = Image.new("RGB", (w * 6, panel_h * (len(panels) // 6)), "white")
    for i, (t, tt, k) in enumerate(panels):
        img = Image.new("RGB", (w, panel_h), "white")
        d = ImageDraw.Draw(img)
        col = col_title(tt, k, False)
        vals = {n: [v for v in res["methods"][n]["finetune"][t]["groups"]["all"][col]
                    if v is not None] if t in res["methods"][n]["finetune"] else []
                for n in names}
        allv = [v for vs in vals.values() for v in vs]
        lo, hi = (min(allv + [0.0]), max(allv + [1.0])) if allv else (0.0, 1.0)
        hi += 0.08 * (hi - lo or 1.0)

        def py(v):
            return top + (hi - v) / (hi - lo) * (panel_h - top - bottom)

        d.rectangle([left, top, w - right, panel_h - bottom], outline=(120, 120, 120))
        for tick in _ticks(lo, hi):
            d.line([left - 4, py(tick), left, py(tick)], fill="black")
            label = f"{tick:.4g}"
            d.text((left - 8 - d.textbbox((0, 0), label)[2], py(tick) - 6), label, fill="black")
        d.text((left, 6), f"{TARGET_LABELS.get(t, t)}: {col}", fill="black")
        _vertical_text(img, (2, (top + panel_h - bottom) / 2), "AP (%)")
        for j, n in enumerate(names):
            x0 = left + (w - left - right - slot * len(names)) // 2 + j * slot + 4
            c = COLORS[j % len(COLORS)]
            if vals[n]:
                m, sd = mean_std(vals[n])
                light = tuple(int(v + (255 - v) * 0.6) for v in c)
                d.rectangle([x0, py(m), x0 + slot - 8, py(max(lo, 0.0))], fill=light, outline=c)
                xc = x0 + (slot - 8) / 2
                if sd:
                    d.line([xc, py(m - sd), xc, py(m + sd)], fill="black", width=1)
                    for yy in (py(m - sd), py(m + sd)):
                        d.line([xc - 3, yy, xc + 3, yy], fill="black")
                for r, v in enumerate(vals[n]):
                    xx = xc + (r - (len(vals[n]) - 1) / 2) * 2
                    d.ellipse([xx - 2, py(v) - 2, xx + 2, py(v) + 2], fill=c, outline="black")
            _vertical_text(img, (x0 + 1, panel_h - bottom + 4 + (bottom - 8) / 2),
                           n[:16].rjust(16))
        sheet.paste(img, ((i % 6) * w, (i // 6) * panel_h))
    return sheet


# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--preset", choices=["demo", "table1", "real-cpu"],
                   help="demo: every method on the demo data, CPU minutes; table1: ConCL Table "
                        "1's rows (NCT, GlaS + CRAG, 5 runs; needs --data-root and --target "
                        "glas=.. crag=..); real-cpu: the sample H&E cut into tiles, CPM-15 "
                        "nuclei (needs --samples). Flags given here override the preset's")
    p.add_argument("--methods", nargs="+", help="configurations, random, NAME=PATH, "
                   "'NAME=CONFIG FLAGS', or all (default: the preset's)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    p.add_argument("--out", default="runs/transfer", help="output folder (rerun: resume)")
    p.add_argument("--launcher", default="python",
                   help="python | 'torchrun --nproc_per_node=N' (pre-training and fine-tuning)")
    g = p.add_argument_group("pre-training (shared by every method; unset = its recipe)")
    g.add_argument("--data", choices=["nct", "folder", "demo"])
    g.add_argument("--data-root")
    g.add_argument("--train-list")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--img-size", type=int)
    g.add_argument("--workers", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--arch", choices=["resnet18", "resnet50"], help="also fine-tuning and probes")
    g.add_argument("--init", choices=["openselfsup", "torchvision"])
    g.add_argument("--amp", action="store_true", help="bf16 (CUDA), also fine-tuning")
    g.add_argument("--demo-size", type=int)
    g.add_argument("--pretrain-args", help="more flags for every pre-training script (quoted; "
                   "paths in these flags: absolute or relative to the repository root)")
    g.add_argument("--samples", help="real-cpu: folder with glas_images_only/, cpm15_nuclei/")
    g = p.add_argument_group("fine-tuning (finetune_maskrcnn.py)")
    g.add_argument("--target", nargs="+", metavar="NAME[=ROOT]",
                   help="glas=ROOT crag=ROOT instances=ROOT demo, or none: pre-train (and "
                        "probe) only (default: demo)")
    g.add_argument("--runs", type=int, help="fine-tuning runs per method and target (default 5)")
    g.add_argument("--ft-seed", type=int, default=0, help="seed of the first run")
    g.add_argument("--finetune-args", help="more flags for every fine-tuning (quoted)")
    g = p.add_argument_group("probes (linear_probe.py)")
    g.add_argument("--probe", action=argparse.BooleanOptionalAction,
                   help="linear probe + kNN of each backbone (default: only with --preset demo)")
    g.add_argument("--probe-args", help="its data flags etc. (default: the pre-training data; "
                   "NCT: add --test-root CRC-VAL-HE-7K)")
    p.add_argument("--dry-run", action="store_true", help="write commands.sh, run nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report, run nothing")
    a = p.parse_args(argv)
    a.small, a.prepare = False, []
    for name in ("data_root", "train_list"):  # the steps run from the repository root
        if getattr(a, name):
            setattr(a, name, str(Path(getattr(a, name)).resolve()))
    if a.preset:
        preset_args(a)
    a.methods = a.methods or ["moco_v2", "random"]
    if a.methods == ["all"]:
        a.methods = ALL
    a.target = a.target or ["demo"]
    a.runs = 5 if a.runs is None else a.runs
    if a.runs < 1:
        raise SystemExit(f"error: --runs {a.runs}: need at least 1")
    return a


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through Steps.run: the step is stopped and logged


def main(argv=None):
    a = get_args(argv)
    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, _sigterm)
    if a.list:
        for n, (script, flags, label) in CONFIGS.items():
            print(f"{n:14s} {label:28s} {script} {' '.join(flags)}")
        return 0
    methods = [Method(s) for s in a.methods]
    dup = {m.name for m in methods if [x.name for x in methods].count(m.name) > 1}
    if dup:
        raise SystemExit(f"error: method names used twice: {', '.join(sorted(dup))}")
    targets = []
    for spec in ([] if a.target == ["none"] else a.target):
        t, _, root = spec.partition("=")
        if t not in ("glas", "crag", "instances", "demo"):
            raise SystemExit(f"error: --target {spec}: glas, crag, instances or demo")
        if t != "demo" and not root:
            raise SystemExit(f"error: --target {t} needs a root: {t}=PATH")
        targets.append((t, str(Path(root).resolve()) if root else None))
    steps = Steps(a.out, a.launcher, a.dry_run or a.report_only)
    if a.report_only:
        run_all(a, methods, targets, steps)  # records the commands, runs nothing
        report(a, methods, targets, steps)
    else:
        run_all(a, methods, targets, steps)
        if not a.dry_run:  # also when the last method's pre-training failed
            report(a, methods, targets, steps)
    steps.write_commands()
    if a.dry_run:
        print(f"{Path(a.out) / 'commands.sh'}: {len(steps.commands)} steps")
        return 0
    print(f"\n{(Path(a.out) / 'results.md').read_text()}\n-> {Path(a.out) / 'results.md'}, "
          f"results.json, results.png, commands.sh")
    if steps.failed:
        print(f"{len(steps.failed)} step(s) failed: {', '.join(steps.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
