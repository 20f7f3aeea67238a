"""Small example models, shipped with fracpass so its README runs anywhere, and written here so
torchvision is not needed (``examples.models`` re-exports them):

* CIFAR ResNets in the FracTrain / SkipNet layout: 16/32/64 channels, 6n+2 layers
  (``resnet20``, ``resnet38``, ``resnet74``, ``resnet110``, ``resnet1202``);
* MobileNetV2 adapted to 32x32 inputs (``mobilenet_v2``);
* a small transformer encoder classifier over token ids (``transformer``), with attention through
  ``F.scaled_dot_product_attention`` or explicit ``matmul``s;
* a tiny one-stage detector (``tiny_detector``): residual backbone, FPN neck, a head shared by the
  pyramid levels, and anchor matching and non-maximum suppression in Python that neither torch.fx
  nor torch.export can capture, like torchvision's detectors. Transform its parts, not the whole.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "resnet20", "resnet38", "resnet74", "resnet110", "resnet1202",
           "MobileNetV2", "mobilenet_v2", "TransformerClassifier", "transformer", "TinyDetector", "tiny_detector",
           "detection_batch"]


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


def transformer_d512(num_classes: int = 10, attention: str = "sdpa") -> TransformerClassifier:
    """Issue 11's benchmark encoder: dim 512, 8 heads, 4 layers, MLP 2048, sequences up to 128 of 1,000
    token ids, no dropout: wide enough that its GEMMs, not per-op overhead, dominate a step."""
    return TransformerClassifier(vocab=1000, dim=512, heads=8, depth=4, mlp=2048, max_len=128,
                                 num_classes=num_classes, attention=attention, dropout=0.0)


class DetectorBackbone(nn.Module):
    """A stride-2 stem and three residual stages; returns the stride 4, 8 and 16 feature maps."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        inplanes = width
        for planes in (width, 2 * width, 4 * width):
            down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes))
            self.stages.append(nn.Sequential(BasicBlock(inplanes, planes, 2, down), BasicBlock(planes, planes)))
            inplanes = planes
        self.channels = (width, 2 * width, 4 * width)

    def forward(self, x):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return tuple(features)


class FPN(nn.Module):
    """Feature pyramid: 1x1 laterals, top-down nearest upsampling and sums, 3x3 smoothing."""

    def __init__(self, in_channels, out_channels: int = 32):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)

    def forward(self, features):
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        return tuple(conv(p) for conv, p in zip(self.smooth, laterals))


class DetectorHead(nn.Module):
    """Shared by every pyramid level: a conv tower, then per location class logits and box deltas."""

    def __init__(self, channels: int = 32, num_classes: int = 3):
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box = nn.Conv2d(channels, 4, 3, padding=1)

    def forward(self, feature):
        t = self.tower(feature)
        # (N, C, H, W) -> (N, H*W, C): one anchor per location
        return self.cls(t).flatten(2).transpose(1, 2), self.box(t).flatten(2).transpose(1, 2)


