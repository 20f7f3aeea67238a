"""A bf16 convolution with the BatchNorm (residual add, ReLU) after it as one op that keeps less for
backward (fracpass::bf16_conv_bn), its BatchNorm on the CPU kernels where they apply, and what it hands the
convolution that reads its output (Handover)."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from fracpass.quant import memory_order, rows_outer_dense
from fracpass.native import bf16_conv, codes, conv_state, int8_conv, units

def bn_route(out: Tensor, sa: Tensor, residual: Optional[Tensor], fast_bn: bool) -> str:
    """Which kernels the fused op ran its BatchNorm on (``out`` has the convolution product's layout)."""
    why = _fast_bn_reason(out, sa, residual, fast_bn)
    return "BatchNorm fused, on the CPU kernels" if why is None else f"BatchNorm fused, on aten's kernels ({why})"


_Ten = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_Thirteen = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("fracpass::bf16_conv_bn", mutates_args=())
def bf16_conv_bn(x: Tensor, weight: Tensor, bias: Optional[Tensor], onehot: Optional[Tensor], qa: Optional[Tensor],
                 sa: Tensor, qw: Tensor, sw: Tensor, keep: Tensor, code_offset: Optional[Tensor], int8_dx: bool,
                 int8_dw: bool, split: float, stride: List[int], padding: List[int], dilation: List[int],
                 transposed: bool, output_padding: List[int], groups: int, gbits: int, choice: Optional[Tensor],
                 mn: Optional[Tensor], mx: Optional[Tensor], act_levels: Optional[Tensor],
                 grad_levels: Optional[Tensor], one_group: bool, finite: Optional[Tensor], bn_w: Optional[Tensor],
                 bn_b: Optional[Tensor],
                 residual: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 training: bool, momentum: float, eps: float, relu: bool, give: bool, fast_bn: bool,
                 take_v: Optional[Tensor], take_s: Optional[Tensor], take_a: Optional[Tensor]) -> _Thirteen:
    """fracpass::bf16_conv followed by BatchNorm (training or eval), optionally a residual add and a ReLU,
    as one op that keeps less for backward: the convolution's
    bfloat16 product v instead of BatchNorm's float32 input y = s v + bias, and a mask of where the ReLU's
    output is <= 0 (what threshold_backward reads; a bit per element from the kernels, else a bool)
    instead of its float32 output. Per element of the convolution's output, 2 bytes and a bit instead of 8.

    Two routes for the BatchNorm: on a channels-last v with one input scale for the batch, the CPU
    kernels (``fast_bn``; _fast_bn_forward / _fast_bn_backward): v is read instead of a float32 y
    written and read again, and the ReLU, the residual and the gradient's range ride in the same
    passes; equal to aten's BatchNorm to float32 rounding (tests/native/test_conv_bn.py). Otherwise aten's
    kernels on y, which the backward recomputes from v by the call that made it: bit for bit the unfused
    ops (tests/native/test_fuse_native_bn.py).

    The arguments up to ``finite`` are fracpass::bf16_conv's. Returns [out, out's min, out's max,
    Handover.grad's three placeholders, then what backward reads: v, the ReLU's mask, ref, mean, invstd, and
    the running mean and variance after this batch (a functional op: apply() copies them into the module's)):
    the range where the BatchNorm ran on the CPU kernels, the placeholders where ``give`` (out's only reader
    is a 2-D convolution that may hand its input gradient over) and the kernels ran, each empty otherwise
    (so are the mask without a ReLU and ref on aten's route). ``take_*``: the placeholders of the fused op
    whose output is x, when this op is that reader (int8_dx: its backward returns the product as their
    gradients)."""
    state = conv_state.unflat((code_offset, int8_dx, int8_dw, split, stride, padding, dilation, transposed,
                              output_padding, groups, gbits, choice, mn, mx, act_levels, grad_levels, one_group, finite))
    v = bf16_conv.conv_product(qa, qw, keep, state)
    return _bn_forward(v, sa, sw, bias, bn_w, bn_b, residual, (running_mean, running_var, training, momentum, eps, relu),
                       transposed, groups, give, fast_bn)


@bf16_conv_bn.register_fake
def _bf16_conv_bn_fake(x, weight, bias, onehot, qa, sa, qw, sw, keep, code_offset, int8_dx, int8_dw, split, stride,
                       padding, dilation, transposed, output_padding, groups, gbits, choice, mn, mx, act_levels,
                       grad_levels, one_group, finite, bn_w, bn_b, residual, running_mean, running_var, training,
                       momentum, eps, relu, give, fast_bn, take_v, take_s, take_a):
    v = torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, transposed, output_padding, groups)
    return _bn_forward(torch.empty_like(v, dtype=torch.bfloat16), sa, sw, bias, bn_w, bn_b, residual,
                       (running_mean, running_var, training, momentum, eps, relu), transposed, groups, give, fast_bn)


