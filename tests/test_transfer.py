"""benchmarks/transfer.py: the t distribution and Welch's test against closed forms, tables and
hand values; the report against hand-made metrics files; the command end to end on demo data
(two methods, one run), rerun without starting any process, and one step redone alone."""
import json
import math
import subprocess

import pytest

from benchmarks import transfer as tr
from conftest import REPO, run_script


# ----------------------------------------------------------------------------- statistics
def simpson_t_cdf(t, df, n=20000):
    """Brute force: integrate Student's t density from 0 to t (Simpson), plus 1/2."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = [c * (1 + (t * i / n) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    h = t / n
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_t_cdf_closed_forms_tables_and_brute_force():
    for t in (-7.0, -1.3, 0.0, 0.4, 2.0, 25.0):
        assert tr.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert tr.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # printed two-sided 5% and 1% critical values
    for t, df, q in ((12.706, 1, 0.975), (2.5706, 5, 0.975), (2.2281, 10, 0.975),
                     (2.0423, 30, 0.975), (3.1693, 10, 0.995), (4.0321, 5, 0.995)):
        assert tr.t_cdf(t, df) == pytest.approx(q, abs=2e-5)
    assert tr.t_cdf(1.959964, math.inf) == pytest.approx(0.975, abs=1e-6)
    for t, df in ((1.7320508, 75 / 17), (0.3, 3.5), (-2.2, 7.25), (4.0, 2.5)):  # non-integer df
        assert tr.t_cdf(t, df) == pytest.approx(simpson_t_cdf(t, df), abs=1e-9)


def test_welch_hand_values():
    # [1, 2, 3, 4] vs [2, 4, 6, 8]: means 2.5, 5; variances 5/3, 20/3; se^2 = 25/12, so
    # t = -2.5 / sqrt(25/12) = -sqrt(3) and df = (25/12)^2 / ((5/12)^2/3 + (5/3)^2/3) = 75/17
    t, df, p = tr.welch([1, 2, 3, 4], [2, 4, 6, 8])
    assert t == pytest.approx(-math.sqrt(3)) and df == pytest.approx(75 / 17)
    assert p == pytest.approx(2 * (1 - simpson_t_cdf(math.sqrt(3), 75 / 17)), abs=1e-9)
    # Wikipedia's Welch example 1 (15 vs 15 values): t = -2.46, df = 24.99, p = 0.021
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    t, df, p = tr.welch(a1, a2)
    assert (round(t, 2), round(df, 2), round(p, 3)) == (-2.46, 24.99, 0.021)
    assert tr.welch([1.0], [2.0, 3.0]) == (None, None, None)  # one run: no test
    assert tr.welch([3.0, 3.0], [3.0, 3.0])[2] == 1.0 and tr.welch([3.0, 3.0], [4.0, 4.0])[2] == 0.0


# ----------------------------------------------------------------------------- the report
def fake_metrics(ap, ap50, extra_groups=True):
    m = {"bbox": {"AP": ap, "AP50": ap50, "AP75": ap / 2, "APs": None},
         "segm": {"AP": ap + 1, "AP50": ap50 + 1, "AP75": ap / 2 + 1}}
    if extra_groups:
        m["testA"] = {"bbox": {"AP": ap + 10, "AP50": ap50, "AP75": 1.0},
                      "segm": {"AP": ap, "AP50": ap50, "AP75": 1.0}}
        m["testB"] = {"bbox": {"AP": ap - 10, "AP50": ap50, "AP75": 1.0},
                      "segm": {"AP": ap, "AP50": ap50, "AP75": 1.0}}
    return m


def cells(table, first):
    """The cells of the table's row whose first cell starts with `first`."""
    row = next(line for line in table.splitlines() if line.startswith(f"| {first}"))
    return [c.strip() for c in row.strip("|").split("|")][1:]


