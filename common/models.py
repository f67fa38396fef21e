"""Backbones, the BN emulation shared by the MoCo family, and loading pre-trained bodies."""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common.data import DataError

ARCHS = ("resnet18", "resnet50")


INITS = ("openselfsup", "torchvision")


def resnet(arch, init="openselfsup"):
    """torchvision ResNet with `fc` removed, so its state_dict is exactly what `backbone.pth`
    holds and the output is the global-average-pooled feature (512-d for ResNet-18).

    init "openselfsup" (default): the ResNet of OpenSelfSup, which trained every NCT recipe of
    the ConCL paper: convolutions Kaiming-normal with fan_in (mmcv `kaiming_init(mode='fan_in')`,
    bias 0), BN weight 1 / bias 0. "torchvision": torchvision's own (Kaiming fan_out), which the
    official MoCo / SimCLR-PyTorch code inherits. No zero-init of residual BN gammas in either
    (none of the recipes use it, docs/methods.md 0.2).
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: choose from {', '.join(ARCHS)}")
    if init not in INITS:
        raise ValueError(f"--init {init!r}: choose from {', '.join(INITS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if init == "openselfsup":
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return net


class _SplitBN:
    """BatchNorm whose training statistics come from `num_splits` groups of the batch.

    One process with batch 256 and 8 splits normalises exactly like 8 GPUs with 32 images each,
    which is what MoCo's shuffle-BN assumes (docs/methods.md D8; the official single-GPU demo,
    facebookresearch/moco colab notebook, does the same); BYOL's heads use it for the recipe's
    per-GPU BN1d. Running statistics are updated with the mean of the chunks' statistics.
    Parameters and buffers are those of nn.BatchNorm1d/2d, so state_dicts stay interchangeable.
    """

    def __init__(self, num_features, num_splits, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x):
        n, c = x.shape[:2]
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        if n % g:
            raise ValueError(f"batch of {n} does not split into {g} BN groups")
        rm, rv = self.running_mean.repeat(g), self.running_var.repeat(g)
        w, b = (self.weight.repeat(g), self.bias.repeat(g)) if self.affine else (None, None)
        # (n, c, ...) -> (n/g, g*c, ...): image i lands in channel block i % g, so group j holds
        # images j, j+g, j+2g, ... . Any fixed partition serves (the sampler already shuffles),
        # and this one needs no copy.
        y = F.batch_norm(x.reshape(n // g, c * g, *x.shape[2:]), rm, rv, w, b,
                         True, self.momentum, self.eps).reshape(x.shape)
        with torch.no_grad():
            self.running_mean.copy_(rm.view(g, c).mean(0))
            self.running_var.copy_(rv.view(g, c).mean(0))
            self.num_batches_tracked.add_(1)
        return y


class SplitBatchNorm2d(_SplitBN, nn.BatchNorm2d):
    pass


class SplitBatchNorm1d(_SplitBN, nn.BatchNorm1d):
    pass


def convert_split_bn(module, num_splits):
    """Replace every BatchNorm1d/2d in `module` by its split version, keeping its state."""
    if num_splits <= 1:
        return module
    for name, child in module.named_children():
        kind = {nn.BatchNorm2d: SplitBatchNorm2d, nn.BatchNorm1d: SplitBatchNorm1d}.get(type(child))
        if kind is not None:
            new = kind(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                       affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(child.running_mean.device)
            setattr(module, name, new)
        else:
            convert_split_bn(child, num_splits)
    return module


def resnet_maps(net, x, upto=5):
    """The stage outputs C2..C`upto` (layer1..layer4, strides 4..32) of a `resnet()` network,
    before pooling; dense methods read C5 (7 x 7 at 224 px), ConCL clusters C4 and need not pay
    for layer4 then."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    maps = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4)[:upto - 1]:
        x = layer(x)
        maps.append(x)
    return maps


# ---------------------------------------------------------------------------------------------
# Loading pre-trained backbones (fine-tuning, probes)

# Where a ResNet body sits inside the checkpoints people bring, most preferred first: ours
# (backbone.pth has none; checkpoint.pth has encoder_q.0. / online.0. / backbone.), DDP and
# torch.compile wrappers, official MoCo / DenseCL / OpenSelfSup / BYOL / DINO-style ones.
# Among equally complete candidates the query/online/student encoder wins over its momentum twin.
PREFERRED_PREFIXES = ("", "module.", "_orig_mod.", "encoder_q.0.", "encoder_q.", "module.encoder_q.",
                      "module.encoder_q.0.", "online.0.", "online.", "backbone.", "module.backbone.",
                      "encoder.", "model.", "student.", "module.encoder.", "student.backbone.")