def _bn_forward(v: Tensor, sa: Tensor, sw: Tensor, bias, bn_w, bn_b, residual, post: tuple, transposed: bool,
                groups: int, give: bool, fast_bn: bool) -> _Thirteen:
    """bf16_conv_bn's work after the product v (its outputs)."""
    running_mean, running_var, training, momentum, eps, relu = post
    running_mean, running_var = (None if t is None else t.clone() for t in (running_mean, running_var))
    post = (running_mean, running_var, training, momentum, eps, relu)
    if training and v.numel() == v.shape[1]:  # F.batch_norm's check (aten would divide by n - 1 = 0)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {v.size()}")
    scale = bf16_conv.out_channel_scale(sw, transposed, groups)
    empty = lambda: v.new_empty(0, dtype=torch.float32)  # a fresh one each: outputs never alias
    if _fast_bn_reason(v, sa, residual, fast_bn) is None:
        out, dead, ref, mean, invstd, (mn, mx) = _fast_bn_forward(units.ext(v), v, scale * sa, bias, bn_w, bn_b,
                                                                  residual, post)
        placeholders = _placeholders(out) if give and residual is None else (empty(), empty(), empty())
    else:
        y = codes.scale_out(v, scale, bias, sa)
        out, mean, invstd = torch.ops.aten.native_batch_norm(y, bn_w, bn_b, running_mean, running_var, training,
                                                             momentum, eps)
        del y
        if residual is not None:
            out = out.add_(residual)
        dead = _relu_mask_(out) if relu else None
        mn, mx, ref, placeholders = empty(), empty(), empty(), (empty(), empty(), empty())
    return (out, mn, mx, *placeholders, v, empty() if dead is None else dead, ref, mean, invstd,
            empty() if running_mean is None else running_mean, empty() if running_var is None else running_var)


