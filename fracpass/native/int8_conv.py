"""A bf16 convolution's products on int8 units where they apply: the forward and the input gradient on
oneDNN's int8 convolution, the weight gradient on the CPU kernels' VNNI loop (exact integer sums)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fracpass.quant import memory_order
from fracpass.native import codes, options, units
from fracpass.native.options import NativeOptions


def _split_limit(in_channels: int, split: float) -> int:
    """How many extra input channels a convolution's split weight codes may take (NativeOptions.split_channels)."""
    return max(4, int(split * in_channels)) if split > 0 else 0


def int8_reasons(x: Tensor, weight: Tensor, conv, sw: Tensor, gbits: int,
                 opts: NativeOptions) -> Tuple[Optional[str], ...]:
    """Why each of a per-tensor-input convolution's products does not run on int8 (None where it does):
    (the forward, on oneDNN's int8 convolution: the input codes' bytes (0..255, the zero point -lo) times
    the weight's codes as int8, int32 accumulation, the same bfloat16 product v as the bf16 convolution
    computes (int8_product); the input gradient, a stride-1 convolution's conv^T(t, q_w) being the
    convolution of the gradient's codes with the weight's flipped and transposed, so the same arithmetic
    (int8_input_grad); the weight gradient, conv_w(t, q_a) on the CPU kernels' AVX512-VNNI loop from the
    gradient's and the input's bytes, int32 sums into int64, exact (int8_weight_grad))."""
    stride, padding, dilation = conv[:3]
    common = _int8_conv_reason(x, conv)
    forward = "NativeOptions.int8_forward is False" if not opts.int8_forward else common
    if not opts.int8_input_grad:
        dx = "NativeOptions.int8_input_grad is False"
    elif sw.numel() > 1 or not 2 <= gbits <= options.MAX_INT8_BITS:
        dx = "the weight's scale is per output channel or the gradient is not quantized to 2..8 bits"
    elif any(s != 1 for s in stride) or any(p > d * (k - 1) for p, d, k in zip(padding, dilation, weight.shape[2:])):
        dx = "a strided convolution, or padding beyond the kernel's reach (its input gradient is no convolution)"
    else:
        dx = common
    co, ci, _, kw = weight.shape if weight.dim() == 4 else (0, 0, 0, 0)
    wo = x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) if x.dim() == 4 else 0
    if not opts.int8_weight_grad:
        dw = "NativeOptions.int8_weight_grad is False"
    elif not 2 <= gbits <= options.MAX_INT8_BITS:
        dw = "the gradient is not quantized to 2..8 bits"
    elif common:
        dw = common
    elif any(s != 1 for s in stride):
        dw = "a strided convolution"
    elif co % 16 or ci % 8 or kw > 3 or wo < 4 or wo % 4:
        dw = (f"{co} output channels, {ci} input channels, a kernel {kw} wide and an output {wo} wide: the VNNI "
              "kernel takes multiples of 16, of 8, at most 3 and multiples of 4")
    elif not units.ext(x).vnni_weight_grad():
        dw = "the CPU kernels were built without AVX512-VNNI"
    else:
        dw = None
    return forward, dx, dw


def _int8_conv_reason(x: Tensor, conv) -> Optional[str]:
    """What both int8 products need: a 2-D ungrouped convolution over a channels-last tensor on the CPU
    kernels and oneDNN's int8 convolution, on a CPU with int8 units."""
    stride, padding, dilation, transposed, output_padding, groups = conv
    if transposed or groups != 1 or x.dim() != 4:
        return "not a 2-D ungrouped convolution"
    if not x.is_contiguous(memory_format=torch.channels_last) or x.shape[1] == 1:
        return "an NCHW input (oneDNN's int8 convolution runs channels_last)"
    if units.ext(x) is None or not hasattr(torch.ops.onednn, "qconv_pointwise"):
        return "no CPU kernels or oneDNN int8 convolution for this tensor"
    return units.int8_support()


