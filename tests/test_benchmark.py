"""The benchmark runs every method present for a step and reports sane numbers (no timing is
asserted: timings belong in README, not in tests)."""
import json

from tests.conftest import run_script


def test_step_time_runs_every_method(tmp_path):
    out = tmp_path / "bench.json"
    p = run_script("benchmarks/step_time.py", "--quick", "--warmup", "0", "--steps", "1",
                   "--samples", "3", "--json", out)
    res = json.loads(out.read_text())
    import benchmarks.step_time as bench
    assert set(res["methods"]) == set(bench.METHODS)
    for m in res["methods"].values():
        assert m["step_s"] > 0 and m["bound_s"] > 0
    assert res["data"]["ours_ms"] > 0 and res["data"]["torchvision_ms"] > 0
    assert "| moco_v2 |" in p.stdout and "b-ConCL extra part" in p.stdout
