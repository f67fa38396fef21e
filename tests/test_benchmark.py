"""The benchmark runs every method present for a step and reports sane numbers (no timing is
asserted: timings belong in README, not in tests)."""
import json

from tests.conftest import run_script


def test_step_time_runs_every_method(tmp_path):
    out = tmp_path / "bench.json"
    p = run_script("benchmarks/step_time.py", "--quick", "--warmup", "0", "--steps", "1",
                   "--samples", "3", "--json", out)
    res = json.loads(out.read_text())
    assert (res["args"]["steps"], res["args"]["warmup"], res["args"]["samples"]) == (1, 0, 3)
    assert res["args"]["img_size"] == 64  # --quick fills what was not given
    ops = res["store"]["ops"]["photometric"]  # the counter splits kernels from views
    assert ops["kernels"] + ops["metadata"] == ops["device"] and 0 < ops["metadata"] < 60
    import benchmarks.step_time as bench
    assert set(res["methods"]) == set(bench.METHODS)
    for m in res["methods"].values():
        assert m["step_s"] > 0 and m["bound_s"] > 0
    assert res["data"]["ours_ms"] > 0 and res["data"]["torchvision_ms"] > 0
    assert "| moco_v2 |" in p.stdout and "b-ConCL extra part" in p.stdout
    from tests.conftest import REPO
    present = [m for m in ("simclr", "moco", "byol", "densecl", "pcl", "detcon", "concl", "mcl",
                           "pixcon")
               if (REPO / f"{m}.py").exists()]
    for m in present:  # a method file without a benchmark entry fails here
        assert any(name.startswith(m) for name in bench.METHODS), m


def test_finetune_benchmark_runs(tmp_path):
    out = tmp_path / "ft.json"
    p = run_script("benchmarks/finetune_time.py", "--quick", "--warmup", "0", "--steps", "1",
                   "--json", out)
    res = json.loads(out.read_text())
    assert res["step_s"] > 0 and res["bound_s"] > 0 and res["GlaS 1x"] > 0
    assert "step / backbone-only bound" in p.stdout
