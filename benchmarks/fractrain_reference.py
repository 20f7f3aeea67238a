"""A plain-PyTorch quantized training layer in the style of the FracTrain authors' code.

The baseline fracpass is compared against: min/max range, round/clamp quantization with a
straight-through estimator built from ``clone`` + in-place ops inside an autograd Function, and an
autograd gradient quantizer whose stochastic rounding noise comes from ``uniform_`` as in their
``UniformQuantizeGrad``. Written from the published formulae; no code is copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits, mn, mx, stochastic):
        qmax = 2.0**bits - 1
        scale = ((mx - mn) / qmax).clamp(min=1e-8)
        out = x.clone()
        out.add_(-mn).div_(scale)
        if stochastic:
            out.add_(torch.empty_like(out).uniform_(-0.5, 0.5))
        out.clamp_(0, qmax).round_()
        return out.mul_(scale).add_(mn)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


class _QuantizeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits):
        ctx.bits = bits
        return x

    @staticmethod
    def backward(ctx, grad):
        return _Quantize.apply(grad, ctx.bits, grad.min(), grad.max(), True), None


class FracTrainConv2d(nn.Conv2d):
    """Conv2d quantizing its input (per tensor), weight (per output channel) and output gradient."""

    def __init__(self, *args, bits: int = 8, bits_grad: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.bits, self.bits_grad = bits, bits_grad

    def forward(self, x):
        qx = _Quantize.apply(x, self.bits, x.detach().min(), x.detach().max(), False)
        w = self.weight.detach().flatten(1)
        shape = (-1, 1, 1, 1)
        qw = _Quantize.apply(self.weight, self.bits, w.min(1)[0].view(shape), w.max(1)[0].view(shape), False)
        out = F.conv2d(qx, qw, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return _QuantizeGrad.apply(out, self.bits_grad)


def convert(model: nn.Module, bits: int = 8, bits_grad: int = 8) -> nn.Module:
    """Swap every nn.Conv2d of ``model`` for FracTrainConv2d (in place), as the authors' models are written."""
    for name, child in model.named_children():
        if type(child) is nn.Conv2d:
            q = FracTrainConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, child.groups, child.bias is not None, bits=bits, bits_grad=bits_grad)
            q.load_state_dict(child.state_dict())
            setattr(model, name, q)
        else:
            convert(child, bits, bits_grad)
    return model
