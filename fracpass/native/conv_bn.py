"""A bf16 convolution with the BatchNorm (residual add, ReLU) after it as one op that keeps less for
backward (Bf16ConvBN), its BatchNorm on the CPU kernels where they apply, and what it hands the
convolution that reads its output (Handover)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from fracpass.quant import memory_order, rows_outer_dense
from fracpass.native import bf16_conv, codes, int8_conv, units

def bn_route(out: Tensor, sa: Tensor, residual: Optional[Tensor], fast_bn: bool) -> str:
    """Which kernels the fused op ran its BatchNorm on (``out`` has the convolution product's layout)."""
    why = _fast_bn_reason(out, sa, residual, fast_bn)
    return "BatchNorm fused, on the CPU kernels" if why is None else f"BatchNorm fused, on aten's kernels ({why})"


class Bf16ConvBN(torch.autograd.Function):
    """fracpass::bf16_conv (bf16_conv.bf16_conv) followed by BatchNorm (training or eval), optionally a residual add and a ReLU, as one
    op that keeps less for backward: the convolution's bfloat16 product v instead of BatchNorm's float32
    input y = s v + bias, and a mask of where the ReLU's output is <= 0 (what threshold_backward reads;
    a bit per element from the kernels, else a bool) instead of its float32 output. Per element of the
    convolution's output, 2 bytes and a bit instead of 8.

    Two routes for the BatchNorm: on a channels-last v with one input scale for the batch, the CPU
    kernels (``NativeOptions.fast_bn``; _fast_bn_forward / _fast_bn_backward): v is read instead of a float32 y
    written and read again, and the ReLU, the residual and the gradient's range ride in the same
    passes; equal to aten's BatchNorm to float32 rounding (tests/native/test_conv_bn.py). Otherwise aten's
    kernels on y, which the backward recomputes from v by the call that made it: bit for bit the unfused
    ops (tests/native/test_fuse_native_bn.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, onehot, qa, sa, qw, sw, keep, state, bn_w, bn_b, residual, post, give=False,
                fast_bn=True, take_v=None, take_s=None, take_a=None):  # type: ignore[override]
        """Returns (out, out's min, out's max, *Handover.grad's three placeholders): the range where the
        BatchNorm ran on the CPU kernels (else None, None), the placeholders where ``give`` (out's only
        reader is a 2-D convolution that may hand its input gradient over) and the kernels ran (else
        None). ``take_*``: the placeholders of the fused op whose output is x, when this op is that
        reader (state.int8[0]: its backward returns the product as their gradients). ``keep`` and
        ``state``: bf16_conv.operands(), as for fracpass::bf16_conv."""
        ctx.set_materialize_grads(False)  # a handed-over gradient comes as the placeholders', out's is None
        state = state._replace(gate_grad=onehot is not None and ctx.needs_input_grad[3],
                               hand=None if take_v is None else (take_v.shape, x.stride()))
        v = bf16_conv.conv_product(qa, qw, keep, state)
        saved = [keep, sa, qw, sw, *((x.detach(), onehot) if state.gate_grad else ())]
        ctx.state = state
        running_mean, running_var, training, momentum, eps, relu = post
        if training and v.numel() == v.shape[1]:  # F.batch_norm's check (aten would divide by n - 1 = 0)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {v.size()}")
        _, _, _, transposed, _, groups = state.conv
        scale = bf16_conv.out_channel_scale(sw, transposed, groups)
        ctx.fast = _fast_bn_reason(v, sa, residual, fast_bn) is None
        mn = mx = None
        placeholders = (None, None, None)
        if ctx.fast:
            out, dead, ref, mean, invstd, (mn, mx) = _fast_bn_forward(units.ext(v), v, scale * sa, bias, bn_w, bn_b,
                                                                      residual, post)
            ctx.mark_non_differentiable(mn, mx)
            keep = (ref, mean, invstd)
            if give and residual is None:
                placeholders = _placeholders(out)
        else:
            y = codes.scale_out(v, scale, bias, sa)
            out, mean, invstd = torch.ops.aten.native_batch_norm(y, bn_w, bn_b, running_mean, running_var, training,
                                                                 momentum, eps)
            del y
            if residual is not None:
                out = out.add_(residual)
            dead = _relu_mask_(out) if relu else None
            keep = (mean, invstd)
        ctx.n_conv, ctx.post, ctx.has_residual, ctx.out_stride = len(saved), post, residual is not None, out.stride()
        ctx.out_shape = out.shape
        ctx.save_for_backward(*saved, v, bias, bn_w, dead, *keep)
        return (out, mn, mx) + placeholders

    @staticmethod
    def backward(ctx, grad, _mn, _mx, handed_v, handed_scale, handed_addend):  # type: ignore[override]
        saved = ctx.saved_tensors
        n = ctx.n_conv
        v, bias, bn_w, dead = saved[n:n + 4]
        running_mean, running_var, training, _, eps, _ = ctx.post
        qa, sa, qw, sw = saved[:4]
        _, _, _, transposed, _, groups = ctx.state.conv
        minmax = None
        if handed_v is None and grad is None:  # out's gradient is zero (it reached no loss)
            grad = torch.zeros(ctx.out_shape, dtype=torch.float32, device=v.device)
        if ctx.fast:
            ref, mean, invstd = saved[n + 4:]
            if handed_v is not None:  # the next convolution's product and epilogue, not a float32 gradient
                grad, grad_scale = handed_v, handed_scale
                grad_addend = codes.NONE_F if handed_addend is None else handed_addend
            else:
                grad_scale = grad_addend = codes.NONE_F
                if grad.stride() != v.stride():
                    grad = torch.empty_like(v, dtype=torch.float32).copy_(grad)
            scale = bf16_conv.out_channel_scale(sw, transposed, groups) * sa
            dy, minmax, grad, d_bn_w, d_bn_b = _fast_bn_backward(units.ext(v), grad, dead, v, ref, scale, bias, bn_w, mean,
                                                                 invstd, training, ctx.has_residual, grad_scale,
                                                                 grad_addend)
        else:
            mean, invstd = saved[n + 4:]
            if dead is not None:
                grad = _relu_grad(grad, dead, ctx.out_stride)
            y = codes.scale_out(v, bf16_conv.out_channel_scale(sw, transposed, groups), bias, sa)  # forward's call: the same y
            dy, d_bn_w, d_bn_b = torch.ops.aten.native_batch_norm_backward(
                grad, y, bn_w, running_mean, running_var, mean, invstd, training, eps,
                [True, ctx.needs_input_grad[10], ctx.needs_input_grad[11]])
            del y
        dx, dw, db, d_onehot = bf16_conv.conv_backward(ctx.state, ctx.needs_input_grad[:3], saved[:n], dy, minmax)
        d_residual = grad if ctx.has_residual and ctx.needs_input_grad[12] else None
        d_bn_w = d_bn_w if ctx.needs_input_grad[10] else None
        d_bn_b = d_bn_b if ctx.needs_input_grad[11] else None
        dx, handed = int8_conv.split_handed(dx)
        return (dx, dw, db, d_onehot) + (None,) * 6 + (d_bn_w, d_bn_b, d_residual, None, None, None) + handed


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
    one sample's element count (float32)."""
    zero_b = torch.zeros((), dtype=torch.bfloat16, device=out.device)
    zero_f = torch.zeros((), dtype=torch.float32, device=out.device)
    return zero_b.expand(out.shape), zero_f.expand(1), zero_f.expand(out[0].numel())


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
    out, bits, ref, mean, invstd, mn, mx = ext.bn_forward_bf16(v, codes.given(scale), codes.given(bias), codes.given(bn_w), codes.given(bn_b),
                                                       codes.given(running_mean), codes.given(running_var), training, momentum,
                                                       eps, codes.given(residual), relu)
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
    dy, mn, mx, g, d_w, d_b = ext.bn_backward_bf16(grad, codes.NONE_B if dead is None else dead, v, ref, codes.given(scale),
                                                   codes.given(bias), codes.given(bn_w), mean, invstd, training, keep_grad,
                                                   grad_scale, grad_addend)
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
