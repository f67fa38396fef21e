"""Backbones and the BN emulation shared by the MoCo family."""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCHS = ("resnet18", "resnet50")


def resnet(arch):
    """torchvision ResNet with `fc` removed, so its state_dict is exactly what `backbone.pth`
    holds and the output is the global-average-pooled feature (512-d for ResNet-18).

    Random init as torchvision does it; no zero-init of residual BN gammas (none of the recipes
    use it, methods.md 0.2).
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: choose from {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from `num_splits` groups of the batch.

    One process with batch 256 and 8 splits normalises exactly like 8 GPUs with 32 images each,
    which is what MoCo's shuffle-BN assumes (methods.md D8; the official single-GPU demo,
    facebookresearch/moco colab notebook, does the same). Running statistics are updated with the
    mean of the chunks' statistics. Parameters and buffers are those of nn.BatchNorm2d, so
    state_dicts stay interchangeable with torchvision's.
    """

    def __init__(self, num_features, num_splits, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x):
        n, c, h, w = x.shape
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        if n % g:
            raise ValueError(f"batch of {n} does not split into {g} BN groups (--bn-splits)")
        rm, rv = self.running_mean.repeat(g), self.running_var.repeat(g)
        # (n, c) -> (n/g, g*c): image i lands in channel block i % g, so group j holds images
        # j, j+g, j+2g, ... . Any fixed partition serves (the sampler already shuffles), and this
        # one needs no copy.
        y = F.batch_norm(x.reshape(n // g, c * g, h, w), rm, rv,
                         self.weight.repeat(g), self.bias.repeat(g),
                         True, self.momentum, self.eps).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(rm.view(g, c).mean(0))
            self.running_var.copy_(rv.view(g, c).mean(0))
            self.num_batches_tracked.add_(1)
        return y


def convert_split_bn(module, num_splits):
    """Replace every BatchNorm2d in `module` by a SplitBatchNorm2d that keeps its state."""
    if num_splits <= 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            new = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps,
                                   momentum=child.momentum, affine=child.affine,
                                   track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device if child.affine else child.running_mean.device)
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
