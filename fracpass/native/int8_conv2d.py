"""conv2d's forward on oneDNN's int8 convolution (opt-in kind "conv2d_int8"); backward in float32 on
the decoded codes."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fracpass.quant import FULL_PRECISION, affine_params, quantize_grad_stochastic
from fracpass.native import codes, decide, units
from fracpass.native.site import NativeSite, quantized, record

@torch.library.custom_op("fracpass::int8_conv2d", mutates_args=())
def int8_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], u: Tensor, s: Tensor, zp: Tensor, tw: Tensor,
                kw: Optional[Tensor], sw: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                groups: int, gbits: int) -> Tensor:
    """conv2d's forward on oneDNN's int8 convolution over uint8 activation codes ``u`` (scale ``s``, zero
    point ``zp`` included, so zero padding is the real zero) and int8 weight codes ``tw`` (scale ``sw`` per
    output channel; ``kw``: the shift of 8-bit codes, t = q - k), scales applied by oneDNN, int32
    accumulation (exact). Backward (fracpass::int8_conv2d_backward): both products in float32 on the
    decoded codes, as the simulation computes them (oneDNN has no int8 weight-gradient or transposed
    convolution here); the codes are what is saved. x and weight are inputs for their gradients."""
    cw = codes.Coded(tw, kw, sw)
    cout, cg = weight.shape[0], weight.shape[0] // groups
    x_scale, x_zp = float(s), int(zp)  # CPU tensors: a memory read, no device sync
    tw, w_scale = cw.t, cw.s
    if cw.k is not None:
        # 8-bit weights are shifted (t = q - k): one extra all-ones output channel per group gives the
        # window sums of x-hat that the correction s_w k * sum(x-hat) needs, inside the same int8 conv
        ones = tw.new_ones(groups, 1, *tw.shape[1:])
        tw = torch.cat([tw.view(groups, cg, *tw.shape[1:]), ones], 1).view(-1, *tw.shape[1:])
        w_scale = torch.cat([w_scale.view(groups, cg), w_scale.new_ones(groups, 1)], 1).view(-1)
    w_scale = w_scale.contiguous()
    packed = torch.ops.onednn.qconv_prepack(tw, w_scale, x_scale, x_zp, list(stride), list(padding),
                                            list(dilation), groups, list(u.shape))
    y = torch.ops.onednn.qconv_pointwise(u, x_scale, x_zp, packed, w_scale,
                                         torch.zeros(w_scale.numel(), dtype=torch.int64),
                                         bias if cw.k is None else None, list(stride), list(padding),
                                         list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")
    keep = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    if cw.k is not None:
        n, _, h, w = y.shape
        y5 = y.view(n, groups, cg + 1, h, w) if y.is_contiguous() else y.unflatten(1, (groups, cg + 1))
        out = torch.empty((n, cout, h, w), memory_format=keep)
        corr = (cw.s * cw.k).view(1, groups, cg, 1, 1)
        torch.addcmul(y5[:, :, :cg], y5[:, :, cg:], corr, out=out.unflatten(1, (groups, cg)))
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
        y = out
    else:
        y = y.contiguous(memory_format=keep)
    return y


@int8_conv2d.register_fake
def _int8_conv2d_fake(x, weight, bias, u, s, zp, tw, kw, sw, stride, padding, dilation, groups, gbits):
    keep = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    shape = F.conv2d(x, weight, None, stride, padding, dilation, groups).shape
    return x.new_empty(shape).contiguous(memory_format=keep)


@torch.library.custom_op("fracpass::int8_conv2d_backward", mutates_args=())
def int8_conv2d_backward(grad: Tensor, u: Tensor, s: Tensor, zp: Tensor, tw: Tensor, kw: Optional[Tensor], sw: Tensor,
                         stride: List[int], padding: List[int], dilation: List[int], groups: int, gbits: int,
                         needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, dbias) of fracpass::int8_conv2d from dL/dy, empty where ``needs`` is False: dL/dy quantized as
    the gradient quantizer would (the same dither, keyed by memory index, in the incoming layout), then
    both products in float32 on the decoded codes."""
    ghat = quantize_grad_stochastic(grad, gbits) if gbits < FULL_PRECISION else grad
    ext = units.ext(u)
    if ext is not None and (u.is_contiguous() or u.is_contiguous(memory_format=torch.channels_last)):
        x_hat = ext.decode_u8(u, zp, s)
    else:
        x_hat = (u.float() - zp).mul_(s)
    w_hat = codes.Coded(tw.view(tw.shape[0], -1), kw, sw).decode(free=0).view(tw.shape)
    dx, dw, db = torch.ops.aten.convolution_backward(ghat, x_hat, w_hat, [w_hat.shape[0]] if needs[2] else None,
                                                     stride, padding, dilation, False, [0, 0], groups, needs)
    none = lambda v: grad.new_empty(0) if v is None else v  # a fresh one each: outputs never alias
    return none(dx), none(dw), none(db)


