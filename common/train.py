"""Training plumbing every pre-training script shares: flags, run set-up, schedules as functions
of the global step, LARS, atomic checkpoints with exact resume, the epoch loop's bookkeeping
(progress bar, log.jsonl, non-finite guard, pre-emption), and the backbone export.

Exact resume rests on three rules: augmentation is seeded per sample from (seed, epoch, index)
(common.data), the training step's own randomness (shuffle-BN permutations, ...) is seeded from
(seed, epoch, step, rank) here, and everything else that changes is in the checkpoint.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from common import data as cdata
from common import dist as cdist
from common.cli import (int_at_least, nonneg_float, nonneg_int, positive_float,
                        positive_int)
from common.models import ARCHS, INITS


# ---------------------------------------------------------------------------------------------
# Flags (their types and help formatter: common.cli) and run-folder ownership

def claim_output_dir(out, script):
    """A run folder belongs to the script that made it (`script` in its args.json). Another
    script's folder, or one from before this record existed, is refused with one clear line."""
    f = Path(out) / "args.json"
    if not f.exists():
        return
    try:
        owner = json.loads(f.read_text()).get("script")
    except (OSError, ValueError):
        raise cdata.DataError(f"{f} is not a readable args.json; choose another --output-dir") from None
    if owner is None:
        raise cdata.DataError(f"{out} predates this version (its args.json does not say which "
                              "script made it); choose another --output-dir")
    if owner != script:
        raise cdata.DataError(f"{out} holds a {owner} run; choose another --output-dir")


