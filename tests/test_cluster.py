"""Ready for the node and the cluster (issue 23 items 1-3, 5-8; issue 24 items 7-10): collectives
and memory layout, pre-emption by a scheduler, node-local folders, cuDNN autotuning, host
synchronisations per step, the loader on a node, out-of-memory, and bad output folders."""
import ast
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from common import data as cdata
from common import dist as cdist
from common import train as ctrain
from scripts.gpu_check import process_tree as tree
from tests.conftest import MOCO_TWO, REPO, free_port, run_script

TINY = ["--data", "demo", "--demo-size", "16", "--img-size", "32", "--queue-size", "64",
        "--knn-every", "0"]


def make_run(tmp_path, monkeypatch, *argv, out=None, **kw):
    """A moco Run built in this process (no signal handlers installed)."""
    import moco
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    args = moco.get_args([*TINY, "--batch-size", "4", "--output-dir", str(out or tmp_path / "run"),
                          *argv])
    return ctrain.Run(args, "moco", **kw)


# -- item 1: collectives and memory layout -------------------------------------------------------

def raw(t):
    """The tensor's memory in storage order (what NCCL reads and writes)."""
    return t.as_strided((t.numel(),), (1,))


def test_gathers_keep_channels_last_data_with_a_raw_memory_all_gather(monkeypatch):
    """NCCL's all_gather copies raw bytes into buffers shaped after the outputs; a channels_last
    input (shuffled MoCo keys, ConCL's C5 maps) must come back with its values in place."""
    def all_gather(out, x):  # the stand-in: memory order, strides ignored, as NCCL
        for o in out:
            raw(o).copy_(raw(x))
    monkeypatch.setattr(cdist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    expected = torch.cat([x, x])
    assert torch.equal(cdist.concat_all_gather(x), expected)
    assert torch.equal(cdist.gather_with_grad(x.clone().requires_grad_()), expected)


def test_all_reduce_of_a_non_contiguous_tensor_reduces_every_value(monkeypatch):
    def all_reduce(x, op=None):  # doubles raw memory; refuses what NCCL refuses
        assert x.is_contiguous()
        raw(x).mul_(2)
    monkeypatch.setattr(cdist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    x = torch.arange(12.).view(3, 4).t()
    assert torch.equal(cdist.all_reduce(x), 2 * torch.arange(12.).view(3, 4).t())


# -- item 5: cuDNN autotuning is the caller's choice --------------------------------------------

def test_run_sets_cudnn_autotuning_as_asked_and_the_fine_tuner_turns_it_off(tmp_path, monkeypatch):
    make_run(tmp_path, monkeypatch, out=tmp_path / "a")
    assert torch.backends.cudnn.benchmark is True
    make_run(tmp_path, monkeypatch, out=tmp_path / "b", cudnn_benchmark=False)
    assert torch.backends.cudnn.benchmark is False
    tree = ast.parse((REPO / "finetune_maskrcnn.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", None) == "Run"]
    assert len(calls) == 1 and {(k.arg, getattr(k.value, "value", None))
                                for k in calls[0].keywords} == {("cudnn_benchmark", False)}


# -- item 6: one device-to-host transfer per step -----------------------------------------------

def test_a_step_brings_flags_and_loss_parts_to_the_host_at_once(tmp_path, monkeypatch):
    run = make_run(tmp_path, monkeypatch)
    trainer = ctrain.Trainer.__new__(ctrain.Trainer)
    trainer.run, trainer.sums, trainer.epoch, trainer.step = run, {}, 0, 0
    trainer.ckpt_path, trainer._checked = run.out / "checkpoint.pth", {}
    transfers = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            transfers.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    loss = torch.tensor(2.5)
    parts = {"loss": loss.detach(), "acc": torch.tensor(75.0), "pos": torch.tensor(0.25),
             "neg": torch.tensor(-0.5)}
    trainer.check(loss, parts)
    trainer.update({**parts, "m": 0.99}, 0.1)  # a method adds a float: nothing to transfer
    assert transfers == ["tolist"]
    assert trainer.sums == {"n": 1, "loss": 2.5, "acc": 75.0, "pos": 0.25, "neg": -0.5,
                            "m": 0.99, "lr": 0.1}
    transfers.clear()
    trainer.update({"loss": torch.tensor(1.0), "acc": torch.tensor(50.0)}, 0.1)  # unchecked parts
    assert transfers == ["tolist"] and trainer.sums["loss"] == 3.5 and trainer.sums["acc"] == 125.0


# -- item 7: the loader on a node ----------------------------------------------------------------

class Seeded(torch.utils.data.Dataset):
    """A sample = (seed, epoch, index)-seeded noise, and the process that drew it."""

    def __init__(self, n, shape=(3, 4, 4)):
        self.n, self.shape, self.epoch = n, shape, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(cdata.sample_seed(0, self.epoch, i))
        return {"views": [torch.randint(0, 256, self.shape, dtype=torch.uint8, generator=g)],
                "pid": os.getpid()}


def draw(loader, sampler, epoch, start=0):
    sampler.set_epoch(epoch)
    sampler.set_start(start)
    batches = list(loader)
    return torch.cat([b["views"][0] for b in batches]), {int(p) for b in batches for p in b["pid"]}


def test_workers_live_across_epochs_and_draw_what_a_fresh_loader_draws():
    ds = Seeded(12)
    loader, sampler = cdata.pretrain_loader(ds, 2, 2, seed=0, device=torch.device("cpu"))
    plain, plain_sampler = cdata.pretrain_loader(Seeded(12), 2, 0, seed=0,
                                                 device=torch.device("cpu"))
    pids = set()
    for epoch in range(3):
        views, who = draw(loader, sampler, epoch)
        assert torch.equal(views, draw(plain, plain_sampler, epoch)[0])  # epoch reached the workers
        pids |= who
    assert len(pids) == 2 and os.getpid() not in pids  # the same two workers in every epoch
    tail, _ = draw(loader, sampler, 2, start=6)  # a resume in the middle of epoch 2
    assert torch.equal(tail, views[6:])


def test_too_small_dev_shm_is_one_line_saying_what_to_do(monkeypatch):
    ds = Seeded(8, shape=(3, 256, 256))  # 196,608 bytes of views a sample, and its pid
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(cdata, "_shm_free", lambda: 10 * 2**20)
    with pytest.raises(cdata.DataError) as e:
        cdata.pretrain_loader(ds, 4, 2, seed=0, device=torch.device("cpu"))
    need = 2 * 2 * 4 * 4 * (3 * 256 * 256 + 8) / 2**20  # processes x workers x prefetch x batch
    assert "/dev/shm has 10 MiB free" in str(e.value) and f"~{need:.0f} MiB" in str(e.value)
    assert "--shm-size=1g" in str(e.value) and "--workers" in str(e.value)
    monkeypatch.setattr(cdata, "_shm_free", lambda: 20 * 2**20)
    cdata.pretrain_loader(ds, 4, 2, seed=0, device=torch.device("cpu"))  # fits


# -- item 8: out of memory -----------------------------------------------------------------------

def test_out_of_memory_is_one_line_with_the_batch_and_what_fits_and_leaves_no_folder(tmp_path):
    out = tmp_path / "oom"
    p = run_script("moco.py", *TINY, "--img-size", "64", "--batch-size", "8", "--workers", "0",
                   "--epochs", "1", "--output-dir", out, "--simulate-oom", "1,0.02", check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    per_image = 42.5 * 2 * (64 / 224) ** 2  # MiB: 2 views of 64 px, ResNet-18 fp32
    fits = int(0.8 * 0.02 * 1024 // per_image)
    assert fits == 2
    assert ("out of memory at global batch 8 = 1 process(es) x --batch-size 8: about 2 per "
            "process fits in 0 GiB") in lines[0] and "--batch-size 2" in lines[0]
    assert not out.exists()  # issue 24.9: a failed start leaves no folder holding only args.json


# -- issue 24 items 7, 8, 10: output folders, foreign checkpoints, Ctrl-C during a write ----------

def test_output_dir_that_is_a_file_or_not_writable_is_one_line(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(cdata.DataError, match="is a file, not a folder"):
        make_run(tmp_path, monkeypatch, out=f)
    with pytest.raises(cdata.DataError, match="cannot write into --output-dir /sys"):
        make_run(tmp_path, monkeypatch, out="/sys")  # exists, refuses files even for root
    with pytest.raises(cdata.DataError, match="cannot create --output-dir /sys/run"):
        make_run(tmp_path, monkeypatch, out="/sys/run")
    assert not ctrain._new_run_folder


def resume_into(run):
    import moco
    model = moco.MoCo("resnet18", K=64)
    trainer = ctrain.Trainer.__new__(ctrain.Trainer)
    trainer.run, trainer.model, trainer.ckpt_path = run, model, run.out / "checkpoint.pth"
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer._resume()


def test_another_scripts_checkpoint_is_named(tmp_path, monkeypatch):
    run = make_run(tmp_path, monkeypatch)
    args = {**vars(run.args), "script": "pcl"}
    torch.save({"script": "pcl", "args": args, "model": {}}, run.out / "checkpoint.pth")
    with pytest.raises(cdata.DataError, match="was written by pcl.py, not moco.py"):
        resume_into(run)
    # an old checkpoint that does not say: a note, then the model's mismatch in one line
    del args["script"]
    torch.save({"args": args, "model": {"layer.weight": torch.zeros(1)}, "optimizer": {}},
               run.out / "checkpoint.pth")
    printed = []
    monkeypatch.setattr(run, "print", printed.append)
    with pytest.raises(cdata.DataError, match="does not fit this model"):
        resume_into(run)
    assert "does not record which script wrote it" in printed[0]


class Interrupting:
    def __reduce__(self):
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of torch.save


def test_second_ctrl_c_during_the_checkpoint_write_keeps_the_old_one(tmp_path, capsys):
    path = tmp_path / "checkpoint.pth"
    torch.save({"step": 1}, path)
    with pytest.raises(SystemExit) as e:
        ctrain.main_guard(lambda: ctrain.atomic_save({"step": 2, "x": Interrupting()}, path))
    assert e.value.code == 130 and torch.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no .tmp
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(err) == 1 and "previous checkpoint.pth is intact" in err[0]


def test_repeated_sigterm_is_one_stop_and_only_a_later_second_ctrl_c_aborts(tmp_path, monkeypatch):
    run = make_run(tmp_path, monkeypatch)
    run.print = lambda *a, **k: None
    run.in_loop = True
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    for _ in range(3):  # the scheduler's, torchrun's forward, ...
        run._on_signal(signal.SIGTERM, None)
    run._on_signal(signal.SIGINT, None)  # torchrun forwarding the terminal's Ctrl-C: same stop
    assert run.stop_signal == signal.SIGTERM
    assert run.agree(torch.tensor(1.0))[1] is True  # every rank stops after this step
    clock[0] += 5
    run._on_signal(signal.SIGTERM, None)  # a late SIGTERM does not abort either
    with pytest.raises(KeyboardInterrupt):
        run._on_signal(signal.SIGINT, None)  # a second Ctrl-C from the terminal


# -- items 2, 3, 7 with real processes (gloo) ----------------------------------------------------

def test_node_local_folders_are_refused_and_headers_are_read_once_per_node(tmp_path):
    p = run_script("tests/dist_cases.py", tmp_path, nproc=2)
    assert p.stdout.count("ok node-local") == 2 and p.stdout.count("ok headers") == 2, p.stdout


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_sigterm_to_every_process_under_torchrun_stops_once_and_resumes_exactly(
        moco_two_reference, tmp_path):
    """A scheduler's pre-emption: SIGTERM to the agent, both ranks and their loader workers, and
    the agent forwards it once more. One stop after the current step on every rank, a
    checkpoint at that step, and the rerun ends where an uninterrupted run ends."""
    two, (ref, _) = MOCO_TWO, moco_two_reference
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", *two, "--output-dir", str(cut)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while not (cut / "checkpoint.pth").exists():  # epoch 0 done: stop somewhere in epoch 1
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()
        time.sleep(0.05)
    for pid in tree(proc.pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    out, err = proc.communicate(timeout=300)
    stops = [ln.split("stopped by SIGTERM at ")[1].split(";")[0] for ln in out.splitlines()
             if "stopped by SIGTERM at " in ln]
    assert len(stops) == 1, out + err  # rank 0 says it, once; no abort, no lost peer
    assert "KeyboardInterrupt" not in err and "Connection closed" not in err, err
    ck = torch.load(cut / "checkpoint.pth", map_location="cpu", weights_only=False)
    where = stops[0]
    if where.startswith("the end of epoch"):
        assert (ck["epoch"], ck["step"]) == (int(where.split()[-1]) + 1, 0)
    else:
        assert f"epoch {ck['epoch']} step {ck['step']}" == where
    run_script(*two, "--output-dir", cut, nproc=2)
    a, b = (torch.load(d / "backbone.pth", map_location="cpu") for d in (cut, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every epoch's line, the interrupted one too (every rank's partial sums came back)
    timing = ("img_per_s", "data_time", "step_time_s")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing}
             for line in (d / "log.jsonl").read_text().splitlines()] for d in (cut, ref)]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows):
        assert a == pytest.approx(b, rel=1e-9)
