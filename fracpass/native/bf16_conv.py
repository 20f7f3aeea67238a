"""Convolutions of every kind (1/2/3-D, grouped, depthwise, transposed) on bfloat16 codes: forward and
both gradient products, static and gated."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fracpass.gating import onehot_grad
from fracpass.quant import dense
from fracpass.native import codes, conv_offsets, conv_state, gated, int8_conv, options, units
from fracpass.native.conv_state import ConvState

def _widened_codes(state: ConvState, q: Tensor, batch_sum: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """saved_codes's input back: (the bfloat16 codes, exactly; if ``batch_sum``, their batch sum from
    the same pass where the codes were narrowed, else None)."""
    if state.code_offset is None:
        return q, None
    q, total = units.ext(q).u8_to_codes(q, state.code_offset, batch_sum)
    return q, total.as_strided((1,) + tuple(q.shape[1:]), q.stride()) if batch_sum else None


def conv_product(qa: Optional[Tensor], qw: Tensor, keep: Tensor, state: ConvState) -> Tensor:
    """The convolution's bfloat16 product v = conv(q_a, q_w): on bfloat16 codes, or (qa None) on int8 from
    the input's bytes ``keep`` = q_a - state.code_offset (int8_conv.int8_product). A non-finite input
    (state.finite False): q_a NaN everywhere, as the simulation's quantized input is."""
    if not state.has_codes():
        nan = torch.empty_like(keep, dtype=torch.bfloat16).fill_(float("nan"))
        return torch.ops.aten.convolution(nan, qw, None, *state.conv)
    if qa is None:
        return int8_conv.int8_product((keep, state.code_offset), qw, state.conv, state.split)
    return torch.ops.aten.convolution(qa, qw, None, *state.conv)


@torch.library.custom_op("fracpass::bf16_conv", mutates_args=())
def bf16_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], onehot: Optional[Tensor], qa: Optional[Tensor],
              sa: Tensor, qw: Tensor, sw: Tensor, keep: Tensor, code_offset: Optional[Tensor], int8_dx: bool,
              int8_dw: bool, split: float, stride: List[int], padding: List[int], dilation: List[int],
              transposed: bool, output_padding: List[int], groups: int, gbits: int, choice: Optional[Tensor],
              mn: Optional[Tensor], mx: Optional[Tensor], act_levels: Optional[Tensor], grad_levels: Optional[Tensor],
              one_group: bool, finite: Optional[Tensor], take_v: Optional[Tensor], take_s: Optional[Tensor],
              take_a: Optional[Tensor]) -> Tensor:
    """A convolution (any dim, grouped, transposed) on bfloat16 codes: forward y = s_a s_w conv(q_a, q_w)
    and, in backward (fracpass::bf16_conv_backward), dx = conv^T(ghat, w_hat) and dw = conv_w(ghat, x_hat)
    with ghat = s_g t + c.

    The codes are exact in bfloat16 and oneDNN accumulates in float32; what is lost is the rounding of
    each product's output to bfloat16 (unit roundoff u = 2^-8), before the scales are applied in float32.
    The gradient's offset c multiplies a float32 convolution of ones: over one sample for dx, over the
    batch sum of the input codes and one channel per group for dw (for a 2-D ungrouped convolution, the
    kernels' window sums: conv_offsets.ones_input_grad, conv_offsets.ones_weight_grad). When the weight's
    scale is per output channel it lies on dx's contracted axis, so dx's product takes the weight as
    bfloat16 values q_w s_w / max(s_w) (``folded_weight``: each rounded once, relative error <= u) and
    its offset term the float32 values: |dx - dx_exact| <= u |dx_exact| + u (1 + u) s_g conv^T(|t|, |w_hat|)
    beside float32 rounding (docs/native.md). dx runs in float32 on the decoded codes when the gradient
    has more than 8 bits. Saved for backward: the input codes ``keep`` (saved_codes: bytes q_a -
    ``code_offset``, or the bfloat16 codes), never the float operands. ``qa`` None: the forward's product
    runs on int8 from those bytes; ``int8_dx``, ``int8_dw``: the gradients' products too (int8_conv).
    ``finite``: whether the input's range is finite (ConvState.finite): if not, both passes compute what
    the simulation does on its quantized input, NaN everywhere.

    Gated (``choice`` given, then mn, mx, act_levels, grad_levels, one_group: gated.Gating's fields):
    s_a, s_g and c hold one value per sample, on the free axis of y and dx, so they scale those outputs
    per sample; dw contracts over the samples, so it runs once per option group (whose samples share
    their scales). The gate's gradient (``onehot``: the gate's one-hot choice, for the activation's
    options) needs the float input: it is saved then.

    ``take_*``: the placeholders (conv_bn.Handover.grad) of the fused op whose output is x and whose only
    reader this op is: where the input gradient runs on int8, backward returns its product as their
    gradients instead of dx. x, weight, bias, onehot and the placeholders are inputs for their gradients."""
    state = conv_state.unflat((code_offset, int8_dx, int8_dw, split, stride, padding, dilation, transposed,
                               output_padding, groups, gbits, choice, mn, mx, act_levels, grad_levels, one_group, finite))
    v = conv_product(qa, qw, keep, state)
    return codes.scale_out(v, out_channel_scale(sw, transposed, groups), bias, sa)