def int8_product(kept: tuple, qw: Tensor, conv, split: float, epilogue: Optional[tuple] = None,
                  hand: Optional[tuple] = None):
    """conv(q_a, q_w) as bfloat16 from the input's bytes u = q_a - lo (zero point -lo: the padding is code
    0, the real zero) and the weight's codes: exact in int32, rounded once to bfloat16, as the bf16
    convolution's float32 sum is while it stays under 2^24. 8-bit weight codes span 256 values that need
    not fit int8: the few outside it (the range's ends) split onto copies of their input channels
    (ext.int8_weight_codes, ext.append_channels: the same exact product, on at most _split_limit extra
    channels); where more input channels hold them, the channels run as t = q_w - k_c, and v =
    bfloat16(y + k_c S) with S the input codes' window sums over every channel and tap
    (ext.shifted_product_bf16). ``epilogue`` (scale, addend): float32 v * scale + addend instead
    (codes.scale_out's), in the shift's pass where there is one; or, where ``hand`` (the shape and strides
    of a fused BatchNorm's output whose only reader this input gradient's convolution is: ``takes``)
    takes the bfloat16 product with its epilogue, that product as a Handed, scaled where that
    BatchNorm's backward reads it."""
    stride, padding, dilation, _, _, groups = conv
    u, lo = kept[0], kept[1]
    ext = units.ext(u)
    t, k, shifted, dup = ext.int8_weight_codes(qw, _split_limit(qw.shape[1], split))
    zp, shifted = int(-lo), bool(shifted)
    if dup.numel():
        u = ext.append_channels(u, dup)
    one = torch.ones(1)  # one weight scale for the tensor: prepack reads a per-channel one value by value
    packed = torch.ops.onednn.qconv_prepack(t, one, 1.0, zp, stride, padding, dilation, groups, list(u.shape))
    y = torch.ops.onednn.qconv_pointwise(u, 1.0, zp, packed, one, torch.zeros(1, dtype=torch.int64), None, stride,
                                         padding, dilation, groups, 1.0, 0,
                                         torch.float32 if shifted else torch.bfloat16, "none", [], "")
    if hand is not None and not shifted and epilogue is not None and takes(hand, y, *epilogue):
        scale, addend = epilogue
        return Handed(y, scale.reshape(1).float(), None if addend is None else memory_order(addend))
    geometry = (t.shape[2], t.shape[3], stride, padding, dilation)  # (the shift's u has no extra channels)
    scale, addend = epilogue if epilogue is not None else (codes.NONE_F, codes.NONE_F)
    if shifted and scale.numel() == 1 and codes.same_sample_layout(addend, y):  # the epilogue in the shift's pass
        return ext.shifted_product_bf16(y, u, lo, k, *geometry, scale.reshape(1).float(), addend)
    v = ext.shifted_product_bf16(y, u, lo, k, *geometry, codes.NONE_F, codes.NONE_F) if shifted else y
    return v if epilogue is None else codes.scale_out(v, scale, None, addend=addend)


class Handed(NamedTuple):
    """An input gradient handed to the fused op before the convolution (conv_bn.Handover.grad): the
    bfloat16 product v, its scale (1,) and its addend (one sample in memory order, or None); the
    gradient is fl(fl(v scale) + addend)."""

    v: Tensor
    scale: Tensor
    addend: Optional[Tensor]


def split_handed(dx) -> Tuple[Optional[Tensor], tuple]:
    """(dL/dx, the placeholders' gradients): (None, a Handed's three) when dx was handed over, else
    (dx, three None)."""
    if isinstance(dx, Handed):
        return None, tuple(dx)
    return dx, (None, None, None)


def takes(hand: tuple, v: Tensor, scale: Tensor, addend: Optional[Tensor]) -> bool:
    """Whether a fused op's BatchNorm kernels read this product and epilogue as its output's gradient
    (``hand``: that output's shape and strides): bfloat16 in the output's shape and layout, one scale, an
    addend that is one sample in the same layout with a multiple of 16 values (or none)."""
    shape, stride = hand
    return (v.dtype == torch.bfloat16 and v.shape == shape and v.stride() == tuple(stride)
            and scale.numel() == 1
            and (addend is None or (codes.same_sample_layout(addend, v) and addend.numel() % 16 == 0)))


def int8_weight_grad(kept_g: tuple, u_a: Tensor, lo: float, qw: Tensor, conv, factor: Tensor,
                      offset_factor: Tensor) -> Tensor:
    """dw = s_a s_g conv_w(t, q_a) + c s_a conv_w(1, q_a) from the gradient's bytes (q, zero point k: t = q - k;
    channels-last) and the input's (u_a = q_a - lo): both window products exact in int64 (ext.weight_grad_u8),
    the scales applied in float64, rounded once to float32, in the weight's layout. ``factor`` = s_a s_g,
    ``offset_factor`` = c s_a."""
    _, padding, dilation = conv[:3]
    u_g = kept_g[0]
    prod, sums = units.ext(u_g).weight_grad_u8(u_g, -kept_g[1], u_a, lo, qw.shape[2], qw.shape[3], list(padding),
                                          list(dilation))
    dw = prod.mul_(factor.double()).add_(sums.mul_(offset_factor.double()))
    return torch.empty_strided(qw.shape, qw.stride()).copy_(dw)


def int8_input_grad(kept_g: tuple, qw: Tensor, conv, split: float, epilogue: Optional[tuple] = None,
                     hand: Optional[tuple] = None):
    """dx from conv^T(t, q_w) of a stride-1 convolution: the convolution of the gradient's codes (bytes q,
    channels-last, zero point k: t = q - k, the padding t = 0) with q_w flipped and with its channel axes
    swapped, dilated as the forward, padded d (K - 1) - p (int8_product's arithmetic, with its ``epilogue``)."""
    _, padding, dilation, _, _, _ = conv
    pad = [d * (k - 1) - p for p, d, k in zip(padding, dilation, qw.shape[2:])]
    flipped = qw.flip(2, 3).transpose(0, 1)
    return int8_product(kept_g, flipped, ([1, 1], pad, list(dilation), False, [0, 0], 1), split, epilogue, hand)
