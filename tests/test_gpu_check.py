"""scripts/gpu_check.sh --cpu: the prepared GPU check, shrunk onto the CPU, so that it cannot rot
before a GPU machine runs it (issue 23). Every phase must pass and the JSON must say so."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_passes_in_cpu_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {k: v for k, v in res["phases"].items() if not v["ok"]}
    assert p.returncode == 0 and res["ok"] and not failed, (p.stdout, failed)
    assert list(res["phases"]) == ["versions", "collectives", "twins", "sigterm", "fp32_islands",
                                   "step_time", "finetune"]
    assert res["phases"]["collectives"]["details"]["gather_channels_last"] is True
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
