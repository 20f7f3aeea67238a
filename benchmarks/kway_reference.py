"""The FracTrain authors' way of running DFQ, rebuilt for the step benchmark: every option computed.

Their CIFAR code runs each gated block once per precision option on the whole batch and mixes the
outputs with the gate's one-hot mask, ``out = sum_k mask_k * block_k(x)``, so a step costs about
K times the block's compute. This module rebuilds that structure around ``examples.models``'
``CifarResNet``: the same gate architecture as fracpass's (pool -> 1x1 convs -> shared LSTM ->
linear -> hard softmax), and fracpass's fused quantizer functions for the convs, so the comparison
measures the K passes, not a slower quantizer. Written from the paper's description; no code is copied.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from examples.models import BasicBlock, CifarResNet
from fracpass.gating import FEATURES, HIDDEN, _HardChoice
from fracpass.quant import _FakeQuantSTE, _GradQuantFn


def _qconv(conv: nn.Conv2d, x: torch.Tensor, a: int, g: int, w: int) -> torch.Tensor:
    mn, mx = torch.aminmax(x.detach())
    qx = _FakeQuantSTE.apply(x, mn, mx, a)
    flat = conv.weight.detach().flatten(1)
    wmn, wmx = torch.aminmax(flat, dim=1)
    qw = _FakeQuantSTE.apply(conv.weight, wmn.view(-1, 1, 1, 1), wmx.view(-1, 1, 1, 1), w)
    out = F.conv2d(qx, qw, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return _GradQuantFn.apply(out, g) if out.requires_grad else out


class KWayBlock(nn.Module):
    def __init__(self, block: BasicBlock, options: Sequence[tuple], w: int):
        super().__init__()
        self.block, self.options, self.w = block, list(options), w
        channels = block.conv1.in_channels
        self.fc1, self.fc2 = nn.Linear(channels, FEATURES), nn.Linear(FEATURES, HIDDEN)

    def forward(self, x, lstm, proj, state):
        h, c = lstm(self.fc2(F.relu(self.fc1(x.mean((2, 3))))), state)
        mask = _HardChoice.apply(F.softmax(proj(h), dim=1))
        b = self.block
        residual = x if b.downsample is None else b.downsample(x)
        out = 0
        for k, (a, g) in enumerate(self.options):
            if a == 0:
                branch = torch.zeros_like(residual)
            else:
                y = b.relu1(b.bn1(_qconv(b.conv1, x, a, g, self.w)))
                branch = b.bn2(_qconv(b.conv2, y, a, g, self.w))
            out = out + mask[:, k].view(-1, 1, 1, 1) * branch
        return F.relu(out + residual), (h, c)


class KWayResNet(nn.Module):
    """A CifarResNet whose blocks run every option and mix them (the authors' DFQ execution)."""

    def __init__(self, model: CifarResNet, a=(3, 4, 4, 6, 6), g=(6, 6, 8, 8, 12), w: int = 4):
        super().__init__()
        self.stem = nn.Sequential(model.conv1, model.bn1, model.relu)
        self.blocks = nn.ModuleList(KWayBlock(b, list(zip(a, g)), w)
                                    for layer in (model.layer1, model.layer2, model.layer3) for b in layer)
        self.lstm, self.proj = nn.LSTMCell(HIDDEN, HIDDEN), nn.Linear(HIDDEN, len(a))
        self.avgpool, self.fc = model.avgpool, model.fc

    def forward(self, x):
        x, state = self.stem(x), None
        for block in self.blocks:
            x, state = block(x, self.lstm, self.proj, state)
        return self.fc(torch.flatten(self.avgpool(x), 1))
