"""Random small models and plans for the fuzzer (tests/test_fuzz.py).

A model is a ``ModelSpec``: an optional image trunk (conv 1d/2d, grouped, depthwise, transposed,
norms, activations incl. in-place ones, residual blocks, two-branch concats), then, optionally, the
feature map read as a token sequence and a sequence trunk (linear, ``x @ W``, einsum, q·kᵀ/softmax/v
attention, ``bmm`` of two activations, LayerNorm, residual MLPs), then a linear classifier. Specs are
plain frozen tuples, so hypothesis shrinks them and a failure prints a readable recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import fracpass

IMAGE_LAYERS = ("conv", "conv_grouped", "conv_depthwise", "conv_transpose", "conv1d", "norm_bn", "norm_gn", "act",
                "residual", "concat")
SEQUENCE_LAYERS = ("linear", "matmul", "einsum", "attention", "bmm", "layernorm", "act", "residual_mlp")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "hardswish", "relu_inplace", "hardswish_inplace", "leaky_inplace",
               "relu_method_inplace")
BITS = (2, 3, 4, 6, 8, 16, 32)


@dataclass(frozen=True)
class ModelSpec:
    channels: int
    image: Tuple[Tuple[str, int], ...]  # (layer, variant) pairs
    sequence: Tuple[Tuple[str, int], ...]
    classes: int = 4

    @property
    def has_residual(self) -> bool:
        return any(layer in ("residual", "residual_mlp") for layer, _ in self.image + self.sequence)


def _activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "tanh": nn.Tanh(), "hardswish": nn.Hardswish(),
        "relu_inplace": nn.ReLU(inplace=True), "hardswish_inplace": nn.Hardswish(inplace=True),
        "leaky_inplace": nn.LeakyReLU(0.1, inplace=True), "relu_method_inplace": _ReluMethodInplace(),
    }[name]


class _ReluMethodInplace(nn.Module):
    def forward(self, x):
        return x.relu_()


class _Conv1d(nn.Module):
    """A conv over the flattened spatial positions: (B, C, H, W) -> conv1d -> (B, C, H, W)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)

    def forward(self, x):
        b, c, h, w = x.shape
        return self.conv(x.flatten(2)).reshape(b, c, h, w)


class _Residual(nn.Module):
    def __init__(self, c: int, variant: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c)
        self.act = _activation(ACTIVATIONS[variant % len(ACTIVATIONS)])
        self.conv2 = nn.Conv2d(c, c, 3 if variant % 2 else 1, padding=1 if variant % 2 else 0)

    def forward(self, x):
        return self.conv2(self.act(self.norm(self.conv1(x)))) + x


class _Concat(nn.Module):
    def __init__(self, c: int, split: int):
        super().__init__()
        self.left = nn.Conv2d(c, split, 1)
        self.right = nn.Conv2d(c, c - split, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.left(x), F.relu(self.right(x))], 1)


class _MatmulParam(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, x):
        return x @ self.weight


class _Einsum(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, x):
        return torch.einsum("btd,de->bte", x, self.weight)


class _Attention(nn.Module):
    """q·kᵀ / softmax / ·v written out (variant 0) or through scaled_dot_product_attention (variant 1)."""

    def __init__(self, d: int, variant: int):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.sdpa = variant % 2 == 1

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return self.out(y)


class _Bmm(nn.Module):
    def forward(self, x):
        return torch.bmm(torch.softmax(torch.bmm(x, x.transpose(1, 2)), dim=-1), x)