def check_output_dir(out):
    """--output-dir must be a folder or not exist yet (one line, not a FileExistsError)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise cdata.DataError(f"--output-dir {out} is a file, not a folder; choose another "
                              "--output-dir")


def make_run_folder(out):
    """mkdir the run folder; if this call created it, a failed start removes it again
    (main_guard), so no empty folder is left behind."""
    global _new_run_folder
    out = Path(out)
    if not out.exists():
        _new_run_folder = out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _new_run_folder = None
        raise cdata.DataError(f"cannot create --output-dir {out} ({e.strerror or e}); choose "
                              "a folder you can write to") from None


def remove_if_empty(folder):
    """A failed start leaves no empty run folder behind (empty sub-folders such as a mask cache
    that was never filled go too)."""
    folder = Path(folder)
    if not folder.is_dir() or any(p.is_file() for p in folder.rglob("*")):
        return
    for d in sorted((p for p in folder.rglob("*")), key=lambda p: -len(p.parts)):
        d.rmdir()
    folder.rmdir()


def add_common_args(parser, *, batch_size, lr, epochs=200, weight_decay=1e-4):
    """The contract's flags (docs/design.md). `batch_size` and `lr` are the paper's *global* batch and
    its lr; the per-process batch defaults to global / world size and the lr is scaled linearly
    with the global batch actually used."""
    cdata.add_data_args(parser)
    g = parser.add_argument_group("training")
    g.add_argument("--output-dir", default=None, help="run folder (default runs/<script>)")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images per process (default {batch_size} / number of processes, "
                        f"i.e. the paper's global batch {batch_size})")
    g.add_argument("--lr", type=positive_float, default=lr,
                   help=f"learning rate at global batch {batch_size}; scaled linearly")
    g.add_argument("--weight-decay", type=nonneg_float, default=weight_decay, help="weight decay")
    g.add_argument("--img-size", type=int_at_least(32), default=224,
                   help="view size in pixels (ResNet stride 32: at least 32)")
    g.add_argument("--arch", choices=ARCHS, default="resnet18", help="backbone")
    g.add_argument("--init", choices=INITS, default="openselfsup",
                   help="backbone init: openselfsup = Kaiming fan_in convs, the code that trained "
                        "the ConCL paper's NCT recipes; torchvision = its fan_out default "
                        "(official MoCo / SimCLR-PyTorch code)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seeds init, augmentation, sampling")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast; on the CPU too (slow there: the CUDA path's twin, for tests)")
    g.add_argument("--channels-last", action="store_true",
                   help="channels_last images and model on the CPU too (always on with CUDA; the "
                        "CPU switch is the CUDA path's twin, for tests)")
    g.add_argument("--device-aug", action="store_true",
                   help="photometric ops (jitter, grey, blur, solarize) batched on the training "
                        "device, each sample with the parameters its loader worker drew; the "
                        "workers only decode, crop and flip (common.augment). The blur is then "
                        "the exact Gaussian kernel (--blur-kernel, else 23 px), not PIL's. Off "
                        "until checked on CUDA, where it is meant to become the default")
    g.add_argument("--knn-every", type=nonneg_int, default=10,
                   help="every N epochs (and after the last) log the backbone's 20-NN accuracy "
                        "on held-out labelled tiles; 0 = off. Off by itself without labels")
    g.add_argument("--knn-data-root", help="labelled class-folder tree the monitor queries, e.g. "
                   "CRC-VAL-HE-7K (default: training tiles the model is not ranked on)")
    g.add_argument("--knn-size", type=positive_int, default=3000,
                   help="monitor bank size (queries: a third as many); demo: 180")
    # For tests of pre-emption: behave as if SIGTERM arrived during this run's N-th step.
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    # For tests of the out-of-memory line: raise torch.OutOfMemoryError at this run's N-th step,
    # as if on a GPU of G GiB ("N,G").
    g.add_argument("--simulate-oom", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(paper_batch=batch_size)
    return g


class Run:
    """Per-run context: ranks, device, output folder, pre-emption flag, RNG per step.

    cudnn_benchmark: cuDNN autotuning, worth it for fixed shapes (pre-training); the fine-tuner
    turns it off (as Detectron2), since its shapes change every iteration and each new shape
    would be tuned again."""

    def __init__(self, args, script, cudnn_benchmark=True):
        self.rank, self.world, self.local_rank, self.device = cdist.init_distributed()
        self.main = self.rank == 0
        self.cuda = self.device.type == "cuda"
        args.output_dir = args.output_dir or os.path.join("runs", script)
        if args.batch_size is None:
            if args.paper_batch % self.world:
                raise cdata.DataError(f"global batch {args.paper_batch} does not split over "
                                      f"{self.world} processes; set --batch-size")
            args.batch_size = args.paper_batch // self.world
        self.global_batch = args.batch_size * self.world
        args.scaled_lr = args.lr * self.global_batch / args.paper_batch
        self.args, self.out = args, Path(args.output_dir)
        self.amp = bool(getattr(args, "amp", False))  # bf16 autocast on CUDA and on the CPU
        self.channels_last = self.cuda or bool(getattr(args, "channels_last", False))
        if self.amp and not self.cuda:
            self.print("note: --amp on the CPU: bf16 autocast (slow; the CUDA path's twin)")
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)  # only cuDNN reads it
        args.script = script
        check_output_dir(self.out)
        claim_output_dir(self.out, script)
        if self.main:
            make_run_folder(self.out)
        self._probe_output_dir()
        self.stop_signal, self.steps_this_run, self.in_loop = None, 0, False
        self._signal_time, self._leaving = 0.0, False
        self.views_per_sample = None  # set by the Trainer from the first batch (OOM estimate)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        torch.manual_seed(cdata.sample_seed(args.seed, 2**31))  # model init: same on every rank
        global _run
        _run = self

    def _probe_output_dir(self):
        """Rank 0 writes a token into the run folder and every rank reads it back: a folder that
        cannot be written, or that is not the same folder on every node (node-local storage:
        checkpoints written by rank 0 would be missing on the other nodes at a resume, which
        would then restart elsewhere and hang), is refused now with one line."""
        probe, token, err = self.out / ".probe", f"{os.getpid()}-{time.time_ns()}", None
        if self.main:
            try:
                probe.write_text(token)
            except OSError as e:
                err = (f"cannot write into --output-dir {self.out} ({e.strerror or e}); choose "
                       "a folder you can write to")
        if self.world > 1:
            shared = [token, err]
            torch.distributed.broadcast_object_list(shared, src=0)
            token, err = shared
        if err:
            raise cdata.DataError(err)
        # a shared file system (NFS) may cache "no such file" for a few seconds: look again
        wait = float(os.environ.get("OUTPUT_DIR_WAIT_S", 30)) if self.world > 1 else 0
        seen, deadline = False, time.monotonic() + wait
        while True:
            try:
                seen = probe.read_text() == token
            except OSError:
                seen = False
            if seen or time.monotonic() > deadline:
                break
            time.sleep(1)
            try:  # refresh the directory's cached entries
                os.listdir(self.out)
            except OSError:
                pass
        missing = torch.tensor([float(not seen)], device=self.device)
        cdist.all_reduce(missing, "max")
        cdist.barrier()
        if self.main:
            probe.unlink(missing_ok=True)
        if missing.item():
            raise cdata.DataError(
                f"--output-dir {self.out} is not the same folder on every node (a rank does not "
                "see what rank 0 wrote there): put it on storage every node sees (a shared file "
                "system), since checkpoints, resume and logs need one folder")

    def _on_signal(self, signum, frame):
        """The first SIGTERM / SIGINT: stop after the current step on every rank (agree()).
        Repeats are the same stop: a scheduler (SLURM) signals every process of the job and
        torchrun's agent forwards the signal once more, so a rank sees it twice within
        milliseconds. Only a second Ctrl-C from the terminal (SIGINT, more than a second after
        the first signal) aborts at once."""
        if not self.in_loop:  # nothing to save yet (or already saved): leave now
            if not self._leaving:
                self._leaving = True
                sys.exit(128 + signum)
            return
        now = time.monotonic()
        if self.stop_signal is None:
            self.stop_signal, self._signal_time = signum, now
            self.print(f"\n{signal.Signals(signum).name}: checkpointing after this step "
                       "(a second Ctrl-C aborts at once)")
        elif signum == signal.SIGINT and now - self._signal_time > 1.0:
            raise KeyboardInterrupt

    def print(self, *a, **kw):
        if self.main:
            print(*a, **kw, flush=True)

    def agree(self, loss, parts=None):
        """Before backward, every rank: (is the loss non-finite anywhere, stop after this step?,
        this rank's loss parts as Python floats) -- a signal arrived, or --stop-after-steps
        (tests of pre-emption) is reached. The flags and the parts come to the host in one
        transfer: the step's only device-to-host synchronisation."""
        stop = self.stop_signal is not None or (
            self.args.stop_after_steps is not None
            and self.steps_this_run + 1 >= self.args.stop_after_steps)
        flags = torch.stack([(~torch.isfinite(loss.detach())).any().to(torch.float64),
                             torch.tensor(float(stop), dtype=torch.float64, device=loss.device)])
        flags = flags.to(self.device)
        cdist.all_reduce(flags, "max")
        keys = [k for k, v in (parts or {}).items() if torch.is_tensor(v)]
        values = torch.cat([flags] + [parts[k].detach().to(self.device, torch.float64).reshape(1)
                                      for k in keys]).tolist()
        return bool(values[0]), bool(values[1]), {k: (parts[k], v) for k, v in zip(keys, values[2:])}

    def leave(self, where):
        """After the checkpoint of a stopped run: say so and exit (143 SIGTERM, 130 SIGINT)."""
        self.in_loop = False
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "--stop-after-steps"
        self.print(f"stopped by {name} at {where}; checkpoint saved. Rerun the same command to "
                   "resume.")
        cdist.cleanup()
        sys.exit(143 if self.stop_signal == signal.SIGTERM else 130 if self.stop_signal else 0)

    def autocast(self):
        """bf16 autocast under --amp, on the run's device type (CUDA, or the CPU twin)."""
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def images(self, x):
        return cdata.to_device(x, self.device, channels_last=self.channels_last)

    def sync_bn(self, model):
        """Cross-process BN for the methods whose recipe uses it (SimCLR, BYOL, DetCon, ...).
        nn.SyncBatchNorm runs only on CUDA; on one process plain BN already sees the whole
        batch, and on CPU (tests) per-process BN is the best there is. The conversion itself
        (convert_sync_bn) is tested on CPU modules."""
        if self.cuda and self.world > 1:
            return convert_sync_bn(model)
        return model

    def wrap(self, model):
        """DDP over the processes (identity at world size 1). Buffers such as queues are kept
        identical by construction, so they are not re-broadcast every step."""
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.cuda else None, broadcast_buffers=False)


