"""The networks the experiments train: CIFAR-style ResNets (FracTrain's and SkipNet's layout) sized
for small images.

Three stages of ``n`` basic blocks at ``width``, 2x``width``, 4x``width`` channels, the second and
third starting with stride 2 (``n = 3``, width 16: ResNet-20). Two kinds of shortcut where a block
changes shape:

* ``"proj"``: a 1x1 convolution (stride 2) and BatchNorm, as in the authors' CIFAR ResNets
  (FracTrain's ``models.py``: a ``QConv2d`` of kernel 1 and ``bn3``); these convolutions are compute
  ops that plans quantize like any other.
* ``"pad"``: parameter-free, average-pool then zero channels appended (a ``DownsampleB`` found in
  several CIFAR ResNet codes; FracTrain's ResNets do not use it), so every compute op is the stem,
  a block's conv or the classifier. The digits and MNIST-5k results were trained with it.

``in_channels`` is 1 for the digit and Fashion-MNIST sets, 3 for CIFAR-10.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fracpass.errors import FracpassError

__all__ = ["SmallResNet", "SHORTCUTS", "MODELS"]

SHORTCUTS = ("pad", "proj")
# --model: (blocks per stage, shortcut)
MODELS = {"resnet8": (1, "pad"), "resnet20": (3, "pad"), "resnet20-proj": (3, "proj")}


class _Downsample(nn.Module):
    """Average-pool by ``stride`` and append zero channels (parameter-free)."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra_channels, stride

    def forward(self, x):
        return F.pad(F.avg_pool2d(x, self.stride, ceil_mode=True), (0, 0, 0, 0, 0, self.extra))


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    """1x1 convolution + BatchNorm: the authors' shortcut where a block changes shape."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        elif shortcut == "proj":
            self.shortcut = _projection(cin, cout, stride)
        else:
            self.shortcut = _Downsample(cout - cin, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-(6n+2) for ``in_channels``-channel images of any size (global average pool at the end)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, n: int = 1, width: int = 16,
                 shortcut: str = "pad"):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise FracpassError(f"SmallResNet(shortcut={shortcut!r}): use 'proj' (1x1 conv + BN, the authors') or "
                                "'pad' (parameter-free)")
        self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        blocks, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                blocks.append(_Block(cin, cout, 2 if i > 0 and j == 0 else 1, shortcut))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.layers(F.relu(self.bn1(self.conv1(x)))).mean((2, 3)))
