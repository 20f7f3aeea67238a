"""Convolutions of every kind (1/2/3-D, grouped, depthwise, transposed) on bfloat16 codes: forward and
both gradient products, static and gated."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fracpass.gating import onehot_grad
from fracpass.quant import value_range, dense, rows_outer_dense
from fracpass.native import codes, conv_offsets, gated, int8_conv, options, units

class Bf16Conv(torch.autograd.Function):
    """A convolution (any dim, grouped, transposed) on bfloat16 codes: forward y = s_a s_w conv(q_a, q_w)
    and, in backward, dx = conv^T(ghat, w_hat) and dw = conv_w(ghat, x_hat) with ghat = s_g t + c.

    The codes are exact in bfloat16 and oneDNN accumulates in float32; what is lost is the rounding of
    each product's output to bfloat16 (unit roundoff u = 2^-8), before the scales are applied in float32.
    The gradient's offset c multiplies a float32 convolution of ones: over one sample for dx, over the
    batch sum of the input codes and one channel per group for dw (for a 2-D ungrouped convolution, the
    kernels' window sums: conv_offsets.ones_input_grad, conv_offsets.ones_weight_grad). When the weight's
    scale is per output channel it lies on dx's contracted axis, so dx's product takes the weight as
    bfloat16 values q_w s_w / max(s_w) (``folded_weight``: each rounded once, relative error <= u) and
    its offset term the float32 values: |dx - dx_exact| <= u |dx_exact| + u (1 + u) s_g conv^T(|t|, |w_hat|)
    beside float32 rounding (docs/native.md). dx runs in float32 on the decoded codes when the gradient
    has more than 8 bits. Saved for backward: the bfloat16 codes, never the float operands.

    Gated (``gating``): s_a, s_g and c hold one value per sample, on the free axis of y and dx, so they
    scale those outputs per sample; dw contracts over the samples, so it runs once per option group
    (whose samples share their scales). The gate's gradient needs the float input: it is saved then."""

    @staticmethod
    def forward(ctx, x, weight, bias, onehot, qa, sa, qw, sw, conv, gbits, gating, kept=None, take_v=None,
                take_s=None, take_a=None):  # type: ignore[override]
        """``take_*``: the placeholders (conv_bn.Handover.grad) of the fused op whose output is x and
        whose only reader this op is: where the input gradient runs on int8, backward returns its
        product as their gradients instead of dx."""
        y, _, saved = conv_forward(ctx, x, bias, onehot, qa, sa, qw, sw, conv, gbits, gating, kept, take_v)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        dx, dw, db, d_onehot = conv_backward(ctx, ctx.saved_tensors, grad)
        dx, handed = int8_conv.split_handed(dx)
        return (dx, dw, db, d_onehot) + (None,) * 8 + handed


def conv_forward(ctx, x, bias, onehot, qa, sa, qw, sw, conv, gbits, gating, kept, take_v=None, scaled=True):
    """Bf16Conv's forward: (y, or None unless ``scaled``, its bfloat16 product v, the tensors to save);
    sets ctx's attributes. ``kept``: qa as bytes and their offset (codes.bf16_input_codes), or None; qa None:
    the product runs on int8 from those bytes (int8_conv.int8_product). ``take_v``: the placeholder shaped
    as x of the fused op that wrote x, when the input gradient may go to it (ctx.hand: x's shape and
    strides, which the handed product must have)."""
    stride, padding, dilation, transposed, output_padding, groups = conv
    if qa is None:
        v = int8_conv.int8_product(kept, qw, conv, kept.split)
    else:
        v = torch.ops.aten.convolution(qa, qw, None, stride, padding, dilation, transposed, output_padding, groups)
    y = codes.scale_out(v, out_channel_scale(sw, transposed, groups), bias, sa) if scaled else None
    ctx.gate_grad = onehot is not None and ctx.needs_input_grad[3]
    ctx.int8 = (kept.int8_dx, kept.int8_dw) if kept is not None else (False, False)
    ctx.split = kept.split if kept is not None else 0.0
    ctx.hand = None if take_v is None else (take_v.shape, x.stride())
    keep = (x.detach(), onehot) if ctx.gate_grad else ()
    ctx.conv, ctx.gbits, ctx.gating, ctx.has_bias = conv, gbits, gating, bias is not None
    return y, v, [_narrow_codes(ctx, qa, kept), sa, qw, sw, *keep]


def _narrow_codes(ctx, q: Tensor, kept: Optional[tuple] = None) -> Tensor:
    """The input codes to keep for backward: as bytes q - offset (ctx.code_offset) when they span at most
    256 values, as a per-tensor quantizer's codes always do (a gated op's rows may not), in one byte per
    element instead of bfloat16's two; else q itself (ctx.code_offset None). ``kept``: those bytes and
    their offset, already made by the encoding kernel (no pass over q here)."""
    if kept is not None:
        ctx.code_offset = kept[1]
        return kept[0]
    ctx.code_offset = None
    ext = units.ext(q)
    if ext is None or q.numel() == 0 or not rows_outer_dense(q):
        return q
    lo, hi = (float(m) for m in value_range(q))
    if hi - lo > 255:
        return q
    ctx.code_offset = lo
    return ext.codes_to_u8(q, lo)


def _widened_codes(ctx, q: Tensor, batch_sum: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """_narrow_codes's input back: (the bfloat16 codes, exactly; if ``batch_sum``, their _batch_sum from
    the same pass where the codes were narrowed, else None)."""
    if ctx.code_offset is None:
        return q, None
    q, total = units.ext(q).u8_to_codes(q, ctx.code_offset, batch_sum)
    return q, total.as_strided((1,) + tuple(q.shape[1:]), q.stride()) if batch_sum else None


def conv_backward(ctx, saved, grad, grad_minmax=None) -> tuple:
    """Bf16Conv's backward from dL/dy: (dx, dw, db, d_onehot), dx a Handed where ``ctx.hand`` (the
    shape and strides of the fused output x, from the forward) takes it; ``grad_minmax``: dL/dy's min
    and max, when already known (the fused BatchNorm's backward computes them with dL/dy)."""
    qa, sa, qw, sw = saved[:4]
    stride, padding, dilation, transposed, output_padding, groups = ctx.conv
    args = (stride, padding, dilation, transposed, output_padding, groups)
    gating: Optional[gated.Gating] = ctx.gating
    grad = dense(grad)  # the layout the simulation's gradient quantizers read, in memory order: once
    need_x = ctx.needs_input_grad[0] or ctx.gate_grad  # the gate's gradient is computed from dx
    need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    mn, mx, levels = codes.grad_range(grad, ctx.gbits, gating, grad_minmax)
    dx = dw = db = None
    if gating is None:  # one level count, 2^gbits - 1: exact in bfloat16 at 2..8 bits (no tensor ops, no syncs)
        exact = None if levels is None or not 2 <= ctx.gbits <= options.MAX_INT8_BITS else True
    else:
        exact = codes.exact_codes(levels)
    if exact is None or (exact is not True and not bool(exact.any())):
        # the gradient's codes would not be exact in bfloat16 (or it is not quantized): float32 products
        qa, _ = _widened_codes(ctx, qa)
        ghat = codes.simulated_grad(grad, mn, mx, levels, ctx.gbits)
        x_hat = qa.float().mul_(codes.per_row_view(sa, qa)) if need_w else codes.shape_only(qa)
        w_hat = _weight_values(qw, sw, transposed)
        dx, dw, db = torch.ops.aten.convolution_backward(ghat, x_hat, w_hat, [ghat.shape[1]] if need_b else None,
                                                         *args, [need_x, need_w, need_b])
    else:
        # gated, some samples' gradient options above 8 bits ("wide"): their codes are not exact in
        # bfloat16, so their rows of dx and their groups of dw run in float32 on ghat
        wide = None if exact is True or bool(exact.all()) else (~exact).nonzero().view(-1)
        folded = need_x and sw.numel() > 1  # per-channel weight scale: dx's product on folded bf16 weights
        qw_x, sx = folded_weight(qw, sw, transposed) if folded else (qw, sw)
        # dx's product on oneDNN's int8 convolution, dw's on the VNNI kernel (decided in the forward:
        # int8_conv.int8_reasons), both from the gradient codes' bytes
        int8_dx, int8_dw = need_x and ctx.int8[0] and wide is None, need_w and ctx.int8[1] and wide is None
        ghat, t, sg, c, kept_g = codes.bf16_grad_codes(grad, mn, mx, levels, ctx.gbits, values=wide is not None,
                                                  bytes=int8_dx or int8_dw)
        int8_dx, int8_dw = int8_dx and kept_g is not None, int8_dw and kept_g is not None
        if kept_g is not None:  # the codes keep the gradient's layout; both int8 products read them channels-last
            kept_g = (kept_g[0].contiguous(memory_format=torch.channels_last), kept_g[1])
        u_a = qa
        if int8_dw:  # the bfloat16 input codes are not needed: no widening pass
            qa, total = codes.shape_only(qa, torch.bfloat16), None
        else:  # with the batch sum dw's offset correction needs (conv_offsets.ones_weight_grad)
            qa, total = _widened_codes(ctx, qa, batch_sum=need_w and gating is None)
        if gating is not None and gating.one_group:  # one option group: one s_g and c (dx and dw in one call)
            sg, c = sg[:1], c[:1]
        per_sample = sa.numel() > 1 or sg.numel() > 1
        mask = [need_x and not int8_dx, need_w and not per_sample and not int8_dw, False]
        # dw's product reads the weight's shape only, so one call serves dx's folded weight too
        vx, vw, _ = torch.ops.aten.convolution_backward(t, qa, qw_x, None, *args, mask) if any(mask) else (None,) * 3
        if need_x:  # dx = s_g s_x conv^T(t, q_x) + c s_x conv^T(1, q_x); the second the same for every sample
            corr = (conv_offsets.ones_input_grad(t, qa, qw, args) if not folded
                    else _ones_input_grad_f32(t, qa, qw, sw / sx, args, transposed))
            if sg.numel() > 1:
                dx = codes.scale_out(vx, sx, None, sg).addcmul_(codes.per_row_view(c, vx), corr.mul_(sx))
            elif int8_dx:  # (never gated, never folded: int8_conv.int8_reasons)
                dx = int8_conv.int8_input_grad(kept_g, qw, ctx.conv, ctx.split, (sg * sw, corr.mul_(c * sw)), ctx.hand)
            else:
                dx = codes.scale_out(vx, sg * sx, None, addend=corr.mul_(c * sx))
            if wide is not None:  # conv^T keeps samples apart: the wide samples' rows again, in float32
                w_hat = _weight_values(qw, sw, transposed)
                rows = torch.ops.aten.convolution_backward(codes.take_samples(ghat, wide), codes.shape_only(qa[:wide.numel()]), w_hat,
                                                           None, *args, [True, False, False])[0]
                dx.index_copy_(0, wide, rows)
        if int8_dw:
            dw = int8_conv.int8_weight_grad(kept_g, u_a, ctx.code_offset, qw, ctx.conv, sa * sg, c * sa)
        elif need_w and not per_sample:
            # dw = s_a s_g conv_w(t, q_a) + c s_a conv_w(1, q_a), the second the same for each output channel of a group
            dw = codes.scale_out(vw, sa * sg, None).add_(conv_offsets.ones_weight_grad(t, qa, qw, args, c * sa, total))
        elif need_w:
            dw = _grouped_weight_grad(t, qa, qw, args, sa, sg, c, gating.choice, ghat, exact)
        if need_b:
            dims = [0] + list(range(2, t.dim()))
            if ghat is not None:
                db = ghat.sum(dims)
            elif sg.numel() > 1:  # sum over samples of s_g t + c
                per = t.sum(dims[1:], dtype=torch.float32) if t.dim() > 2 else t.float()
                db = (per * sg.view(-1, 1)).sum(0).add_(c.sum() * (t.numel() // (t.shape[0] * t.shape[1])))
            else:
                db = t.sum(dims, dtype=torch.float32).mul_(sg).add_(c * (t.numel() // t.shape[1]))
    d_onehot = None
    if ctx.gate_grad:
        x, onehot = saved[4:6]
        d_onehot = onehot_grad(x, gating.mn, gating.mx, gating.act_levels, onehot, dx)
    if not ctx.needs_input_grad[0]:
        dx = None
    return dx, dw, db, d_onehot


def _grouped_weight_grad(t: Tensor, qa: Tensor, qw: Tensor, args, sa: Tensor, sg: Tensor, c: Tensor,
                         choice: Tensor, ghat: Optional[Tensor], exact: Tensor) -> Tensor:
    """dw of a gated convolution: the samples' scales lie on its contracted (batch) axis, so one bf16
    product per option group, whose samples share s_a, s_g and c (their group's range); a group whose
    gradient codes are not exact in bfloat16 (``exact`` False: above 8 bits) runs in float32 on ghat."""
    dw = None
    for idx, first, whole in gated.option_groups(choice):
        s_a = gated.group_value(sa, first)
        qa_k = qa if whole else codes.take_samples(qa, idx)
        if not bool(exact[first]):
            x_hat = qa_k.float().mul_(s_a)
            probe = torch.empty_like(qw, dtype=torch.float32)
            g_k = ghat if whole else codes.take_samples(ghat, idx)
            part = torch.ops.aten.convolution_backward(g_k, x_hat, probe, None, *args, [False, True, False])[1]
        else:
            s_g, c_k = gated.group_value(sg, first), gated.group_value(c, first)
            t_k = t if whole else codes.take_samples(t, idx)
            vw = torch.ops.aten.convolution_backward(t_k, qa_k, qw, None, *args, [False, True, False])[1]
            part = codes.scale_out(vw, s_a * s_g, None).add_(conv_offsets.ones_weight_grad(t_k, qa_k, qw, args, c_k * s_a))
        dw = part if dw is None else dw.add_(part)
    return dw


def folded_weight(qw: Tensor, sw: Tensor, transposed: bool) -> Tuple[Tensor, Tensor]:
    """(q_w s_w / s as bfloat16, s = max(s_w)) for a per-output-channel weight scale s_w, which lies on the
    contracted axis of dx's product: the scale folded into the weight's values, each rounded once to
    bfloat16 (relative error <= 2^-8), so that product runs on bfloat16 with one scale s on its output."""
    s = sw.max().reshape(1)
    return _weight_values(qw, sw / s, transposed).to(torch.bfloat16), s


def _ones_input_grad_f32(t: Tensor, qa: Tensor, qw: Tensor, ratio: Tensor, args, transposed: bool) -> Tensor:
    """conv^T(1, q_w ratio) over one sample in float32: dx's offset correction for a folded weight
    (``ratio`` = s_w / max(s_w)), from the float32 weight values, not their bfloat16 rounding."""
    ones = t.new_ones((1,) + tuple(t.shape[1:]), dtype=torch.float32)
    probe = codes.shape_only(qa[:1], torch.float32)
    return torch.ops.aten.convolution_backward(ones, probe, _weight_values(qw, ratio, transposed), None, *args,
                                               [True, False, False])[0]


def _weight_values(qw: Tensor, sw: Tensor, transposed: bool) -> Tensor:
    shape = [1] * qw.dim()
    shape[1 if transposed else 0] = -1
    return qw.float().mul_(sw.view(shape) if sw.numel() > 1 else sw)


def out_channel_scale(sw: Tensor, transposed: bool, groups: int) -> Tensor:
    """The weight's scale per output channel of the convolution (a transposed weight's axis 1 holds the
    output channels of one group, repeated across groups)."""
    return sw.repeat(groups) if transposed and groups > 1 and sw.numel() > 1 else sw