@bf16_conv.register_fake
def _bf16_conv_fake(x, weight, bias, onehot, qa, sa, qw, sw, keep, code_offset, int8_dx, int8_dw, split, stride,
                    padding, dilation, transposed, output_padding, groups, gbits, choice, mn, mx, act_levels,
                    grad_levels, one_group, finite, take_v, take_s, take_a):
    return torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, transposed, output_padding, groups)


@torch.library.custom_op("fracpass::bf16_conv_backward", mutates_args=())
def bf16_conv_backward(grad: Tensor, keep: Tensor, sa: Tensor, qw: Tensor, sw: Tensor, x: Optional[Tensor],
                       onehot: Optional[Tensor],
                       code_offset: Optional[Tensor], int8_dx: bool, int8_dw: bool, split: float, stride: List[int],
                       padding: List[int], dilation: List[int], transposed: bool, output_padding: List[int],
                       groups: int, gbits: int, choice: Optional[Tensor], mn: Optional[Tensor], mx: Optional[Tensor],
                       act_levels: Optional[Tensor], grad_levels: Optional[Tensor], one_group: bool,
                       finite: Optional[Tensor], needs: List[bool], hand_shape: List[int], hand_stride: List[int],
                       seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw, dbias, d_onehot, and the three placeholders' gradients) of fracpass::bf16_conv from dL/dy;
    empty where ``needs`` (x, weight, bias, the gate's one-hot choice) is False. ``x`` and ``onehot``: the
    forward's, for the gate's gradient (else None). ``hand_shape`` and ``hand_stride`` (x's; empty lists:
    none): where the input gradient's int8 product is handed to the fused op before (int8_conv.takes), dx
    is empty and the placeholders' gradients hold it (int8_conv.Handed), else they are empty. The gradient
    is quantized as the simulation's gradient quantizer would, with the noise of ``seed`` (grad_seed) where
    it is rounded per tensor; a gated one's rows draw theirs as the gated quantizer does."""
    need_x, need_w, need_b, need_gate = needs
    state = conv_state.unflat((code_offset, int8_dx, int8_dw, split, stride, padding, dilation, transposed,
                               output_padding, groups, gbits, choice, mn, mx, act_levels, grad_levels, one_group, finite),
                              need_b, need_gate, hand_shape, hand_stride)
    saved = [keep, sa, qw, sw] + ([x, onehot] if need_gate else [])
    dx, dw, db, d_onehot = conv_backward(state, (need_x, need_w, need_b), saved, grad, seed=seed)
    dx, handed = int8_conv.split_handed(dx)
    none = lambda v: grad.new_empty(0) if v is None else v  # a fresh one each: outputs never alias
    return (none(dx), none(dw), none(db), none(d_onehot)) + tuple(none(h) for h in handed)


@bf16_conv_backward.register_fake
def _bf16_conv_backward_fake(grad, keep, sa, qw, sw, x, onehot, code_offset, int8_dx, int8_dw, split, stride, padding,
                             dilation, transposed, output_padding, groups, gbits, choice, mn, mx, act_levels,
                             grad_levels, one_group, finite, needs, hand_shape, hand_stride, seed):
    if hand_shape:
        raise NotImplementedError(
            "fracpass::bf16_conv_backward hands its input gradient to a fused op only in eager execution (whether "
            "it does is decided from values); under tracing, call fracpass::bf16_conv without take_*")
    need_x, need_w, need_b, need_gate = needs
    x_like = torch.empty_strided(keep.shape, keep.stride(), dtype=torch.float32, device=keep.device)
    dx, dw, _ = torch.ops.aten.convolution_backward(grad, x_like, qw.new_empty(qw.shape, dtype=torch.float32), None,
                                                    stride, padding, dilation, transposed, output_padding, groups,
                                                    [need_x, need_w, False])
    none = lambda v: grad.new_empty(0) if v is None else v
    return (none(dx), none(dw), grad.new_empty((grad.shape[1],) if need_b else (0,)),
            grad.new_empty(onehot.shape if need_gate else (0,)), grad.new_empty(0), grad.new_empty(0),
            grad.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, onehot, qa, sa, qw, sw, keep, *args = inputs
    args, take_v = args[:conv_state.FLAT], args[conv_state.FLAT]
    ctx.gate_grad = onehot is not None and onehot.requires_grad
    conv_state.save_flat(ctx, args, keep, sa, qw, sw, x if ctx.gate_grad else None, onehot if ctx.gate_grad else None)
    ctx.has_bias = bias is not None
    ctx.hand = (list(take_v.shape), list(x.stride())) if take_v is not None else ([], [])


def _backward(ctx, grad):
    args, (keep, sa, qw, sw, x, onehot) = conv_state.saved_flat(ctx)
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
             ctx.has_bias and bool(ctx.needs_input_grad[2]), ctx.gate_grad]
    dx, dw, db, d_onehot, hv, hs, ha = bf16_conv_backward(grad, keep, sa, qw, sw, x, onehot, *args, needs, *ctx.hand,
                                                          conv_state.grad_seed(args))
    return conv_state.dense_grads(needs, (dx, dw, db, d_onehot), (hv, hs, ha), bool(ctx.hand[0]))


bf16_conv.register_autograd(_backward, setup_context=_setup_context)


def apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], onehot: Optional[Tensor], qa: Optional[Tensor],
          sa: Tensor, qw: Tensor, sw: Tensor, keep: Tensor, state: ConvState, take=(None, None, None)) -> Tensor:
    """fracpass::bf16_conv on a native call's operands (``keep``, ``state``: conv_state.operands())."""
    return bf16_conv(x, weight, bias, onehot, qa, sa, qw, sw, keep, *conv_state.flat(state), *take)


