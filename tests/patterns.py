"""Small models with the patterns of torchvision / timm models that broke fracpass (issue 13).

torchvision's wheel does not import against the CPU torch here, so each failing pattern is
rebuilt from the models' own source, at toy sizes:

* ``MBConvNet``       MobileNetV3 / EfficientNet: inverted residuals with squeeze-excite and in-place
                      Hardswish; the SE's convs have no BatchNorm, so in-place activations modify a
                      quantized op's output
* ``InplaceAfter``    a conv or linear without BatchNorm followed by any in-place op
* ``SqueezeNetLike``  SqueezeNet's fire modules: two expand branches merged by a concat, no residual
* ``LRASPPLike``      LR-ASPP's head joining a low and a high branch of a residual backbone
* ``ChunkNet``        EdgeNeXt / CoaT: a chunk (or unbind) feeding a residual block
* ``ViTLike``         torchvision ViT: ``nn.MultiheadAttention`` blocks
* ``SwinLike``        torchvision Swin: attention in a ``torch.fx.wrap``ped function
* ``TimmViTLike``     timm ViT / DeiT: ``forward(x, attn_mask=None, is_causal=False)`` into SDPA
* ``MobileViTLike``   timm MobileViTv2: ``if new_h != H or new_w != W`` on the input's shape
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


# -- MobileNetV3 / EfficientNet --------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: the 1x1 convs have a bias and no BatchNorm."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.scale = nn.Hardsigmoid(inplace=True)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.scale(self.fc2(self.relu(self.fc1(s))))


class MBConv(nn.Module):
    def __init__(self, cin: int, expand: int, cout: int, stride: int = 1):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.Hardswish(inplace=True))
        self.depthwise = nn.Sequential(nn.Conv2d(expand, expand, 3, stride, 1, groups=expand, bias=False),
                                       nn.BatchNorm2d(expand), nn.Hardswish(inplace=True))
        self.se = SqueezeExcite(expand, max(8, expand // 4))
        self.project = nn.Sequential(nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return y + x if self.use_res else y


class MBConvNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(inplace=True))
        self.blocks = nn.Sequential(MBConv(8, 16, 8), MBConv(8, 24, 12, stride=2), MBConv(12, 24, 12))
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


# -- any in-place op on a quantized op's output ----------------------------------------------------
# name -> (the in-place op, the same op out of place: the reference its gradients must equal)
INPLACE_MODULES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    "ReLU": (lambda: nn.ReLU(inplace=True), nn.ReLU),
    "ReLU6": (lambda: nn.ReLU6(inplace=True), nn.ReLU6),
    "Hardswish": (lambda: nn.Hardswish(inplace=True), nn.Hardswish),
    "Hardsigmoid": (lambda: nn.Hardsigmoid(inplace=True), nn.Hardsigmoid),
    "Hardtanh": (lambda: nn.Hardtanh(inplace=True), nn.Hardtanh),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.1, inplace=True), lambda: nn.LeakyReLU(0.1)),
    "ELU": (lambda: nn.ELU(inplace=True), nn.ELU),
    "SELU": (lambda: nn.SELU(inplace=True), nn.SELU),
    "CELU": (lambda: nn.CELU(inplace=True), nn.CELU),
    "SiLU": (lambda: nn.SiLU(inplace=True), nn.SiLU),
    "Mish": (lambda: nn.Mish(inplace=True), nn.Mish),
    "Threshold": (lambda: nn.Threshold(0.1, 0.0, inplace=True), lambda: nn.Threshold(0.1, 0.0)),
    "RReLU": (lambda: nn.RReLU(inplace=True), nn.RReLU),
    "Dropout": (lambda: nn.Dropout(0.1, inplace=True), lambda: nn.Dropout(0.1)),
}


class _Call(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _iadd(x):
    x += 1.0
    return x


def _isub(x):
    x -= 0.5 * x.detach()
    return x


INPLACE_CALLS: Dict[str, Tuple[Callable, Callable]] = {
    "F.relu_": (F.relu_, F.relu),
    "F.relu(inplace)": (lambda x: F.relu(x, inplace=True), F.relu),
    "F.hardswish(inplace)": (lambda x: F.hardswish(x, inplace=True), F.hardswish),
    "F.silu(inplace)": (lambda x: F.silu(x, inplace=True), F.silu),
    "F.leaky_relu_": (lambda x: F.leaky_relu_(x, 0.1), lambda x: F.leaky_relu(x, 0.1)),
    "F.elu_": (F.elu_, F.elu),
    "torch.relu_": (torch.relu_, torch.relu),
    "Tensor.relu_": (lambda x: x.relu_(), lambda x: x.relu()),
    "Tensor.sigmoid_": (lambda x: x.sigmoid_(), lambda x: x.sigmoid()),
    "Tensor.tanh_": (lambda x: x.tanh_(), lambda x: x.tanh()),
    "Tensor.clamp_": (lambda x: x.clamp_(-1.0, 1.0), lambda x: x.clamp(-1.0, 1.0)),
    "Tensor.mul_": (lambda x: x.mul_(0.5), lambda x: x.mul(0.5)),
    "Tensor.add_": (lambda x: x.add_(1.0), lambda x: x.add(1.0)),
    "x += 1": (_iadd, lambda x: x + 1.0),
    "x -= y": (_isub, lambda x: x - 0.5 * x.detach()),
}
INPLACE_OPS = sorted(INPLACE_MODULES) + sorted(INPLACE_CALLS)


def inplace_op(name: str, inplace: bool = True) -> nn.Module:
    if name in INPLACE_MODULES:
        return INPLACE_MODULES[name][0 if inplace else 1]()
    return _Call(INPLACE_CALLS[name][0 if inplace else 1])


class InplaceAfter(nn.Module):
    """conv (no BN) -> op -> conv -> op -> residual ``y += x`` -> linear -> op, the op in place
    (or, with ``inplace=False``, its out-of-place twin). The residual add is in place on the second
    conv's output, as in timm's GhostNet."""

    def __init__(self, op: str, classes: int = 5, inplace: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.act1 = inplace_op(op, inplace)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = inplace_op(op, inplace)
        self.fc = nn.Linear(4, classes)
        self.act3 = inplace_op(op, inplace)

    def forward(self, x):
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        y += x
        return self.act3(self.fc(y.mean((2, 3))))


# -- SqueezeNet ------------------------------------------------------------------------------------
class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNetLike(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 4, 8), Fire(16, 4, 8))
        self.classifier = nn.Sequential(nn.Conv2d(16, classes, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# -- LR-ASPP ---------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class LRASPPLike(nn.Module):
    """A backbone whose low stage ends in residual blocks and whose high stage starts with a
    downsampling conv (no shortcut) before more residual blocks; torchvision's LRASPPHead adds
    ``low_classifier(low)`` to ``high_classifier(cbr(high) * scale(high))``, so that add is
    reached from ``low`` on both sides."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.low_stage = nn.Sequential(ResBlock(8), ResBlock(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(inplace=True))
        self.high_stage = nn.Sequential(ResBlock(16), ResBlock(16))
        self.cbr = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1, bias=False), nn.Sigmoid())
        self.low_classifier = nn.Conv2d(8, classes, 1)
        self.high_classifier = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        low = self.low_stage(self.stem(x))
        high = self.high_stage(self.down(low))
        y = self.cbr(high) * self.scale(high)
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.low_classifier(low) + self.high_classifier(y)
        return out.mean((2, 3))