def convert_sync_bn(module):
    """Every BatchNorm in `module` -> nn.SyncBatchNorm with its state, in place of the old
    module (same names, so parameter order and EMA pairs are unchanged). Split BN
    (common.models, e.g. BYOL's per-group head BN) keeps its groups: converting it would
    normalise over the whole global batch instead."""
    from common.models import SplitBatchNorm1d, SplitBatchNorm2d
    if isinstance(module, (SplitBatchNorm1d, SplitBatchNorm2d)):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        new = convert_sync_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def check_resume_args(path, saved, args, keys):
    """A checkpoint continues only the run that wrote it: these flags must match."""
    for key in keys:
        old, new = saved.get(key), getattr(args, key)
        name = ("the global batch (processes x --batch-size)" if key == "global_batch"
                else f"--{key.replace('_', '-')}")
        if key not in saved:
            raise cdata.DataError(f"{path} predates this version (no record of {name}); use "
                                  "another --output-dir")
        if old != new:
            raise cdata.DataError(f"{path} was written with {name} {old}, not {new}; use "
                                  "another --output-dir")


def fp32(fn):
    """Decorator for a loss's logits and for every decision (argmax, assignment, matching,
    k-means): at least float32 under --amp. Autocast (CUDA, or bf16 on the CPU) runs matmuls in
    bf16 whatever their inputs' dtype, which rounds logits at T 0.1 by ~0.05 and can flip argmax
    matches. Half-precision inputs (fp16, bf16) are up-cast to float32; float32 and float64 stay
    as they are, so a float64 caller (a reference test, a gradient check) keeps its precision."""
    def cast(v):
        return v.float() if torch.is_tensor(v) and v.dtype in (torch.float16, torch.bfloat16) else v

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kw.items()})
    return wrapper


