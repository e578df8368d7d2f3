"""Test architectures that stress conversion: functional, shared, untraceable and subclassed convs.

The classic families (ResNet, VGG, MobileNet) live in convsep.models; these are the
odd shapes real models come in.
"""

import torch
import torch.nn.functional as F
from torch import nn

from convsep.models import mobilenet_v1, resnet18, resnet50, small_cnn, vgg16


class FunctionalConvNet(nn.Module):
    """A stem conv called as F.conv2d on a parameter, then an ordinary conv."""

    def __init__(self):
        super().__init__()
        self.stem_weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.stem_bias = nn.Parameter(torch.randn(8) * 0.1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.stem_weight, self.stem_bias, stride=1, padding=1))
        return self.conv(x)


class InnerFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.2)

    def forward(self, x):
        return torch.conv2d(x, self.w, None, 1, 1)


class NestedFunctionalNet(nn.Module):
    """A functional conv deep inside: only the inner module should become a GraphModule."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = nn.Sequential(InnerFunctional())

    def forward(self, x):
        return self.inner(self.conv(x))

    def extra_method(self):
        return "kept"


class SharedConvNet(nn.Module):
    """One conv module applied twice, and also reachable under a second name."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.alias = self.conv
        self.head = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(self.alias(F.relu(self.conv(x)))))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:  # fx cannot trace a branch on a tensor value
            return self.conv(x)
        return -self.conv(-x)


class UntraceableNet(nn.Module):
    """fx fails on a submodule's control flow and on the root's shape assert."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = DataDependent()
        self.tail = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x):
        assert x.shape[1] == 3, "expects RGB"
        return self.tail(self.block(self.stem(x)))


class SamePaddingConv(nn.Conv2d):
    """A TF-style 'same' conv: pads asymmetrically in forward, so a plain pair would differ."""

    def forward(self, x):
        pad_h = max((x.shape[-2] - 1) // self.stride[0] * self.stride[0] + self.kernel_size[0] - x.shape[-2], 0)
        pad_w = max((x.shape[-1] - 1) // self.stride[1] * self.stride[1] + self.kernel_size[1] - x.shape[-1], 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PlainSubclassConv(nn.Conv2d):
    """A subclass that adds nothing to forward: safe to convert."""


class SubclassConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.same = SamePaddingConv(3, 8, 3, stride=2)
        self.plain = PlainSubclassConv(8, 8, 3, padding=1)

    def forward(self, x):
        return self.plain(self.same(x))


class MixedDimsNet(nn.Module):
    """1-d, 2-d and 3-d convs in one model."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, padding=2)
        self.c2 = nn.Conv2d(8, 8, (3, 5), padding=(1, 2), padding_mode="reflect")
        self.c3 = nn.Conv3d(8, 4, 3, padding=1, padding_mode="circular", bias=False)

    def forward(self, x):  # x: (B, 4, 4 * 6 * 6)
        b = x.shape[0]
        x = self.c1(x).reshape(b, 8, 24, 6)
        x = self.c2(x).reshape(b, 8, 4, 6, 6)
        return self.c3(x)


def small(f, **kwargs):
    return lambda: f(**kwargs)


# name -> (factory, example input shape). Small widths keep the suite fast.
ARCHITECTURES = {
    "resnet18": (small(resnet18, width=8, num_classes=10), (2, 3, 32, 32)),
    "resnet50": (small(resnet50, width=8, num_classes=10), (2, 3, 32, 32)),
    "vgg16": (small(vgg16, width=8, num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v1": (small(mobilenet_v1, width=8, num_classes=10), (2, 3, 32, 32)),
    "small_cnn": (small(small_cnn, width=8), (2, 1, 28, 28)),
    "functional": (FunctionalConvNet, (2, 3, 12, 12)),
    "nested_functional": (NestedFunctionalNet, (2, 3, 12, 12)),
    "shared": (SharedConvNet, (2, 4, 10, 10)),
    "untraceable": (UntraceableNet, (2, 3, 12, 12)),
    "subclass": (SubclassConvNet, (2, 3, 13, 13)),
    "mixed_dims": (MixedDimsNet, (2, 4, 144)),
}


class Branch(nn.Module):
    """Its second conv runs only on inputs wider than 8: data of 8 or less never reaches it."""

    def __init__(self):
        super().__init__()
        self.stem, self.wide = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.stem(x)
        return self.wide(y) if x.shape[-1] > 8 else y


class Probe(nn.Module):
    """Passes its input through and counts its calls: whether (and how often) a model ran to its end."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x