def test_report_from_hand_made_metrics(tmp_path, monkeypatch):
    out = tmp_path / "out"
    weights = tmp_path / "in1k.pth"
    weights.write_bytes(b"not read by the report")
    runs = {"in1k": [(1, 10.0), (2, 10.1), (3, 9.9), (4, 10.0)],
            "moco_v2": [(2, 50.0), (4, 50.2), (6, 49.8), (8, 50.0)]}
    for name, values in runs.items():
        for i, (ap, ap50) in enumerate(values):
            (out / "finetune" / "glas" / name / f"run{i}").mkdir(parents=True)
            (out / "finetune" / "glas" / name / f"run{i}" / "metrics.json").write_text(
                json.dumps(fake_metrics(ap, ap50)))
    (out / "pretrain" / "moco_v2").mkdir(parents=True)
    (out / "pretrain" / "moco_v2" / "log.jsonl").write_text(
        '{"epoch": 0, "knn_accuracy": 61.5}\n{"epoch": 1}\n')
    (out / "steps.jsonl").write_text(  # two attempts of the pre-training (a resumed run), 8 GPUs
        '{"step": "pretrain/moco_v2", "wall_s": 100.0, "cpu_s": 150.0, "devices": 8, "rc": -2}\n'
        '{"step": "pretrain/moco_v2", "wall_s": 50.0, "cpu_s": 50.0, "devices": 8, "rc": 0}\n')
    (out / "probe" / "in1k").mkdir(parents=True)
    (out / "probe" / "in1k" / "metrics.json").write_text(json.dumps(
        {"accuracy": 81.25, "macro_f1": 70.0, "knn_accuracy": 77.0, "label_fraction": 100.0,
         "by_fraction": {"100": {"accuracy": {"std": 0.5}, "macro_f1": {"std": 0.0},
                                 "knn_accuracy": {"std": 1.25}}}}))

    def no_process(*a, **k):
        raise AssertionError("--report-only started a process")
    monkeypatch.setattr(subprocess, "Popen", no_process)
    argv = ["--methods", f"in1k={weights}", "moco_v2", "--target", f"glas={tmp_path}",
            "--runs", "4", "--probe", "--out", str(out), "--report-only"]
    assert tr.main(argv) == 0
    md = (out / "results.md").read_text()
    main, test_ab, cost = [b for b in md.split("\n\n") if b.startswith("|")]
    # AP: moco_v2 [2, 4, 6, 8] best, in1k [1, 2, 3, 4] within its noise (p 0.15); AP50: 10 vs
    # 50, far apart (no mark); AP75 = AP / 2; mask AP = box AP + 1
    assert cells(main, "in1k")[:4] == ["2.5 ± 1.3 ≈", "10.0 ± 0.1", "1.2 ± 0.6 ≈", "3.5 ± 1.3 ≈"]
    assert cells(main, "MoCo-v2")[:4] == ["**5.0 ± 2.6**", "**50.0 ± 0.2**", "**2.5 ± 1.3**",
                                          "**6.0 ± 2.6**"]
    # Test A (box AP + 10), Test B (box AP - 10); AP75 1.0 everywhere: a tie, the first is best
    assert cells(test_ab, "`in1k`") == ["12.5 ± 1.3 ≈", "10.0 ± 0.1", "**1.0 ± 0.0**",
                                        "2.5 ± 1.3 ≈", "10.0 ± 0.1", "**1.0 ± 0.0**",
                                        "-7.5 ± 1.3 ≈", "10.0 ± 0.1", "**1.0 ± 0.0**",
                                        "2.5 ± 1.3 ≈", "10.0 ± 0.1", "**1.0 ± 0.0**"]
    assert cells(test_ab, "`moco_v2`")[2] == "1.0 ± 0.0 ≈"  # zero spread, equal means: p 1
    # cost: 150 s over two attempts on 8 processes = 0.333 device-hours, 200 CPU-s; the kNN
    # monitor's last
    # value; probe columns from probe/in1k/metrics.json
    assert cells(cost, "`moco_v2`") == ["0:02:30", "0.333", "0:03:20", "61.5", "0:00:00",
                                        "—", "—", "—"]
    assert cells(cost, "`in1k`") == ["—", "—", "—", "—", "0:00:00", "81.2 ± 0.5", "70.0",
                                     "77.0 ± 1.2"]
    res = json.loads((out / "results.json").read_text())
    pair = res["welch"]["glas/all/APbb"]["pairs"]["moco_v2 vs in1k"]
    assert pair["t"] == pytest.approx(math.sqrt(3)) and pair["df"] == pytest.approx(75 / 17)
    assert res["methods"]["in1k"]["finetune"]["glas"]["groups"]["testB"]["APbb"] == [
        -9.0, -8.0, -7.0, -6.0]
    assert "`moco_v2` 5.0 ≈ (p 0.15) `in1k` 2.5" in md
    from PIL import Image
    assert Image.open(out / "results.png").size[1] == 300  # one target: one row of 6 panels


def test_method_specs():
    m = tr.Method("g3=concl_grid --grid-size 3")
    assert (m.kind, m.script, m.flags, m.extra) == ("pretrain", "concl.py",
                                                    ["--concept", "grid"], ["--grid-size", "3"])
    assert tr.Method("detcon_S").flags == ["--variant", "S"]
    assert tr.Method("x=w.pth").kind == "file" and tr.Method("random").kind == "random"
    with pytest.raises(SystemExit, match="not a configuration"):
        tr.Method("mocov2")
    assert tr.devices("torchrun --nnodes=2 --nproc_per_node 8") == 16 and tr.devices("python") == 1