# ---------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step, so resuming needs no scheduler state.

def cosine_lr(base_lr, step, steps_per_epoch, epochs, warmup_epochs=0, per_epoch=True,
              warmup_ratio=1e-4, min_lr=0.0):
    """mmcv CosineAnnealing (per epoch by default, as the NCT configs) with a per-iteration
    linear warm-up from warmup_ratio * lr."""
    t = step // steps_per_epoch if per_epoch else step / steps_per_epoch
    lr = min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t / epochs))
    warm = warmup_epochs * steps_per_epoch
    if step < warm:
        lr *= 1 - (1 - step / warm) * (1 - warmup_ratio)
    return lr


def step_lr(base_lr, step, steps_per_epoch, milestones, gamma=0.1):
    epoch = step // steps_per_epoch
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def cosine_momentum(base_m, step, total_steps):
    """BYOL's EMA schedule: base_m at step 0 rising to 1 at the last step."""
    return 1 - (1 - base_m) * (math.cos(math.pi * step / total_steps) + 1) / 2


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


class LARS(torch.optim.Optimizer):
    """LARS as the official SimCLR/BYOL code: update = lr * trust * (g + wd * w) with
    trust = eta * ||w|| / ||g + wd * w||, then heavy-ball momentum. Groups with lars=False (all
    1-D parameters: biases and norm layers, pitfall P11) get neither weight decay nor trust."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars=True))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["lars"]:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        g["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(d)
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def lars_param_groups(model, weight_decay):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay, lars=True),
            dict(params=plain, weight_decay=0.0, lars=False)]


# ---------------------------------------------------------------------------------------------
# Files

def atomic_write_text(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, fsync, rename: a crash leaves the old file."""
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a second Ctrl-C, a full disk, ...: the old file stays as it was
        tmp.unlink(missing_ok=True)
        if isinstance(e, KeyboardInterrupt):
            e.checkpoint_write = Path(path)  # main_guard says so in one line
        raise


def unwrap(model):
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def export_backbone(backbone, path):
    """torchvision ResNet state_dict without fc: loads with strict=False missing only fc.*"""
    sd = {k: v.detach().cpu().clone() for k, v in unwrap(backbone).state_dict().items()
          if not k.startswith("fc.")}
    atomic_save(sd, path)


# ---------------------------------------------------------------------------------------------
# Online kNN monitor

