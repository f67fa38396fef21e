"""CPU twins of the CUDA paths (issue 23): every pre-training method runs a tiny epoch with --amp
(bf16 autocast, on the CPU too) and --channels-last, on one process and on two (gloo), and its
convolutions are seen to run in bf16 on channels_last inputs; SyncBN's conversion is checked on
CPU modules (SyncBN itself runs only on CUDA)."""
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from common import train as ctrain
from common.models import SplitBatchNorm1d, SplitBatchNorm2d
from tests.conftest import run_script
from tests.twin_driver import METHODS

@pytest.fixture(scope="module")
def twin_lines(tmp_path_factory):
    """Both runs of the driver (every method in one process; 2 processes: every method in one
    process group), as {(nproc, method): line}."""
    lines = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"twins{nproc}")
        p = run_script("tests/twin_driver.py", out, nproc=nproc, check=False, timeout=900)
        for m, rest in re.findall(r"^twin (\w+) (.*)$", p.stdout, re.M):
            lines.setdefault((nproc, m), rest)  # rank 0's line first; ranks agree or both fail
        lines[(nproc, "_log")] = p.stdout[-2000:] + p.stderr[-3000:]
    return lines


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_in_bf16_on_channels_last(twin_lines, method, nproc):
    line = twin_lines.get((nproc, method), "missing")
    assert line.startswith("ok"), f"{line}\n{twin_lines[(nproc, '_log')]}"
    assert "bfloat16" in line.split()[1] and "channels_last=True" in line  # the CUDA path ran


def bn_kinds(model):
    return {n: type(m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def models():
    import byol
    import mcl
    import pixcon
    import simclr
    yield "simclr", simclr.SimCLR("resnet18", 32, 16)
    yield "byol", byol.BYOL("resnet18", 32, 16, head_bn_splits=2)  # heads: BN in groups
    yield "mcl", mcl.MCL("resnet18", 2, 32, 16)
    yield "pixcon", pixcon.PixCon("resnet18", 32, 16, K=16)


@pytest.mark.parametrize("name, model", list(models()), ids=lambda v: v if isinstance(v, str) else "")
def test_sync_bn_conversion_keeps_names_state_groups_and_ema_pairs(name, model):
    cuda_pair = SimpleNamespace(cuda=True, world=2)  # what Run.sync_bn converts for
    before_kinds, before_params = bn_kinds(model), [n for n, _ in model.named_parameters()]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    model = ctrain.Run.sync_bn(cuda_pair, model)
    after = bn_kinds(model)
    assert after.keys() == before_kinds.keys()
    for n, kind in before_kinds.items():
        split = issubclass(kind, (SplitBatchNorm1d, SplitBatchNorm2d))
        assert after[n] is (kind if split else nn.SyncBatchNorm), n  # split groups are kept
    if name == "byol":
        assert any(issubclass(k, SplitBatchNorm1d) for k in after.values())
        assert all(m.num_splits == 2 for m in model.modules() if isinstance(m, SplitBatchNorm1d))
    assert [n for n, _ in model.named_parameters()] == before_params  # optimiser, EMA order
    state = model.state_dict()
    assert state.keys() == before_state.keys()
    assert all(torch.equal(state[k], v) for k, v in before_state.items())
    if hasattr(model, "target"):  # the EMA pairs online/target parameters by position
        pairs = list(zip(model.online.named_parameters(), model.target.named_parameters(),
                         strict=True))
        assert all(a == b and p.shape == q.shape for (a, p), (b, q) in pairs)
        assert {type(m) for m in model.target.modules()} == {type(m) for m in model.online.modules()}


def test_sync_bn_is_left_out_on_the_cpu_and_on_one_process():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    for cuda, world in ((False, 2), (True, 1)):
        assert ctrain.Run.sync_bn(SimpleNamespace(cuda=cuda, world=world), model) is model
        assert type(model[1]) is nn.BatchNorm2d