class TinyDetector(nn.Module):
    """A one-stage detector in torchvision's calling convention: ``model(images, targets)`` returns a
    dict of losses in training, ``model(images)`` a list of ``{"boxes", "scores", "labels"}`` in eval.

    The head runs once per pyramid level in a Python loop over the neck's outputs, and anchor
    matching, the score threshold and non-maximum suppression depend on the data, so the whole
    model cannot be captured by torch.fx (it iterates a Proxy) nor torch.export (data-dependent
    branches). Its ``backbone``, ``neck`` and ``head`` can: transform those.
    """

    strides = (4, 8, 16)

    def __init__(self, num_classes: int = 3, width: int = 16, channels: int = 32, score_threshold: float = 0.05,
                 nms_iou: float = 0.5, max_detections: int = 20):
        super().__init__()
        self.backbone = DetectorBackbone(width)
        self.neck = FPN(self.backbone.channels, channels)
        self.head = DetectorHead(channels, num_classes)
        self.num_classes, self.score_threshold = num_classes, score_threshold
        self.nms_iou, self.max_detections = nms_iou, max_detections

    def anchors(self, features) -> torch.Tensor:
        """(sum of H*W, 4) boxes x1, y1, x2, y2: one square of side 4 * stride per location."""
        out = []
        for f, stride in zip(features, self.strides):
            h, w = f.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(h, device=f.device), torch.arange(w, device=f.device), indexing="ij")
            centre = torch.stack([xs, ys], -1).reshape(-1, 2).float().add(0.5).mul(stride)
            out.append(torch.cat([centre - 2 * stride, centre + 2 * stride], 1))
        return torch.cat(out)

    def forward(self, images, targets=None):
        features = self.neck(self.backbone(images))
        logits, deltas = zip(*(self.head(f) for f in features))
        logits, deltas, anchors = torch.cat(logits, 1), torch.cat(deltas, 1), self.anchors(features)
        if self.training:
            if targets is None:
                raise ValueError("TinyDetector in training mode needs targets: [{'boxes': (K, 4), 'labels': (K,)}]")
            return self.losses(logits, deltas, anchors, targets)
        return [self.detect(l, d, anchors) for l, d in zip(logits, deltas)]

    def losses(self, logits, deltas, anchors, targets):
        cls_loss, box_loss = logits.sum() * 0, deltas.sum() * 0
        for l, d, target in zip(logits, deltas, targets):
            iou = box_iou(anchors, target["boxes"])
            best, index = iou.max(1) if iou.numel() else (iou.new_zeros(len(anchors)), iou.new_zeros(len(anchors)).long())
            positive = best >= 0.4  # data-dependent: how many anchors match varies with the boxes
            labels = torch.zeros_like(l)
            labels[positive, target["labels"][index[positive]]] = 1.0
            cls_loss = cls_loss + F.binary_cross_entropy_with_logits(l, labels)
            if positive.any():
                goal = encode(anchors[positive], target["boxes"][index[positive]])
                box_loss = box_loss + F.smooth_l1_loss(d[positive], goal)
        return {"loss_classifier": cls_loss / len(targets), "loss_box_reg": box_loss / len(targets)}

    def detect(self, logits, deltas, anchors):
        scores, labels = logits.sigmoid().max(1)
        keep = scores > self.score_threshold
        boxes, scores, labels = decode(anchors[keep], deltas[keep]), scores[keep], labels[keep]
        order = scores.argsort(descending=True)
        chosen = []
        while order.numel() and len(chosen) < self.max_detections:  # greedy NMS, per class
            i, order = order[0], order[1:]
            chosen.append(i)
            same = labels[order] == labels[i]
            order = order[~(same & (box_iou(boxes[i:i + 1], boxes[order])[0] > self.nms_iou))]
        index = torch.stack(chosen) if chosen else torch.zeros(0, dtype=torch.long)
        return {"boxes": boxes[index], "scores": scores[index], "labels": labels[index]}


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)
    lo, hi = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-6)


def encode(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    wb, hb = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3), (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)
    return torch.stack([((boxes[:, 0] + boxes[:, 2]) - (anchors[:, 0] + anchors[:, 2])) / 2 / wa,
                        ((boxes[:, 1] + boxes[:, 3]) - (anchors[:, 1] + anchors[:, 3])) / 2 / ha,
                        torch.log(wb / wa), torch.log(hb / ha)], 1)


def decode(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx = (anchors[:, 0] + anchors[:, 2]) / 2 + deltas[:, 0] * wa
    cy = (anchors[:, 1] + anchors[:, 3]) / 2 + deltas[:, 1] * ha
    w, h = wa * deltas[:, 2].clamp(max=4).exp(), ha * deltas[:, 3].clamp(max=4).exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def tiny_detector(num_classes: int = 3) -> TinyDetector:
    return TinyDetector(num_classes)


def detection_batch(batch: int = 2, size: int = 64, num_classes: int = 3, seed: int = 0):
    """Synthetic images and targets for ``TinyDetector``: one to three random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = []
    for _ in range(batch):
        k = int(torch.randint(1, 4, (), generator=g))
        lo = torch.rand(k, 2, generator=g) * size * 0.6
        wh = (torch.rand(k, 2, generator=g) * 0.3 + 0.1) * size
        targets.append({"boxes": torch.cat([lo, lo + wh], 1), "labels": torch.randint(0, num_classes, (k,), generator=g)})
    return images, targets