class KNNMonitor:
    """20-NN accuracy (cosine, exp(sim / 0.07) votes; common.knn) of the backbone's pooled
    features: a cheap health signal while pre-training, logged as `knn_accuracy`. Bank and
    queries are fixed sets of labelled tiles, centre-cropped at --img-size: demo tiles drawn with
    other seeds than the training tiles (--data demo), or a seeded sample of the training tiles
    (their labels are never used in training) queried with --knn-data-root tiles when given,
    else with other training tiles. Each process embeds a contiguous block of each set with rank
    0's BN statistics (the ones backbone.pth keeps: without SyncBN every process has its own), so
    the value is the kNN accuracy of the exported backbone on any number of processes."""

    @staticmethod
    def build(run, base):
        """The monitor the flags ask for, or None (off, or no labels to monitor with)."""
        args = run.args
        if not getattr(args, "knn_every", 0):
            return None
        if args.data == "demo":
            from common.demo import DemoTiles
            bank = DemoTiles(180, cdata.sample_seed(args.seed, 1), args.img_size)
            queries = DemoTiles(90, cdata.sample_seed(args.seed, 2), args.img_size)
            return KNNMonitor(run, bank, queries, len(bank.classes))
        labelled = [i for i, y in enumerate(getattr(base, "targets", [])) if y >= 0]  # -1: no class
        if not labelled:
            run.print("note: no class labels in the training data: kNN monitor off")
            return None
        g = torch.Generator().manual_seed(cdata.sample_seed(args.seed, 3))
        order = [labelled[i] for i in torch.randperm(len(labelled), generator=g).tolist()]
        n_bank, n_query = args.knn_size, max(1, args.knn_size // 3)
        bank = torch.utils.data.Subset(base, order[:n_bank])
        if args.knn_data_root:
            other = (cdata.nct_dataset if args.data == "nct" else cdata.folder_dataset)(
                args.knn_data_root, skip_bad=getattr(args, "skip_bad", False))
            if other.classes != base.classes:
                raise cdata.DataError(f"--knn-data-root {args.knn_data_root}: classes "
                                      f"{other.classes} differ from the training data's {base.classes}")
            other_labelled = [i for i, y in enumerate(other.targets) if y >= 0]
            q = [other_labelled[i] for i in
                 torch.randperm(len(other_labelled), generator=g)[:n_query].tolist()]
            queries = torch.utils.data.Subset(other, q)
        else:
            queries = torch.utils.data.Subset(base, order[n_bank:n_bank + n_query])
        if len(queries) == 0:
            run.print("note: too few labelled tiles for a held-out kNN query set: monitor off")
            return None
        return KNNMonitor(run, bank, queries, len(base.classes))

    def __init__(self, run, bank, queries, num_classes):
        self.run, self.bank, self.queries, self.num_classes = run, bank, queries, num_classes

    def _embed(self, backbone, dataset):
        from common.knn import extract_features, tile_loader
        run, n = self.run, len(dataset)
        share = torch.utils.data.Subset(dataset, range(run.rank * n // run.world,
                                                       (run.rank + 1) * n // run.world))
        workers = min(run.args.workers, 4) if n > 1000 else 0
        f, y = extract_features(backbone, tile_loader(share, run.args.img_size, 128, workers),
                                run.device, progress=False)
        if run.world > 1:  # rank order = dataset order; a rank with an empty share adds nothing
            parts = [None] * run.world
            torch.distributed.all_gather_object(parts, (f, y))
            f, y = (torch.cat([p[i] for p in parts if len(p[1])]) for i in (0, 1))
        return f, y

    def __call__(self, backbone):
        from common.knn import accuracy, knn_predict
        if self.run.world > 1:  # rank 0's running statistics, on a copy: training is untouched
            backbone = copy.deepcopy(backbone)
            for b in backbone.buffers():
                torch.distributed.broadcast(b, 0)
        bank_f, bank_y = self._embed(backbone, self.bank)
        query_f, query_y = self._embed(backbone, self.queries)
        pred = knn_predict(bank_f.to(self.run.device), bank_y, query_f, self.num_classes)
        return round(accuracy(pred, query_y), 2)


# ---------------------------------------------------------------------------------------------
# Resume and the epoch loop

class NonFiniteLoss(Exception):
    pass


class Trainer:
    """Bookkeeping around the method's own loop: resume, per-step seeding, progress, the
    non-finite guard, pre-emption at a safe point, checkpoints and the per-epoch log line.

        trainer = Trainer(run, model, optimizer, loader, sampler, backbone_fn)
        for epoch in trainer.epochs():
            for step, batch in trainer.steps(epoch):
                ...; trainer.backward_step(optimizer, loss, parts); trainer.update(parts, lr)
    """

    def __init__(self, run, model, optimizer, loader, sampler, backbone, extra_log=None):
        self.run, self.model, self.optimizer = run, model, optimizer
        self.loader, self.sampler, self.backbone = loader, sampler, backbone
        self.extra_log = extra_log or {}
        # the views dataset (pretrain_loader hands the workers an epoch-tagging wrapper of it)
        self.dataset = getattr(loader.dataset, "inner", loader.dataset)
        left_out = getattr(getattr(self.dataset, "base", None), "left_out", None)
        if left_out:  # --skip-bad left unreadable files out of the dataset: say so in every line
            self.extra_log = {**self.extra_log, "unreadable_left_out": len(left_out),
                              "unreadable_examples": left_out[:10]}
        self.steps_per_epoch = len(sampler) // loader.batch_size
        self.epoch, self.step, self.sums, self.history = 0, 0, {}, []
        self._checked = {}  # the step's loss parts as floats, from check()'s one transfer
        self.ckpt_path = run.out / "checkpoint.pth"
        self.monitor = KNNMonitor.build(run, getattr(self.dataset, "base", self.dataset))
        self.device_aug = None
        if getattr(run.args, "device_aug", False):  # before the workers fork (first epoch)
            from common.augment import DeviceAugment
            self.device_aug = DeviceAugment(self.dataset, run.device)
        self._resume()
        self._agree_on_resume()
        if run.main:  # now that the script has derived everything (scaled lr, BN groups, ...)
            atomic_write_text(run.out / "args.json", json.dumps(vars(run.args), indent=2, default=str))
            if not self.ckpt_path.exists():  # a start that fails before the first checkpoint
                _unfinished_start.append(run.out / "args.json")  # takes it away (main_guard)

    # -- resume ---------------------------------------------------------------------------------
    def _resume(self):
        run, args = self.run, self.run.args
        if not self.ckpt_path.exists():
            return
        try:
            ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise cdata.DataError(f"cannot read {self.ckpt_path} ({e}); move it away to start "
                                  "afresh") from None
        owner = ck.get("script", ck.get("args", {}).get("script")) if isinstance(ck, dict) else None
        if owner is None:
            run.print(f"note: {self.ckpt_path} does not record which script wrote it (an older "
                      f"version); resuming it as {args.script}.py")
        elif owner != args.script:
            raise cdata.DataError(f"{self.ckpt_path} was written by {owner}.py, not "
                                  f"{args.script}.py; choose another --output-dir")
        check_resume_args(self.ckpt_path, ck["args"], args, ("arch", "img_size", "epochs", "seed")
                          + tuple(getattr(args, "resume_keys", ())))
        try:
            unwrap(self.model).load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise cdata.DataError(f"{self.ckpt_path} does not fit this model "
                                  f"({str(e).strip().splitlines()[0]}); choose another "
                                  "--output-dir") from None
        self.epoch, self.step, self.history = ck["epoch"], ck["step"], ck["history"]
        sums = ck["sums"]  # one dict per rank (older checkpoints: rank 0's dict)
        self.sums = dict(sums[run.rank] if isinstance(sums, list) and len(sums) == run.world
                         else sums[0] if isinstance(sums, list) else sums)
        if self.step and ck["global_batch"] != run.global_batch:
            run.print(f"note: global batch changed ({ck['global_batch']} -> {run.global_batch});"
                      f" epoch {self.epoch} restarts from its first step")
            self.step, self.sums = 0, {}
        if run.main:  # log.jsonl = exactly the epochs the checkpoint has finished
            atomic_write_text(run.out / "log.jsonl", "".join(json.dumps(h) + "\n"
                                                             for h in self.history))
        run.print(f"resumed from {self.ckpt_path}: epoch {self.epoch}, step {self.step}")

    def _agree_on_resume(self):
        """Every rank resumes from the same point, or none starts (a stale view of the folder on
        some node would otherwise restart it elsewhere, and the step counts would diverge)."""
        if self.run.world == 1:
            return
        seen = [None] * self.run.world
        torch.distributed.all_gather_object(seen, (self.epoch, self.step))
        if len(set(seen)) > 1:
            where = ", ".join(f"rank {r}: epoch {e} step {s}" for r, (e, s) in enumerate(seen))
            raise cdata.DataError(f"the ranks see different checkpoints in {self.run.out} "
                                  f"({where}): put --output-dir on storage every node sees")

    def save(self):
        # every rank's partial sums of the epoch, so a mid-epoch resume logs the same line
        sums = [self.sums]
        if self.run.world > 1:
            sums = [None] * self.run.world
            torch.distributed.all_gather_object(sums, self.sums)
        if self.run.main:
            atomic_save({"model": unwrap(self.model).state_dict(),
                         "optimizer": self.optimizer.state_dict(),
                         "epoch": self.epoch, "step": self.step, "sums": sums,
                         "history": self.history, "global_batch": self.run.global_batch,
                         "script": self.run.args.script, "args": vars(self.run.args)},
                        self.ckpt_path)
        cdist.barrier()

    # -- loop -----------------------------------------------------------------------------------
    def epochs(self):
        while self.epoch < self.run.args.epochs:
            yield self.epoch
            self._end_epoch()  # exports backbone.pth too
        if self.run.main and not (self.run.out / "backbone.pth").exists():  # rerun of a finished run
            export_backbone(self.backbone, self.run.out / "backbone.pth")
        self.run.print(f"done: {self.run.out / 'backbone.pth'}")

    def global_step(self):
        return self.epoch * self.steps_per_epoch + self.step

    def steps(self, epoch):
        run, args = self.run, self.run.args
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(self.step * self.loader.batch_size)
        self.dataset.set_epoch(epoch)  # main process; the workers get it with each index
        bar = tqdm(total=self.steps_per_epoch, initial=self.step, disable=not run.main,
                   desc=f"epoch {epoch}", dynamic_ncols=True, leave=False, file=sys.stdout)
        t_end = time.perf_counter()
        run.in_loop = True
        for batch in self.loader:
            t_data = time.perf_counter() - t_end
            if self.device_aug is not None:  # --device-aug: the photometric ops, batched
                batch["views"] = self.device_aug(batch)
            if run.views_per_sample is None and isinstance(batch, dict) and "views" in batch:
                run.views_per_sample = len(batch["views"])
            oom = getattr(args, "simulate_oom", None)
            if oom and run.steps_this_run + 1 == int(oom.split(",")[0]):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated by --simulate-oom)")
            torch.manual_seed(cdata.sample_seed(args.seed, epoch, self.step, run.rank))
            self._stop_now, self._checked = False, {}
            yield self.step, batch
            self.step += 1
            run.steps_this_run += 1
            dt = time.perf_counter() - t_end
            t_end = time.perf_counter()
            self._add({"img_per_s": run.global_batch / dt, "data_time": t_data, "step_time_s": dt,
                       "skipped": float(batch["skipped"].sum())}, sum_only=True)
            bar.update(1)
            bar.set_postfix_str("  ".join(f"{k} {self.sums[k] / self.sums['n']:.4g}"
                                          for k in ("loss", "lr", "img_per_s", "data_time")))
            if self._stop_now:
                bar.close()
                self.save()
                run.leave(f"epoch {epoch} step {self.step}")
        bar.close()  # in_loop stays set: a signal from here on is honoured after _end_epoch's save

    def check(self, loss, parts):
        """Before backward: agree across ranks on a non-finite loss and on pre-emption."""
        nonfinite, self._stop_now, self._checked = self.run.agree(loss, parts)
        if nonfinite:
            shown = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
            raise NonFiniteLoss(f"non-finite loss at epoch {self.epoch} step {self.step} ({shown});"
                                f" {self.ckpt_path} holds the last good state")

    def backward_step(self, optimizer, loss, parts):
        """check() the loss, then the optimiser step: zero_grad, backward, step."""
        self.check(loss, parts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def update(self, parts, lr):
        """After the optimiser step: accumulate this step's numbers (python floats). The parts
        check() saw came to the host with its flags; any other tensors come in one transfer."""
        def known(k, v):
            return k in self._checked and self._checked[k][0] is v
        rest = [k for k, v in parts.items() if torch.is_tensor(v) and not known(k, v)]
        # .cpu() first: such parts may mix host tensors (from the batch) and device tensors
        fetched = dict(zip(rest, torch.stack([parts[k].detach().cpu().to(torch.float64).reshape(())
                                              for k in rest]).tolist())) if rest else {}
        self._add({**{k: self._checked[k][1] if known(k, v) else fetched[k] if k in fetched
                      else float(v) for k, v in parts.items()}, "lr": lr})

    def _add(self, values, sum_only=False):
        if not sum_only:
            self.sums["n"] = self.sums.get("n", 0) + 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def _end_epoch(self):
        run = self.run
        n = self.sums.pop("n", 1)
        totals = torch.tensor(list(self.sums.values()), dtype=torch.float64, device=run.device)
        cdist.all_reduce(totals)
        rec = {"epoch": self.epoch}
        for (k, _), v in zip(self.sums.items(), totals.tolist()):
            rec[k] = v if k == "skipped" else v / n / run.world
        rec.update(self.extra_log)
        last = self.epoch + 1 == run.args.epochs
        if self.monitor and ((self.epoch + 1) % run.args.knn_every == 0 or last):
            rec["knn_accuracy"] = self.monitor(self.backbone)
        self.history.append(rec)
        self.epoch, self.step, self.sums = self.epoch + 1, 0, {}
        self.save()  # checkpoint first: log.jsonl is rewritten from its history on resume
        if run.main:
            with open(run.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            export_backbone(self.backbone, run.out / "backbone.pth")
            shown = "  ".join(f"{k} {v:.4g}" for k, v in rec.items()
                              if k != "epoch" and isinstance(v, (int, float)))
            print(f"epoch {rec['epoch']}: {shown}", flush=True)
            if rec.get("skipped"):
                print(f"warning: {int(rec['skipped'])} unreadable images skipped this epoch",
                      flush=True)
        # A signal that came after the epoch's last step (e.g. during the kNN monitor) stops here,
        # with the finished epoch saved; every rank agrees, as in the step loop.
        stop = torch.tensor([float(run.stop_signal is not None)], device=run.device)
        cdist.all_reduce(stop, "max")
        if stop.item():
            run.leave(f"the end of epoch {rec['epoch']}")
        run.in_loop = False


_new_run_folder = None  # the output folder this process created, if it did
_unfinished_start = []  # files of a start that has no checkpoint yet (args.json)
_run = None  # the Run of this process, for the out-of-memory line


def main_guard(main):
    """Run main(); bad input and non-finite losses end with one clear line, not a traceback
    (on a line of its own, not glued to a progress bar), and a run folder that a failed start
    created is removed again if nothing was written into it."""
    try:
        main()
    except (cdata.DataError, NonFiniteLoss) as e:
        _fail(e, 2 if isinstance(e, cdata.DataError) else 1)
    except torch.OutOfMemoryError:
        _fail(oom_message(_run), 1)
    except KeyboardInterrupt as e:  # a second Ctrl-C
        _fail(interrupt_message(e), 130)
    except Exception as e:  # noqa: BLE001 - a loader worker's DataError may come back re-wrapped
        if "DataError:" not in str(e):
            _forget_unfinished_start()
            raise
        _fail(e, 2)
    except SystemExit as e:  # a signal before the first step
        if e.code not in (0, None):
            _forget_unfinished_start()
        raise
    finally:
        cdist.cleanup()


def interrupt_message(e):
    path = getattr(e, "checkpoint_write", None)
    if path is None:
        held = _run.out / "checkpoint.pth" if _run is not None else None
        if held is not None and held.exists():
            return f"aborted by a second Ctrl-C; {held} holds the last saved state"
        return "aborted by a second Ctrl-C"
    if path.exists():
        return (f"aborted by a second Ctrl-C while writing {path}: the previous {path.name} is "
                f"intact ({path.name}.tmp removed); rerun the same command to resume from it")
    return (f"aborted by a second Ctrl-C while writing the first {path}; nothing was saved "
            f"({path.name}.tmp removed)")


# ResNet-18's saved activations for backward, fp32, 224 px: ~42.5 MiB per image (README's
# memory table); bf16 autocast roughly halves them.
RESNET18_MIB_PER_IMAGE = 42.5


def oom_message(run, total_bytes=None):
    """One line for an out-of-memory error: the global batch, --batch-size, and what fits by the
    README's estimate (ResNet-18 activations x views per sample x (size / 224)^2)."""
    if run is None:
        return "out of memory; lower --batch-size"
    a = run.args
    line = (f"out of memory at global batch {run.global_batch} = {run.world} process(es) x "
            f"--batch-size {a.batch_size}")
    if total_bytes is None:
        if getattr(a, "simulate_oom", None) and "," in a.simulate_oom:
            total_bytes = float(a.simulate_oom.split(",")[1]) * 2**30
        elif run.cuda:
            total_bytes = torch.cuda.get_device_properties(run.device).total_memory
    views = run.views_per_sample
    if total_bytes and views and getattr(a, "arch", None) == "resnet18":
        per_image = (RESNET18_MIB_PER_IMAGE * 2**20 * views * (a.img_size / 224) ** 2
                     * (0.5 if run.amp else 1.0))
        fits = int(0.8 * total_bytes // per_image)  # 20% for weights, optimiser, workspace
        if 0 < fits < a.batch_size:
            return (f"{line}: about {fits} per process fits in {total_bytes / 2**30:.0f} GiB "
                    f"({views} views of {a.img_size} px, ~{per_image / 2**20:.0f} MiB each for "
                    f"backward): use --batch-size {fits} (global {fits * run.world}; the lr "
                    "scales with it), or more GPUs, or --amp")
    return (f"{line}: lower --batch-size (e.g. {max(1, a.batch_size // 2)}, global "
            f"{max(1, a.batch_size // 2) * run.world}; the lr scales with it), or use more GPUs")


def _forget_unfinished_start():
    """A start that ends before its first checkpoint leaves no folder holding only args.json."""
    if _run is not None and (_run.out / "checkpoint.pth").exists():
        return
    for f in _unfinished_start:
        Path(f).unlink(missing_ok=True)
    if _new_run_folder is not None:
        remove_if_empty(_new_run_folder)


def _fail(e, code):
    sys.stdout.write("\n")  # end a progress bar's line first
    sys.stdout.flush()
    print(f"error: {_last_line(e)}", file=sys.stderr, flush=True)
    _forget_unfinished_start()
    sys.exit(code)


def _last_line(e):
    """A DataError raised in a loader worker reaches the main process wrapped with the worker's
    traceback; its own message is the text after the last 'DataError:'."""
    text = str(e)
    return text.rsplit("DataError:", 1)[1].strip() if "Original Traceback" in text else text