# -- chunk / unbind before a block -----------------------------------------------------------------
class ChunkNet(nn.Module):
    """EdgeNeXt's split-transpose: ``spx = x.chunk(2, 1)``, then ``sp = conv(spx[0]) + spx[1]``;
    CoaT's ``q, k, v = qkv.unbind(0)`` as ``split="unbind"``."""

    def __init__(self, split: str = "chunk", classes: int = 5):
        super().__init__()
        self.split = split
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stem(x)
        if self.split == "chunk":
            a, b = x.chunk(2, dim=1)
        else:
            a, b = x.unflatten(1, (2, 4)).unbind(1)
        y = self.conv2(F.relu(self.conv1(a))) + b
        return self.fc(torch.cat([y, a], 1).mean((2, 3)))


# -- attention hidden in a leaf module or a wrapped function ---------------------------------------
class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, batch_first: bool = True, need_weights: Optional[bool] = False):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.ln_1(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        if self.need_weights is None:  # the module's default: need_weights=True
            y, _ = self.self_attention(y, y, y)
        else:
            y, _ = self.self_attention(y, y, y, need_weights=self.need_weights)
        if not self.batch_first:
            y = y.transpose(0, 1)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViTLike(nn.Module):
    """torchvision's VisionTransformer at toy size: conv patches, class token, MHA blocks."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 2, classes: int = 5, patch: int = 4,
                 batch_first: bool = True, need_weights: Optional[bool] = False):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.layers = nn.Sequential(*[ViTBlock(dim, heads, batch_first, need_weights) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.ln(self.layers(x))[:, 0])


@torch.fx.wrap
def window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor, window: int, heads: int,
                     qkv_bias: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` without the shift: pad to whole windows, attend
    within each window, crop. Python control flow on the input's shape is why it is wrapped."""
    b, h, w, c = x.shape
    pad_b, pad_r = (window - h % window) % window, (window - w % window) % window
    if pad_b or pad_r:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = x.shape[1], x.shape[2]
    x = x.view(b, ph // window, window, pw // window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.shape[0], x.shape[1], 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * (c // heads) ** -0.5).matmul(k.transpose(-2, -1)).softmax(dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(x.shape[0], x.shape[1], c)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(b, ph // window, pw // window, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    return x[:, :h, :w, :].contiguous()


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window, self.heads = window, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return window_attention(x, self.qkv.weight, self.proj.weight, self.window, self.heads, self.qkv.bias,
                                self.proj.bias)


class SwinLike(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, window: int = 3, classes: int = 5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean((1, 2)))


class TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


class TimmViTLike(nn.Module):
    """timm's VisionTransformer: the top-level forward takes the mask and ``is_causal`` too."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 2, classes: int = 5):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList(TimmBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.head(self.norm(x).mean(1))


class MobileViTLike(nn.Module):
    """timm's MobileViTv2 block: unfold into patches, resizing first when the map does not tile
    (``if new_h != H or new_w != W``), which symbolic tracing cannot follow."""

    def __init__(self, dim: int = 8, patch: int = 2, classes: int = 5):
        super().__init__()
        self.patch = patch
        self.stem = nn.Conv2d(3, dim, 3, 2, 1)
        self.local = nn.Conv2d(dim, dim, 1)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.local(F.silu(self.stem(x)))
        b, c, h, w = x.shape
        new_h, new_w = math.ceil(h / self.patch) * self.patch, math.ceil(w / self.patch) * self.patch
        if new_h != h or new_w != w:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        p = self.patch
        x = x.reshape(b, c, new_h // p, p, new_w // p, p).permute(0, 3, 5, 2, 4, 1).reshape(b, p * p, -1, c)
        x = x + self.mix(x)
        return self.head(x.mean((1, 2)))


# name -> (factory, example input maker taking a batch size)
def _image(size: int) -> Callable[[int], torch.Tensor]:
    return lambda b: torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))


PATTERNS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "mbconv_se_hardswish": (MBConvNet, _image(16)),
    "inplace_relu": (lambda: InplaceAfter("ReLU"), lambda b: torch.randn(b, 4, 6, 6)),
    "inplace_mul_": (lambda: InplaceAfter("Tensor.mul_"), lambda b: torch.randn(b, 4, 6, 6)),
    "inplace_iadd": (lambda: InplaceAfter("x += 1"), lambda b: torch.randn(b, 4, 6, 6)),
    "fire": (SqueezeNetLike, _image(16)),
    "lraspp_head": (LRASPPLike, _image(16)),
    "chunk_block": (ChunkNet, _image(8)),
    "unbind_block": (lambda: ChunkNet("unbind"), _image(8)),
    "multihead_attention": (ViTLike, _image(8)),
    "fx_wrapped_attention": (SwinLike, _image(16)),
    "sdpa_is_causal_arg": (TimmViTLike, _image(8)),
    "shape_branch_export_path": (MobileViTLike, _image(10)),
}
