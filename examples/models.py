"""Models for the examples, tests and benchmarks, written here so torchvision is not needed.

* CIFAR ResNets in the FracTrain / SkipNet layout: 16/32/64 channels, 6n+2 layers
  (``resnet20``, ``resnet38``, ``resnet74``, ``resnet110``, ``resnet1202``);
* MobileNetV2 adapted to 32x32 inputs (``mobilenet_v2``);
* a small transformer encoder classifier over token ids (``transformer``), with attention through
  ``F.scaled_dot_product_attention`` or explicit ``matmul``s.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "resnet20", "resnet38", "resnet74", "resnet110", "resnet1202",
           "MobileNetV2", "mobilenet_v2", "TransformerClassifier", "transformer"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + residual)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images, as in FracTrain's and SkipNet's CIFAR code."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth must be 6n+2 (20, 38, 74, 110, 1202), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet38(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(38, num_classes)


def resnet74(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(74, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, num_classes)


def resnet1202(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(1202, num_classes)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: the stem and the first downsampling stage keep stride 1."""

    # t (expansion), c (channels), n (repeats), s (stride of the first)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        ch = lambda c: max(8, int(math.ceil(c * width_mult / 8) * 8))
        inp, last = ch(32), ch(1280) if width_mult > 1.0 else 1280
        features = [nn.Sequential(nn.Conv2d(3, inp, 3, 1, 1, bias=False), nn.BatchNorm2d(inp), nn.ReLU6(inplace=True))]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(inp, ch(c), s if i == 0 else 1, t))
                inp = ch(c)
        features.append(nn.Sequential(nn.Conv2d(inp, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str, dropout: float):
        super().__init__()
        if attention not in ("sdpa", "matmul"):
            raise ValueError(f"attention must be 'sdpa' or 'matmul', got {attention!r}")
        self.heads, self.attention, self.dropout = heads, attention, dropout
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // self.heads)
            y = torch.matmul(F.dropout(scores.softmax(-1), self.dropout, self.training), v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, attention: str, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, attention, dropout)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class TransformerClassifier(nn.Module):
    """Pre-norm transformer encoder over token ids, mean-pooled into a linear classifier."""

    def __init__(self, vocab: int = 100, dim: int = 64, heads: int = 4, depth: int = 2, mlp: int = 128,
                 max_len: int = 64, num_classes: int = 10, attention: str = "sdpa", dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, mlp, attention, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))


def transformer(num_classes: int = 10, attention: str = "sdpa") -> TransformerClassifier:
    return TransformerClassifier(num_classes=num_classes, attention=attention)
