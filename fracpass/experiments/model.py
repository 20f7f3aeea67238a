"""The network the experiments train: a CIFAR-style ResNet (FracTrain's and SkipNet's layout)
sized for small images.

Three stages of ``n`` basic blocks at ``width``, 2x``width``, 4x``width`` channels, the second and
third starting with stride 2. Shortcuts that change shape are parameter-free, as in the authors'
CIFAR code (``DownsampleB``: average-pool, then zero channels appended), so every compute op is the
stem, a block's conv, or the classifier. ``in_channels`` is 1 for the digit sets, 3 for CIFAR-10.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

__all__ = ["SmallResNet"]


class _Downsample(nn.Module):
    """Average-pool by ``stride`` and append zero channels: FracTrain's ``DownsampleB``."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra_channels, stride

    def forward(self, x):
        return F.pad(F.avg_pool2d(x, self.stride, ceil_mode=True), (0, 0, 0, 0, 0, self.extra))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = _Downsample(cout - cin, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-(6n+2) for ``in_channels``-channel images of any size (global average pool at the end)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, n: int = 1, width: int = 16):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        blocks, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                blocks.append(_Block(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.layers(F.relu(self.bn1(self.conv1(x)))).mean((2, 3)))