@torch.library.custom_op("fracpass::bf16_conv_bn_backward", mutates_args=())
def bf16_conv_bn_backward(grad: Optional[Tensor], handed_v: Optional[Tensor], handed_scale: Optional[Tensor],
                          handed_addend: Optional[Tensor], keep: Tensor, sa: Tensor, qw: Tensor, sw: Tensor,
                          x: Optional[Tensor], onehot: Optional[Tensor], code_offset: Optional[Tensor], int8_dx: bool,
                          int8_dw: bool, split: float, stride: List[int], padding: List[int], dilation: List[int],
                          transposed: bool, output_padding: List[int], groups: int, gbits: int,
                          choice: Optional[Tensor], mn: Optional[Tensor], mx: Optional[Tensor],
                          act_levels: Optional[Tensor], grad_levels: Optional[Tensor], one_group: bool,
                          finite: Optional[Tensor], v: Tensor,
                          bias: Optional[Tensor], bn_w: Optional[Tensor], dead: Optional[Tensor], ref: Optional[Tensor],
                          mean: Tensor, invstd: Tensor, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], training: bool, eps: float, has_residual: bool,
                          out_stride: List[int], needs: List[bool], hand_shape: List[int], hand_stride: List[int],
                          seed: Optional[Tensor]) -> _Ten:
    """(dx, dw, dbias, d_onehot, d_bn_w, d_bn_b, d_residual, and the three placeholders' gradients) of
    fracpass::bf16_conv_bn from dL/dout, or (``handed_*``) from the next convolution's handed-over product,
    scale and addend; ``grad`` None with none handed: out reached no loss. Empty where ``needs`` (x, weight,
    bias, onehot, bn_w, bn_b, residual) is False, and d_residual empty where it is dL/dout itself. ``ref``
    given: the BatchNorm ran on the CPU kernels. The rest (``seed`` too) as fracpass::bf16_conv_backward's."""
    need_x, need_w, need_b, need_gate, need_bn_w, need_bn_b, need_res = needs
    if handed_v is not None and handed_v.numel() == 0:  # the placeholders' empty stand-ins: nothing handed
        handed_v = handed_scale = handed_addend = None
    state = conv_state.unflat((code_offset, int8_dx, int8_dw, split, stride, padding, dilation, transposed,
                              output_padding, groups, gbits, choice, mn, mx, act_levels, grad_levels, one_group, finite),
                             need_b, need_gate, hand_shape, hand_stride)
    scale = bf16_conv.out_channel_scale(sw, transposed, groups)
    minmax = None
    if handed_v is None and grad is None:  # out's gradient is zero (it reached no loss)
        grad = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    incoming = grad
    if ref is not None:
        if handed_v is not None:  # the next convolution's product and epilogue, not a float32 gradient
            grad, grad_scale = handed_v, handed_scale
            grad_addend = codes.NONE_F if handed_addend is None else handed_addend
        else:
            grad_scale = grad_addend = codes.NONE_F
            if grad.stride() != v.stride():
                grad = torch.empty_like(v, dtype=torch.float32).copy_(grad)
        dy, minmax, grad, d_bn_w, d_bn_b = _fast_bn_backward(units.ext(v), grad, dead, v, ref, scale * sa, bias, bn_w,
                                                             mean, invstd, training, has_residual, grad_scale,
                                                             grad_addend)
    else:
        if dead is not None:
            grad = _relu_grad(grad, dead, tuple(out_stride))
        y = codes.scale_out(v, scale, bias, sa)  # forward's call: the same y
        dy, d_bn_w, d_bn_b = torch.ops.aten.native_batch_norm_backward(
            grad, y, bn_w, running_mean, running_var, mean, invstd, training, eps, [True, need_bn_w, need_bn_b])
        del y
    saved = [keep, sa, qw, sw] + ([x, onehot] if need_gate else [])
    dx, dw, db, d_onehot = bf16_conv.conv_backward(state, (need_x, need_w, need_b), saved, dy, minmax, seed)
    dx, handed = int8_conv.split_handed(dx)
    d_residual = grad if has_residual and need_res and grad is not incoming else None
    none = lambda t: v.new_empty(0, dtype=torch.float32) if t is None else t
    return tuple(none(t) for t in (dx, dw, db, d_onehot, d_bn_w if need_bn_w else None, d_bn_b if need_bn_b else None,
                                   d_residual, *handed))


@bf16_conv_bn_backward.register_fake
def _bf16_conv_bn_backward_fake(grad, handed_v, handed_scale, handed_addend, keep, sa, qw, sw, x, onehot, code_offset,
                                int8_dx, int8_dw, split, stride, padding, dilation, transposed, output_padding, groups,
                                gbits, choice, mn, mx, act_levels, grad_levels, one_group, finite, v, bias, bn_w, dead,
                                ref, mean, invstd, running_mean, running_var, training, eps, has_residual, out_stride,
                                needs, hand_shape, hand_stride, seed):
    if hand_shape or (handed_v is not None and handed_v.numel() != 0):
        raise NotImplementedError(
            "fracpass::bf16_conv_bn_backward hands gradients between fused ops only in eager execution (whether it "
            "does is decided from values); under tracing, call fracpass::bf16_conv_bn without give or take_*")
    need_x, need_w, need_b, need_gate, need_bn_w, need_bn_b, need_res = needs
    conv = bf16_conv._bf16_conv_backward_fake(v.new_empty(v.shape, dtype=torch.float32), keep, sa, qw, sw, x, onehot,
                                              code_offset, int8_dx, int8_dw, split, stride, padding, dilation,
                                              transposed, output_padding, groups, gbits, choice, mn, mx, act_levels,
                                              grad_levels, one_group, finite, [need_x, need_w, need_b, need_gate],
                                              [], [], seed)
    channels = (v.shape[1],)
    like = lambda shape, need: v.new_empty(shape if need else (0,), dtype=torch.float32)
    res = torch.empty_like(v, dtype=torch.float32) if has_residual and need_res else v.new_empty(0, dtype=torch.float32)
    return (*conv[:4], like(channels, need_bn_w), like(channels, need_bn_b), res, *conv[4:])