class _ResidualMLP(nn.Module):
    def __init__(self, d: int, variant: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.act = _activation(ACTIVATIONS[variant % len(ACTIVATIONS)])

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def _image_layer(layer: str, variant: int, c: int) -> nn.Module:
    if layer == "conv":
        k = (1, 3)[variant % 2]
        return nn.Conv2d(c, c, k, padding=k // 2, bias=variant % 3 == 0)
    if layer == "conv_grouped":
        return nn.Conv2d(c, c, 3, padding=1, groups=2)
    if layer == "conv_depthwise":
        return nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
    if layer == "conv_transpose":
        return nn.ConvTranspose2d(c, c, 3, padding=1, groups=(1, 2)[variant % 2])
    if layer == "conv1d":
        return _Conv1d(c)
    if layer == "norm_bn":
        return nn.BatchNorm2d(c)
    if layer == "norm_gn":
        return nn.GroupNorm(2, c)
    if layer == "act":
        return _activation(ACTIVATIONS[variant % len(ACTIVATIONS)])
    if layer == "residual":
        return _Residual(c, variant)
    if layer == "concat":
        return _Concat(c, 1 + variant % (c - 1))
    raise ValueError(layer)


def _sequence_layer(layer: str, variant: int, d: int) -> nn.Module:
    if layer == "linear":
        return nn.Linear(d, d, bias=variant % 2 == 0)
    if layer == "matmul":
        return _MatmulParam(d)
    if layer == "einsum":
        return _Einsum(d)
    if layer == "attention":
        return _Attention(d, variant)
    if layer == "bmm":
        return _Bmm()
    if layer == "layernorm":
        return nn.LayerNorm(d)
    if layer == "act":
        return _activation(ACTIVATIONS[variant % len(ACTIVATIONS)])
    if layer == "residual_mlp":
        return _ResidualMLP(d, variant)
    raise ValueError(layer)


class FuzzModel(nn.Module):
    """Input (B, 3, 6, 6) -> stem conv -> image trunk -> [tokens (B, 36, C) -> sequence trunk] -> mean -> fc."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        c = spec.channels
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.image = nn.Sequential(*[_image_layer(layer, v, c) for layer, v in spec.image])
        self.sequence = nn.Sequential(*[_sequence_layer(layer, v, c) for layer, v in spec.sequence])
        self.tokens = bool(spec.sequence)
        self.fc = nn.Linear(c, spec.classes)

    def forward(self, x):
        x = self.image(self.stem(x))
        if self.tokens:
            return self.fc(self.sequence(x.flatten(2).transpose(1, 2)).mean(1))
        return self.fc(x.mean((2, 3)))


def example_input(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


@st.composite
def model_specs(draw) -> ModelSpec:
    channels = draw(st.sampled_from((4, 6, 8)))
    layer = lambda names: st.tuples(st.sampled_from(names), st.integers(0, 11))
    image = draw(st.lists(layer(IMAGE_LAYERS), min_size=0, max_size=4))
    sequence = draw(st.lists(layer(SEQUENCE_LAYERS), min_size=0, max_size=3))
    return ModelSpec(channels, tuple(image), tuple(sequence))


@st.composite
def plans(draw, spec: ModelSpec) -> fracpass.Plan:
    """Static, a ladder, ordered rules (an exclusion, a per-kind override) or gates."""
    form = draw(st.sampled_from(("static", "ladder", "rules", "gates")))
    bits = st.sampled_from(BITS)
    if form == "static":
        return fracpass.Plan.static(w=draw(bits), a=draw(bits), g=draw(bits))
    if form == "ladder":
        n = draw(st.integers(2, 4))
        fw = tuple(sorted(draw(st.lists(st.sampled_from(BITS[:5]), min_size=n, max_size=n))))
        bw = tuple(sorted(draw(st.lists(st.sampled_from(BITS[1:6]), min_size=n, max_size=n))))
        return fracpass.Plan.progressive(fw=fw, bw=bw)
    if form == "rules":
        rules = [fracpass.Rule(kind=draw(st.sampled_from(("conv*", "conv2d", "linear", "matmul", "*"))), w=draw(bits),
                               g=draw(bits))]
        if draw(st.booleans()):  # an exclusion goes last: a later bits rule for the same op is a PlanError
            rules.append(fracpass.Rule(match="stem", exclude=True))
        return fracpass.Plan.static(w=draw(bits), a=draw(bits), g=draw(bits), rules=rules)
    granularity = draw(st.sampled_from(("op", "block") if spec.has_residual else ("op",)))
    k = draw(st.integers(2, 4))
    a = tuple(draw(st.lists(st.sampled_from((2, 3, 4, 6, 8)), min_size=k, max_size=k)))
    g = tuple(draw(st.lists(st.sampled_from((4, 6, 8, 12)), min_size=k, max_size=k)))
    gates = fracpass.Gates(a=a, g=g, w=draw(st.sampled_from((4, 8))), granularity=granularity,
                           target=draw(st.sampled_from((1.0, 3.0, 10.0))))
    return fracpass.Plan.static(8, 8, 8).with_gates(gates)