# ----------------------------------------------------------------------------- end to end
TINY = ["--methods", "moco_v2=moco_v2 --queue-size 16 --knn-every 0", "random",
        "--data", "demo", "--demo-size", "16", "--epochs", "1", "--batch-size", "8",
        "--img-size", "64", "--workers", "0", "--target", "demo", "--runs", "1",
        "--finetune-args", "--demo-size 8 --img-size 64 --batch-size 1 --max-iters 3 "
                           "--precise-bn 2 --workers 0 --vis 1"]


def test_a_redone_backbone_or_another_launcher_is_not_reused(tmp_path):
    """A fine-tuning step names its backbone by a path that stays when pre-training is redone:
    its record keeps the file's size and mtime, and a change (or another launcher) sets the
    old folder aside instead of reusing it."""
    steps = tr.Steps(tmp_path / "out", "python")
    backbone, folder = tmp_path / "backbone.pth", tmp_path / "ft"
    backbone.write_bytes(b"old")
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    argv = ["finetune_maskrcnn.py", "--pretrained", str(backbone), "--output-dir", str(folder)]
    steps.record("ft").write_text(json.dumps({"argv": argv, "launcher": "python",
                                              "inputs": steps.inputs(argv)}))
    assert steps.done("ft", argv, folder / "summary.json", "python")
    assert not steps.done("ft", argv, folder / "summary.json", "torchrun --nproc_per_node=2")
    assert not folder.exists() and len(list(tmp_path.glob("ft.old-*"))) == 1
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    assert steps.done("ft", argv, folder / "summary.json", "python")
    backbone.write_bytes(b"redone")  # another size: pre-training was redone
    assert not steps.done("ft", argv, folder / "summary.json", "python")
    assert not folder.exists()


def test_end_to_end_on_demo_then_resume_without_redoing(tmp_path, monkeypatch):
    out = tmp_path / "t"
    run_script("benchmarks/transfer.py", *TINY, "--out", out, timeout=900)
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["cpu_s"] > 0 and steps[0]["wall_s"] > 0
    assert [(s["step"], s["rc"]) for s in steps] == [
        ("pretrain/moco_v2", 0), ("finetune/demo/moco_v2", 0), ("finetune/demo/random", 0)]
    md, res = (out / "results.md").read_text(), json.loads((out / "results.json").read_text())
    for name, label in (("moco_v2", "moco_v2"), ("random", "Rand. Init.")):
        run0 = json.loads((out / "finetune" / "demo" / name / "run0" / "metrics.json").read_text())
        assert res["methods"][name]["finetune"]["demo"]["per_run"] == [run0]
        want = [f"{run0[t][k]:.1f}" for t, k in tr.COLUMNS]  # one run: the mean, no ±
        assert [c.strip("*≈ ") for c in cells(md.split("\n\n")[2], label)] == want
    commands = (out / "commands.sh").read_text()
    assert "python moco.py --version v2 --data demo" in commands
    assert f"--pretrained {out / 'pretrain' / 'moco_v2' / 'backbone.pth'}" in commands
    assert (out / "results.png").is_file()
    backbone = (out / "pretrain" / "moco_v2" / "backbone.pth").stat().st_mtime_ns

    # rerun: every step is finished, so no process starts and nothing is rewritten
    def no_process(*a, **k):
        raise AssertionError(f"a finished step was started again: {a}")
    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.chdir(REPO)
    assert tr.main([*TINY, "--out", str(out)]) == 0
    assert len((out / "steps.jsonl").read_text().splitlines()) == 3
    assert (out / "pretrain" / "moco_v2" / "backbone.pth").stat().st_mtime_ns == backbone
    assert (out / "results.md").read_text() == md
    # the table is read from the fine-tuner's files: change one and rebuild
    metrics = out / "finetune" / "demo" / "random" / "run0" / "metrics.json"
    m = json.loads(metrics.read_text())
    m["segm"]["AP75"] = 12.34
    metrics.write_text(json.dumps(m))
    assert tr.main([*TINY, "--out", str(out), "--report-only"]) == 0
    assert cells((out / "results.md").read_text().split("\n\n")[2], "Rand. Init.")[5].strip("*") == "12.3"

    # one step's record gone (e.g. a step killed before it was recorded): only that step runs,
    # and the fine-tuner reuses its finished run
    monkeypatch.undo()
    (out / "steps" / "finetune__demo__random.json").unlink()
    before = metrics.stat().st_mtime_ns
    monkeypatch.chdir(REPO)
    assert tr.main([*TINY, "--out", str(out)]) == 0
    steps = [json.loads(x)["step"] for x in (out / "steps.jsonl").read_text().splitlines()]
    assert steps[3:] == ["finetune/demo/random"] and metrics.stat().st_mtime_ns == before
    assert "done before" in (out / "logs" / "finetune__demo__random.log").read_text()