STATE_NESTS = ("state_dict", "model", "model_state_dict", "network", "student", "teacher")
# Names of the momentum / EMA twin, which loses any tie with the encoder trained by gradient,
# the one MoCo / BYOL evaluate (MoCo v3 base_encoder vs momentum_encoder). Not DINO's teacher:
# DINO evaluates the teacher, which its unprefixed `backbone.` already prefers.
TWIN_MARKERS = ("momentum", "target", "encoder_k", "_ema", "ema_", "key_encoder")


def _read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - e.g. an argparse.Namespace inside (DINO, DetCon ports)
        pass
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"--pretrained {path}: not a PyTorch checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    print(f"note: {path} needed full unpickling (it holds more than tensors); load only "
          "checkpoints you trust", file=sys.stderr)
    return obj


def _state_dicts(obj, where=""):
    """Every tensor dict in a checkpoint, searched through the usual nests."""
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
        if tensors:
            yield where, tensors
        for key in STATE_NESTS:
            if isinstance(obj.get(key), dict):
                yield from _state_dicts(obj[key], f"{where}[{key!r}]")


def load_pretrained(net, spec):
    """Load a ResNet body (everything but `fc`) into `net` from `spec` ("random" or a path) and
    return a one-line report. Accepts our backbone.pth and checkpoint.pth, torchvision ResNet
    files and third-party self-supervised checkpoints: the tensors are looked for in
    `state_dict` / `model` / ... nests and under whichever key prefix holds a complete body.
    Raises DataError naming the file when no complete body is there (a foreign or mismatched
    architecture) rather than fine-tuning a half-random network."""
    if spec == "random":
        return "random initialisation (OpenSelfSup's, resnet()'s default)"
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--pretrained {spec}: no such file (or 'random')")
    want = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    required = [k for k in want if not k.endswith("num_batches_tracked")]  # old files lack it
    best = None  # (matched, -is_twin, -preference, where, prefix, tensors, state dict)
    for where, sd in _state_dicts(_read_checkpoint(path)):
        prefixes = {k[:len(k) - len(t)] for k in sd for t in required if k.endswith("." + t) or k == t}
        for p in sorted(prefixes):  # sorted, and ties keep the first: the same on every run
            got = {t: sd[p + t] for t in want if p + t in sd and sd[p + t].shape == want[t].shape}
            pref = PREFERRED_PREFIXES.index(p) if p in PREFERRED_PREFIXES else len(PREFERRED_PREFIXES)
            twin = any(m in (where + p).lower() for m in TWIN_MARKERS)
            cand = (sum(t in got for t in required), -twin, -pref, where, p, got, sd)
            if best is None or cand[:3] > best[:3]:
                best = cand
    if best is None or best[0] < len(required):
        found = 0 if best is None else best[0]
        hint = ""
        if best is not None:
            miss = next(t for t in required if t not in best[5])
            have = best[6].get(best[4] + miss)
            hint = (f"; e.g. {best[4]}{miss} " + ("is missing" if have is None else
                    f"has shape {tuple(have.shape)}, not {tuple(want[miss].shape)}"))
        raise DataError(f"--pretrained {spec}: holds {found} of the {len(required)} tensors of a "
                        f"{type(net).__name__} body (wrong --arch, or not a ResNet checkpoint){hint}")
    matched, _, _, where, prefix, got, sd = best
    missing = net.load_state_dict(got, strict=False).missing_keys
    assert all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in missing), missing
    ignored = {}
    for k in sd:
        if not (k.startswith(prefix) and k[len(prefix):] in got):
            rest = k[len(prefix):] if k.startswith(prefix) else k
            depth = 2 if prefix and rest.split(".")[0] == prefix.split(".")[0] else 1
            group = ".".join(rest.split(".")[:depth])  # e.g. encoder_k, or encoder_q.1 (head)
            ignored[group] = ignored.get(group, 0) + 1
    shown = ", ".join(f"{g}.* ({n})" for g, n in sorted(ignored.items())) or "nothing"
    return (f"loaded {len(got)} backbone tensors from {spec}{where or ''}"
            f"{f' under prefix {prefix!r}' if prefix else ''}; ignored {shown}")
