"""Native execution chooses its own memory layout: 2-D convolutions run channels_last.

oneDNN's int8 convolution, the fused BatchNorm kernels and the int8 input gradient take channels-last
operands only, and a channels-last bf16 convolution is oneDNN's fast form on CPUs. A user's model and
input are NCHW unless the user converts them, so with ``NativeOptions(channels_last=True)`` (the default)
a native 2-D convolution converts an NCHW input (and a fused residual) at the op: its output is then
channels_last, and so is every activation after it (aten's BatchNorm, ReLU, adds and the next
convolutions keep the layout), so a model converts once, at its first native convolution. Gradients go
back in the layout each input came in (``to_channels_last``'s backward), and the lower-native pass gives
the graph's 4-D outputs back in the model input's layout (``like_input``). Values are the same in
either layout; the gradient quantizers' stochastic rounding draws its noise by memory index, so a
converted model's rounding noise is that of the channels-last model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _ToChannelsLast(torch.autograd.Function):
    """x in channels_last; its gradient back in x's layout (NCHW)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous()


def converts(x: Any) -> bool:
    """Whether a native 2-D convolution converts ``x`` to channels_last: a 4-D tensor with more than one
    channel that is not channels-last already (an NCHW one, or any other strides)."""
    return (isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] > 1
            and not x.is_contiguous(memory_format=torch.channels_last))


def to_channels_last(x: Tensor) -> Tensor:
    """``x`` as channels_last (a copy), its gradient given back contiguous (NCHW)."""
    return _ToChannelsLast.apply(x)


def like_input(out: Any, first: Any) -> Any:
    """A graph output back in the layout of the model's first input: a channels-last 4-D tensor is made
    contiguous (NCHW) when the model's input is a contiguous 4-D tensor. Anything else is returned as is.
    Put at the graph's outputs by the lower-native pass when it lowers a 2-D convolution."""
    if (isinstance(out, Tensor) and out.dim() == 4 and isinstance(first, Tensor) and first.dim() == 4
            and first.is_contiguous() and not out.is_contiguous()
            and out.is_contiguous(memory_format=torch.channels_last)):
        return out.contiguous()
    return out