def conv_backward(state: ConvState, needs: Tuple[bool, bool, bool], saved, grad, grad_minmax=None,
                  seed: Optional[Tensor] = None) -> tuple:
    """A bf16 convolution's backward from dL/dy: (dx, dw, db, d_onehot), None where not needed (``needs``:
    x, weight, bias); dx a Handed where ``state.hand`` (the shape and strides of the fused output x, from
    the forward) takes it; ``grad_minmax``: dL/dy's min and max, when already known (the fused
    BatchNorm's backward computes them with dL/dy). ``saved``: the input codes (saved_codes), s_a, q_w,
    s_w, then x and the one-hot choice where the gate's gradient is needed. ``seed``: the stochastic
    rounding's of a gradient rounded per tensor (grad_seed), else the rounding draws one."""
    qa, sa, qw, sw = saved[:4]
    stride, padding, dilation, transposed, output_padding, groups = state.conv
    args = (stride, padding, dilation, transposed, output_padding, groups)
    gating: Optional[gated.Gating] = state.gating
    grad = dense(grad)  # the layout the simulation's gradient quantizers read, in memory order: once
    need_x = needs[0] or state.gate_grad  # the gate's gradient is computed from dx
    need_w, need_b = needs[1], state.has_bias and needs[2]
    mn, mx, levels = codes.grad_range(grad, state.gbits, gating, grad_minmax)
    dx = dw = db = None
    if gating is None:  # one level count, 2^gbits - 1: exact in bfloat16 at 2..8 bits (no tensor ops, no syncs)
        exact = None if levels is None or not 2 <= state.gbits <= options.MAX_INT8_BITS else True
    else:
        exact = codes.exact_codes(levels)
    finite = state.has_codes()
    if not finite or exact is None or (exact is not True and not bool(exact.any())):
        # the gradient's codes would not be exact in bfloat16 (or it is not quantized), or the input had no
        # codes (the simulation's quantized input is NaN everywhere then): float32 products
        ghat = codes.simulated_grad(grad, mn, mx, levels, state.gbits, seed)
        if not finite:
            x_hat = torch.empty_like(qa, dtype=torch.float32).fill_(float("nan"))
        else:
            qa, _ = _widened_codes(state, qa)
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
        int8_dx, int8_dw = need_x and state.int8[0] and wide is None, need_w and state.int8[1] and wide is None
        ghat, t, sg, c, kept_g = codes.bf16_grad_codes(grad, mn, mx, levels, state.gbits, values=wide is not None,
                                                  bytes=int8_dx or int8_dw, seed=seed)
        int8_dx, int8_dw = int8_dx and kept_g is not None, int8_dw and kept_g is not None
        if kept_g is not None:  # the codes keep the gradient's layout; both int8 products read them channels-last
            kept_g = (kept_g[0].contiguous(memory_format=torch.channels_last), kept_g[1])
        u_a = qa
        if int8_dw:  # the bfloat16 input codes are not needed: no widening pass
            qa, total = codes.shape_only(qa, torch.bfloat16), None
        else:  # with the batch sum dw's offset correction needs (conv_offsets.ones_weight_grad)
            qa, total = _widened_codes(state, qa, batch_sum=need_w and gating is None)
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
                dx = int8_conv.int8_input_grad(kept_g, qw, state.conv, state.split, (sg * sw, corr.mul_(c * sw)),
                                               state.hand)
            else:
                dx = codes.scale_out(vx, sg * sx, None, addend=corr.mul_(c * sx))
            if wide is not None:  # conv^T keeps samples apart: the wide samples' rows again, in float32
                w_hat = _weight_values(qw, sw, transposed)
                rows = torch.ops.aten.convolution_backward(codes.take_samples(ghat, wide), codes.shape_only(qa[:wide.numel()]), w_hat,
                                                           None, *args, [True, False, False])[0]
                dx.index_copy_(0, wide, rows)
        if int8_dw:
            dw = int8_conv.int8_weight_grad(kept_g, u_a, state.code_offset, qw, state.conv, sa * sg, c * sa)
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
    if state.gate_grad:
        x, onehot = saved[4:6]
        d_onehot = onehot_grad(x, gating.mn, gating.mx, gating.act_levels, onehot, dx)
    if not needs[0]:
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