_CONV_ARGS = slice(9, 9 + conv_state.FLAT)  # bf16_conv_bn's arguments code_offset .. finite (conv_state.flat)
_BN_ARGS = 9 + conv_state.FLAT  # where bn_w is


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, onehot, qa, sa, qw, sw, keep = inputs[:9]
    bn_w, bn_b, residual, _, _, training, momentum, eps, relu, give, fast_bn, take_v, take_s, take_a = inputs[_BN_ARGS:]
    out, low, high, _, _, _, v, dead, ref, mean, invstd, running_mean, running_var = output  # the statistics after it
    ctx.set_materialize_grads(False)  # a handed-over gradient comes as the placeholders', out's is None
    placeholders = output[3:6]
    ctx.mark_non_differentiable(low, high, v, dead, ref, mean, invstd, running_mean, running_var,
                                *(p for p in placeholders if p.numel() == 0))  # empty: no placeholders given
    ctx.gate_grad = onehot is not None and onehot.requires_grad
    conv_state.save_flat(ctx, inputs[_CONV_ARGS], keep, sa, qw, sw, x if ctx.gate_grad else None,
                        onehot if ctx.gate_grad else None, v, bias, bn_w, dead, ref, mean, invstd, running_mean,
                        running_var)
    ctx.bn = (training, eps, residual is not None, list(out.stride()))
    ctx.has_bias = bias is not None
    ctx.hand = (list(take_v.shape), list(x.stride())) if take_v is not None else ([], [])


def _backward(ctx, *grads):
    grad, handed_v, handed_scale, handed_addend = grads[0], *grads[3:6]
    args, (keep, sa, qw, sw, x, onehot, v, bias, bn_w, dead, ref, mean, invstd, running_mean, running_var) = \
        conv_state.saved_flat(ctx)
    need = ctx.needs_input_grad
    needs = [bool(need[0]), bool(need[1]), ctx.has_bias and bool(need[2]), ctx.gate_grad, bool(need[_BN_ARGS]),
             bool(need[_BN_ARGS + 1]), bool(need[_BN_ARGS + 2])]
    outs = bf16_conv_bn_backward(grad, handed_v, handed_scale, handed_addend, keep, sa, qw, sw, x, onehot, *args, v,
                                 bias, bn_w, dead, ref, mean, invstd, running_mean, running_var, *ctx.bn, needs,
                                 *ctx.hand, conv_state.grad_seed(args))
    d_residual = outs[6] if outs[6].numel() or not needs[6] else grad
    if needs[6] and d_residual is None:  # out reached no loss: nor does the residual
        d_residual = torch.zeros_like(v, dtype=torch.float32)
    conv = conv_state.dense_grads(needs[:4], outs[:4], outs[7:], bool(ctx.hand[0]), gap=0)
    picked = lambda t, n: t if n else None
    return (conv[:4] + (None,) * (_BN_ARGS - 4) + (picked(outs[4], needs[4]), picked(outs[5], needs[5]),
                                                   picked(d_residual, needs[6])) + (None,) * 8 + conv[4:])


bf16_conv_bn.register_autograd(_backward, setup_context=_setup_context)


def apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], onehot: Optional[Tensor], qa: Optional[Tensor], sa: Tensor,
          qw: Tensor, sw: Tensor, keep: Tensor, state, bn: nn.Module, residual: Optional[Tensor], relu: bool,
          give: bool, fast_bn: bool, take=(None, None, None)) -> _Thirteen:
    """fracpass::bf16_conv_bn on a native call's operands (``keep``, ``state``: conv_state.operands()) and its
    BatchNorm module's parameters and state (bn_state: its num_batches_tracked counted here; the running
    statistics the op returns copied into the module's, as F.batch_norm updates them in place)."""
    running_mean, running_var, training, momentum, eps = bn_state(bn)
    outs = bf16_conv_bn(x, weight, bias, onehot, qa, sa, qw, sw, keep, *conv_state.flat(state), bn.weight, bn.bias,
                        residual, running_mean, running_var, training, momentum, eps, relu, give, fast_bn, *take)
    if training:
        with torch.no_grad():
            for kept, new in zip((running_mean, running_var), outs[11:]):
                if kept is not None:
                    kept.copy_(new)
    return outs