@int8_conv2d_backward.register_fake
def _int8_conv2d_backward_fake(grad, u, s, zp, tw, kw, sw, stride, padding, dilation, groups, gbits, needs):
    x_hat = torch.empty_strided(u.shape, u.stride(), dtype=torch.float32, device=u.device)
    w_hat = tw.new_empty(tw.shape, dtype=torch.float32)
    dx, dw, db = torch.ops.aten.convolution_backward(grad, x_hat, w_hat, [tw.shape[0]] if needs[2] else None, stride,
                                                     padding, dilation, False, [0, 0], groups, needs)
    none = lambda v: grad.new_empty(0) if v is None else v
    return none(dx), none(dw), none(db)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, u, s, zp, tw, kw, sw, stride, padding, dilation, groups, gbits = inputs
    ctx.save_for_backward(u, s, zp, tw, kw if kw is not None else sw.new_empty(0), sw)
    ctx.conv, ctx.has_bias = (stride, padding, dilation, groups, gbits), bias is not None


def _backward(ctx, grad):
    u, s, zp, tw, kw, sw = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), ctx.has_bias and bool(ctx.needs_input_grad[2])]
    dx, dw, db = int8_conv2d_backward(grad, u, s, zp, tw, kw if kw.numel() else None, sw, *ctx.conv, needs)
    picked = lambda v, need: v if need else None
    return (picked(dx, needs[0]), picked(dw, needs[1]), picked(db, needs[2])) + (None,) * 11


int8_conv2d.register_autograd(_backward, setup_context=_setup_context)


def native_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
                  aq: Optional[nn.Module], wq: Optional[nn.Module], gq: Optional[nn.Module], *,
                  site: Optional[NativeSite] = None) -> Tensor:
    """``gq(F.conv2d(aq(x), wq(weight), bias, ...))``, the forward on oneDNN's int8 convolution where the bits allow."""
    why = decide.decide(aq, wq, gq, device=x.device)[0] != "int8" or decide.conv_reason(x, weight, padding, aq, wq)
    if why:
        if why is not True:
            record(site, why)
        return quantized(gq, F.conv2d(quantized(aq, x), quantized(wq, weight), bias, stride, padding, dilation, groups))
    record(site, None)
    stride, padding, dilation = decide.tuple_arg(stride, 2), decide.tuple_arg(padding, 2), decide.tuple_arg(dilation, 2)
    with torch.no_grad():
        mn, mx = aq.qrange(x)  # tracked once: the fallback below reuses it
    if not bool(decide.finite_range(mn, mx)):  # a host read (CPU: a load)
        record(site, decide.NONFINITE)
        return quantized(gq, F.conv2d(aq.quantize(x, mn, mx), quantized(wq, weight), bias, stride, padding, dilation,
                                      groups))
    with torch.no_grad():
        scale, lo, _ = affine_params(mn, mx, float(2**aq.bits - 1))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            nhwc = x.detach().permute(0, 2, 3, 1)  # contiguous: codes in the same order, a channels-last view
            u = codes.encode_shifted(nhwc.reshape(-1, nhwc.shape[-1]), mn, mx, aq.bits).view(nhwc.shape).permute(0, 3, 1, 2)
        else:
            u = codes.encode_shifted(x.detach().contiguous().view(-1, x.shape[-1]), mn, mx, aq.bits).view(x.shape)
        cw = codes.encode(weight.detach().reshape(weight.shape[0], -1), *(m.reshape(-1, 1) for m in wq.qrange(weight)),
                     wq.bits)
        cw = cw._replace(t=cw.t.view(weight.shape))
    return int8_conv2d(x, weight, bias, u, scale, -lo, cw.t, cw.k, cw.s, list(stride), list(padding), list(dilation),
                       groups, decide.grad_bits(gq))