class Handover(NamedTuple):
    """What a fused conv-BatchNorm op gives the convolution that reads its output, as values in the graph
    (FuseNativeBNPass wires them: the fused call returns (out, Handover), and each convolution call that reads
    out as its input takes it as ``handed``). Nothing travels on tensors or modules.

    ``low``, ``high``: out's min and max, as torch.aminmax gives them, from the kernel pass that wrote out
    (None where the BatchNorm ran on aten's kernels): the reader's activation quantizer takes them instead
    of a pass over out. The pass hands them only where nothing in the graph can write out in place.

    ``grad``: for a reader that is out's only one and reads it once (``sole_reader``), three placeholder
    outputs of the fused op, shaped as out (bfloat16), as a scale (1,) and as one sample's addend (its
    values in memory order), all zeros expanded (no memory). When the reader's input gradient runs on
    int8 (int8_conv.int8_input_grad), its backward returns None for out and that product, its scale and
    its addend as these outputs' gradients; autograd brings them to the fused op's backward, whose
    BatchNorm kernels form dL/dout = fl(fl(v scale) + addend) where they read it (the values
    codes.scale_out gives). Otherwise it returns dL/dout as usual and None for them."""

    low: Optional[Tensor] = None
    high: Optional[Tensor] = None
    grad: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    @property
    def known_range(self) -> Optional[Tuple[Tensor, Tensor]]:
        return None if self.low is None else (self.low, self.high)


def _placeholders(out: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Handover.grad's three outputs for ``out``: zeros expanded to out's shape (bfloat16), to (1,) and to
    one sample's element count (float32), each from a zero of its own (an op's outputs never alias)."""
    zero = lambda dtype: torch.zeros((), dtype=dtype, device=out.device)
    return zero(torch.bfloat16).expand(out.shape), zero(torch.float32).expand(1), zero(torch.float32).expand(out[0].numel())


def _fast_bn_reason(v: Tensor, sa: Tensor, residual: Optional[Tensor], fast_bn: bool) -> Optional[str]:
    """None if the fused op's BatchNorm runs on the CPU kernels for the product ``v`` (or a tensor in its
    layout), else why it runs on aten's."""
    if not fast_bn:
        return "NativeOptions.fast_bn is False"
    if units.ext(v) is None:
        return "no CPU kernels for this tensor"
    if _fast_bn_layout(v, sa, residual):
        return None
    if sa.numel() > 1:
        return "per-sample input scales (gated)"
    if v.stride(1) == 1 and residual is not None:
        return "a residual in another layout"
    return "an NCHW product: a channels_last model and input put it on the CPU kernels"


def _fast_bn_layout(v: Tensor, sa: Tensor, residual: Optional[Tensor]) -> bool:
    """Whether the BatchNorm kernels take this product: channels innermost (channels_last), one input
    scale for the batch (a gated op's per-sample scales are not folded into the statistics), a float32
    residual in the same layout."""
    return (v.dim() >= 3 and v.shape[1] > 1 and v.stride(1) == 1 and rows_outer_dense(v)
            and sa.numel() == 1 and (residual is None or (residual.dtype == torch.float32
                                                          and residual.stride() == v.stride()
                                                          and residual.shape == v.shape)))


def _fast_bn_forward(ext, v: Tensor, scale: Tensor, bias: Optional[Tensor], bn_w: Optional[Tensor],
                     bn_b: Optional[Tensor], residual: Optional[Tensor], post: tuple):
    """BatchNorm (training or eval; then the residual, then the ReLU) of y = s v + bias from the bf16
    product v: the statistics from per-channel sums of d = v - ref (ref: the first pixel's values, so the
    variance does not come from a difference of large sums) in float64, the running statistics updated as
    aten does (momentum; the unbiased variance), the output one affine map per channel of d. Returns (out,
    the ReLU's mask bits or None, ref, mean, invstd, (out's min, out's max)) with the three per-channel
    vectors in float64 and out's range as torch.aminmax gives it, from the pass that wrote out."""
    running_mean, running_var, training, momentum, eps, relu = post
    given = lambda t: codes.given(t, v)
    out, bits, ref, mean, invstd, mn, mx = ext.bn_forward_bf16(v, given(scale), given(bias), given(bn_w), given(bn_b),
                                                               given(running_mean), given(running_var), training,
                                                               momentum, eps, given(residual), relu)
    return out, bits if relu else None, ref, mean, invstd, (mn, mx)


def _fast_bn_backward(ext, grad: Tensor, dead: Optional[Tensor], v: Tensor, ref: Tensor, scale: Tensor,
                      bias: Optional[Tensor], bn_w: Optional[Tensor], mean: Tensor, invstd: Tensor, training: bool,
                      keep_grad: bool, grad_scale: Tensor = codes.NONE_F, grad_addend: Tensor = codes.NONE_F):
    """_fast_bn_forward's backward: (dL/dy, its min and max, the gradient after the ReLU (the residual's),
    dL/d weight, dL/d bias). With g the gradient after the ReLU and xh = (y - mean) invstd:
    dy = w invstd (g - mean(g) - xh mean(g xh)) in training, w invstd g in eval, an affine map per
    channel of g and d = v - ref whose coefficients come from the sums of g and g d (float64). ``grad`` may
    be the next convolution's bfloat16 input-gradient product with its epilogue's ``grad_scale`` and
    ``grad_addend`` (Handover.grad): the gradient is then fl(fl(grad * grad_scale) + grad_addend), as
    codes.scale_out computes it, formed where the kernels read it."""
    given = lambda t: codes.given(t, v)
    dead = v.new_empty(0, dtype=torch.uint8) if dead is None else dead
    dy, mn, mx, g, d_w, d_b = ext.bn_backward_bf16(grad, dead, v, ref, given(scale), given(bias), given(bn_w), mean,
                                                   invstd, training, keep_grad, grad_scale, grad_addend)
    if g.numel() == 0:  # nothing kept apart from grad (no ReLU's mask, or nothing to keep): grad itself
        g = grad
    return dy, (mn, mx), g, d_w, d_b


def _relu_mask_(out: Tensor) -> Tensor:
    """torch.relu_(out), returning where out <= 0 (what the ReLU's backward reads): as bits in out's
    memory order (uint8, 8 elements a byte) from the fused kernel, else as a bool tensor in out's layout."""
    ext = units.ext(out)
    if ext is not None and rows_outer_dense(out):
        return ext.relu_bits_(out)
    return out.relu_() <= 0


def _relu_grad(grad: Tensor, dead: Tensor, stride: Tuple[int, ...]) -> Tensor:
    """The ReLU's backward, threshold_backward(grad, out, 0), from _relu_mask_'s mask of out <= 0, with
    threshold_backward's output layout (BatchNorm's backward then reduces in the order it did unfused).
    ``stride``: out's strides."""
    if dead.dtype == torch.uint8:  # bits in out's memory order
        ext = units.ext(grad)
        if ext is not None and grad.dtype == torch.float32 and grad.stride() == stride:
            return ext.relu_grad_bits(grad, dead)
        flags = dead.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(dead.device)).ne(0).view(-1)[:grad.numel()]
        dead = torch.empty_strided(grad.shape, stride, dtype=torch.bool, device=grad.device)
        memory_order(dead).copy_(flags)
    # a stand-in for out with its layout and sign
    return torch.ops.aten.threshold_backward(grad, dead.logical_not().float(), 0)


_BIT_WEIGHTS = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)


def bn_state(bn: nn.Module) -> tuple:
    """(running_mean, running_var, training, momentum, eps) as ``nn.modules.batchnorm._BatchNorm.forward``
    passes them to F.batch_norm, with its num_batches_tracked update."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    kept = not bn.training or bn.track_running_stats
    return (bn.running_mean if kept else None, bn.running_var if kept else None, training, momentum, bn.eps)


def fused_reason(y_like: Tensor, bn: nn.Module, act, residual: Optional[Tensor], bn_first: bool) -> Optional[str]:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or type(bn).forward is not nn.modules.batchnorm._BatchNorm.forward:
        return f"its BatchNorm is a {type(bn).__name__}"  # markers at export, or a subclass with its own forward
    if act is not None and not (act == "relu" or type(act) is nn.ReLU):
        return f"its activation is a {type(act).__name__}"
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var, residual):
        if t is not None and (t.dtype != torch.float32 or t.device != y_like.device):
            return "its BatchNorm or residual is not float32 on the convolution's device"
    return None


def unfused(y: Tensor, bn: nn.Module, act, residual: Optional[Tensor], bn_first: bool) -> Tensor:
    """What the unfused graph computes after the convolution: bn, the residual add, the ReLU."""
    out = bn(y)
    if residual is not None:
        out = out + residual if bn_first else residual + out
    if act is None:
        return out
    return torch.relu(out) if isinstance(act, str) else act(out)
