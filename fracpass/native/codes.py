"""Integer codes of quantized operands: int8 (_Coded, for torch._int_mm) and bfloat16 ones, gradients'
stochastic-rounded codes, and the float32 epilogue (scales, offsets) applied to a product of codes."""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fracpass.gating import range_per_group, range_per_row, quantize_grad_rows
from fracpass.quant import FULL_PRECISION, affine_params, value_range, dense, fused_kernels, memory_order, rows_outer_dense, torch_seed, quantize_grad_stochastic
from fracpass.native import options, units

if TYPE_CHECKING:
    from fracpass.native import gated

class Coded(NamedTuple):
    """A 2-D operand as int8 codes: value = s * (t + k) + c.

    s and k (int32) hold one value, or one per index of the operand's free (non-contracted) axis:
    rows for a left operand, columns for a right one. c is a per-tensor float offset (gradients)."""

    t: Tensor
    k: Optional[Tensor]
    s: Tensor
    c: Optional[Tensor] = None
    rows: Optional[Tensor] = None  # int32 sums of t over each row / column, when already known
    cols: Optional[Tensor] = None

    @property
    def T(self) -> "Coded":
        return Coded(self.t.t(), self.k, self.s, self.c, self.cols, self.rows)

    def row_sums(self) -> Tensor:
        return self.rows if self.rows is not None else self.t.sum(1, dtype=torch.int32)

    def col_sums(self) -> Tensor:
        return self.cols if self.cols is not None else self.t.sum(0, dtype=torch.int32)

    def decode(self, free: int) -> Tensor:
        """The float values, with s and k along axis ``free`` (0: rows, 1: columns)."""
        ext = units.ext(self.t)
        if ext is not None and self.c is None and self.t.is_contiguous() and (free == 0 or self.s.numel() == 1):
            return ext.decode(self.t, NONE_I if self.k is None else self.k, self.s)
        if ext is not None and self.c is None and self.t.t().is_contiguous() and (free == 1 or self.s.numel() == 1):
            return ext.decode(self.t.t(), NONE_I if self.k is None else self.k, self.s).t()
        shape = (-1, 1) if free == 0 else (1, -1)
        q = self.t.float() if self.k is None else self.t.to(torch.int32).add_(self.k.view(shape)).float()
        q.mul_(self.s.view(shape))
        return q if self.c is None else q.add_(self.c)


def encode(x: Tensor, mn: Tensor, mx: Tensor, bits: int) -> Coded:
    """The codes of fake_quantize(x) over [mn, mx] (per tensor, or per row of 2-D x with mn (R, 1),
    or per column with mn (1, C)): up to 7 bits the codes (zero point included) lie in [-127, 127]
    and k is None; at 8 bits they span 256 values in [-255, 255], so t = q - lo - 128, k = lo + 128."""
    scale, lo, hi = affine_params(mn, mx, float(2**bits - 1))
    eight = bits >= options.MAX_INT8_BITS
    shift = lo + 128 if eight else torch.zeros_like(lo)
    ext = units.ext(x)
    per_row = scale.dim() == 2 and scale.shape == (x.shape[0], 1)
    if ext is not None and x.is_contiguous() and (scale.numel() == 1 or per_row):
        t, rows, cols = ext.encode(x, scale.reshape(-1), lo.reshape(-1), hi.reshape(-1), shift.reshape(-1))
    else:
        q = torch.div(x, scale).round_()  # the simulation's formula (fracpass.quant.fake_quantize)
        q.clamp_min_(lo)
        q.clamp_max_(hi)
        t, rows, cols = (q.sub_(shift) if eight else q).to(torch.int8), None, None
    k = shift.reshape(-1).to(torch.int32) if eight else None
    return Coded(t, k, scale.reshape(-1), None, rows, cols)


def grad_codes(grad: Tensor, bits: int, values: bool = True,
               seed: Optional[Tensor] = None) -> Tuple[Optional[Tensor], Coded]:
    """The simulation's stochastic rounding of ``grad`` (fracpass.quant.quantize_grad_stochastic: same
    noise for the same seed) as values ghat and as codes with s * t + c == ghat, t = q - 2^(b-1). Without
    ``values`` ghat may be None (the CPU kernel then writes the codes alone). ``seed``: the CPU kernel's
    (a 0-d int64 tensor, quant.draw_seed), else it draws one."""
    levels = float(2**bits - 1)
    mn, mx = torch.aminmax(grad)
    scale = (mx / levels - mn / levels).clamp_(min=torch.finfo(grad.dtype).tiny)
    half = float(2 ** (bits - 1))
    ext = units.ext(grad)
    if ext is not None and fused_kernels(grad) is not None:  # the simulation uses grad_sr's dither then
        ghat, t, rows, cols = ext.grad_codes(grad, mn, mx, levels, torch_seed() if seed is None else int(seed), values)
        ghat = ghat if values else None
    else:
        ghat = quantize_grad_stochastic(grad, bits, seed=seed)
        t, rows, cols = torch.sub(ghat, mn).div_(scale).round_().sub_(half).to(torch.int8), None, None
    return ghat, Coded(t, None, scale.reshape(1), mn + scale * half, rows, cols)


def bias_grad(ghat: Optional[Tensor], coded: Optional[Coded]) -> Tensor:
    """dL/d bias, the sum of ghat over rows: from the codes' column sums where they are known,
    s (sum t) + rows c in float64 rounded once (the sum of s t + c over the rows, which the simulation
    sums in float32), else ghat.sum(0)."""
    if coded is None or coded.cols is None:
        return ghat.sum(0)
    rows = coded.t.shape[0]
    return (coded.cols.double() * coded.s.double() + rows * coded.c.double()).float()


NONE_F, NONE_I = torch.empty(0), torch.empty(0, dtype=torch.int32)  # "none" for the CPU kernels


NONE_B = torch.empty(0, dtype=torch.uint8)


def given(t: Optional[Tensor], like: Tensor) -> Tensor:
    """An optional float32 argument of the CPU kernels: the tensor (detached), or none (empty, made as ``like``
    is: a fake tensor under tracing, where the constant NONE_F would be a real one among fakes)."""
    return like.new_empty(0, dtype=torch.float32) if t is None else t.detach()


def encode_shifted(x: Tensor, mn: Tensor, mx: Tensor, bits: int) -> Tensor:
    """uint8 codes q - lo = q + zero point in [0, 2^b - 1] of a per-tensor fake_quantize(x)."""
    scale, lo, hi = affine_params(mn, mx, float(2**bits - 1))
    ext = units.ext(x)
    if ext is not None and x.is_contiguous():
        t, _, _ = ext.encode(x, scale.reshape(-1), lo.reshape(-1), hi.reshape(-1), lo.reshape(-1))
        return t.view(torch.uint8)  # codes up to 255 wrapped through int8: the same bytes
    q = torch.div(x, scale).round_()
    q.clamp_min_(lo)
    q.clamp_max_(hi)
    return q.sub_(lo).to(torch.uint8)


def bf16_codes(x: Tensor, mn: Tensor, mx: Tensor, levels) -> Tuple[Tensor, Tensor]:
    """(codes q = clamp(round(x / s), lo, hi) as bfloat16 in x's layout, s): fake_quantize(x) == s * q,
    with ``levels`` = 2^bits - 1. Per tensor, or per sample (gated: mn, mx, levels one per row of dim
    0, s then too). |q| <= 255, so bfloat16 holds every code exactly; the real zero is code 0."""
    rows = torch.is_tensor(levels) and levels.numel() > 1
    if rows:  # one range per sample: fracpass.gating.fake_quantize_rows's arithmetic
        levels = levels.to(torch.float32)
    scale, lo, hi = affine_params(mn, mx, levels if rows else float(levels))
    ext = units.ext(x)
    along_rows = scale.numel() == 1 or (x.dim() > 0 and scale.dim() > 0 and scale.numel() == scale.shape[0] == x.shape[0]
                                      and rows_outer_dense(x))
    if ext is not None and along_rows:  # per tensor, per sample, or per output channel of a weight (dim 0)
        return ext.encode_bf16(dense(x), scale.reshape(-1), lo.reshape(-1), hi.reshape(-1), False, True)[0], scale.reshape(-1)
    if rows:
        scale, lo, hi = (per_row_view(v, x) for v in (scale, lo, hi))
    q = torch.div(x, scale).round_()  # the simulation's formula (fracpass.quant.fake_quantize)
    q = torch.maximum(q, lo)
    q = torch.minimum(q, hi)
    return q.to(torch.bfloat16), scale.reshape(-1)


class _Kept(NamedTuple):
    """A per-tensor-input convolution's input codes as bytes u = q - lo (what backward keeps; the int8
    forward's operand) and whether its input and weight gradients' products run on int8."""

    u: Tensor
    lo: Tensor  # 0-d: read inside the ops, so that torch.compile traces the call
    int8_dx: bool = False
    int8_dw: bool = False  # the weight gradient's on the VNNI kernel (int8_conv.int8_reasons)
    split: float = options.NativeOptions.split_channels  # for the int8 products (int8_conv.int8_product)


def bf16_input_codes(x: Tensor, mn: Tensor, mx: Tensor, bits: int,
                      codes: bool = True) -> Tuple[Optional[Tensor], Tensor, Optional[tuple]]:
    """bf16_codes of a convolution's input at ``bits`` with one range (per tensor), and ``kept``: the same
    codes as bytes q - lo with lo (what conv_state.saved_codes keeps for backward), written by the kernel in the
    same pass, or None where the kernels do not run (conv_state.saved_codes then narrows q itself). Without
    ``codes`` (the int8 forward reads the bytes) only the bytes where the kernels run: the codes are None."""
    ext = units.ext(x)
    if ext is None or not rows_outer_dense(x) or x.numel() == 0 or bits > options.MAX_INT8_BITS:
        return bf16_codes(x, mn, mx, float(2**bits - 1)) + (None,)
    scale, lo, hi = affine_params(mn, mx, float(2**bits - 1))
    q, u = ext.encode_bf16(x, scale.reshape(-1), lo.reshape(-1), hi.reshape(-1), True, codes)
    return q if codes else None, scale.reshape(-1), _Kept(u, lo.reshape(()))


def per_row_view(v: Tensor, like: Tensor) -> Tensor:
    """A per-tensor or per-sample vector ``v`` shaped to broadcast against ``like`` (N, C, ...)."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1)) if v.numel() > 1 else v.reshape(())


def simulated_grad(grad: Tensor, mn: Optional[Tensor], mx: Optional[Tensor], levels: Optional[Tensor],
                   gbits: int, seed: Optional[Tensor] = None) -> Tensor:
    """``grad`` as the simulation's gradient quantizer rounds it: per sample over [mn, mx] at ``levels``
    (gated, fracpass.gating.quantize_grad_rows), per tensor at ``gbits`` (``seed``: the kernel's, else it
    draws one), or as is (``levels`` None)."""
    if levels is None:
        return grad
    if levels.numel() > 1:
        return quantize_grad_rows(grad, mn, mx, levels)
    return quantize_grad_stochastic(grad, gbits, seed=seed)


def bf16_grad_codes(grad: Tensor, mn: Tensor, mx: Tensor, levels: Tensor, gbits: int, values: bool, bytes: bool = False,
                    seed: Optional[Tensor] = None) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor, Optional[tuple]]:
    """The simulation's stochastic rounding of ``grad`` over [mn, mx] at ``levels`` (per tensor:
    fracpass.quant.quantize_grad_stochastic; one of each per sample: fracpass.gating.quantize_grad_rows;
    same noise for the same seed) as codes t in bfloat16 with ghat = s * t + c (s, c per tensor or per
    sample); ghat itself only if ``values``. t = q - k with k = round(-min / s) (|t| <= 2^b - 1:
    exact), which leaves |c| <= s / 2 when the range holds zero, so the offset's correction stays small
    beside the product and bfloat16's rounding of the two cannot cancel. Last: with ``bytes`` (one
    range, where the kernels run), q as bytes with -k, t's offset (the int8 input gradient's operand,
    as bf16_input_codes's ``kept``), else None. ``seed``: the stochastic rounding's for a per-tensor range
    (a 0-d int64 tensor, quant.draw_seed), else the kernel draws one."""
    grad = dense(grad)  # the simulation's gradient quantizers read this layout, in memory order
    scale = (mx / levels - mn / levels).clamp_(min=torch.finfo(grad.dtype).tiny)
    zero = torch.minimum(torch.round(-mn / scale).clamp_(min=0.0), levels)
    ext = units.ext(grad)
    if ext is not None and fused_kernels(grad) is not None:  # the simulation uses grad_sr's dither then
        bytes = bytes and levels.numel() == 1
        ghat, t, u = ext.grad_codes_bf16(grad, mn.reshape(-1), mx.reshape(-1), levels.reshape(-1), zero.reshape(-1),
                                         torch_seed() if seed is None else int(seed), values, bytes)
        ghat = ghat if values else None
        kept = (u, -float(zero)) if bytes else None
    else:
        ghat = simulated_grad(grad, mn, mx, levels, gbits, seed)
        v = lambda a: per_row_view(a, grad)
        t = torch.sub(ghat, v(mn)).div_(v(scale)).round_().sub_(v(zero)).to(torch.bfloat16)
        kept = None
    return ghat, t, scale.reshape(-1), (mn + scale * zero).reshape(-1), kept


def scale_out(v: Tensor, scale: Tensor, bias: Optional[Tensor], rows: Optional[Tensor] = None,
               addend: Optional[Tensor] = None) -> Tensor:
    """float32 v * scale (* rows) (+ bias) (+ addend), scale and bias per channel (dim 1) or per tensor,
    ``rows`` a factor per sample (dim 0) or per tensor, ``addend`` (float32, one sample's shape (1, ...))
    the same for every sample, in v's layout; v * scale + addend rounds twice, as the separate ops do."""
    if rows is not None and rows.numel() == 1:  # one factor for every sample: into the scale (the flat loop)
        scale, rows = scale * rows.reshape(()), None
    ext = units.ext(v)
    if ext is not None and rows_outer_dense(v) and (addend is None or same_sample_layout(addend, v)):
        return ext.scale_bf16(v, scale.reshape(-1).float(), given(None if bias is None else bias.reshape(-1), v),
                              given(None if rows is None else rows.reshape(-1).float(), v),
                              given(None if addend is None else memory_order(addend), v))
    shape = (1, -1) + (1,) * (v.dim() - 2)
    s = scale.view(shape) if scale.numel() > 1 else scale
    if rows is not None:
        s = s * per_row_view(rows, v)
    y = torch.mul(v, s.reshape(1) if s.dim() == 0 else s)  # bf16 x fp32 -> fp32 (a 0-dim fp32 would give bf16)
    y = y if bias is None else y.add_(bias.view(shape))
    return y if addend is None else y.add_(addend)


def same_sample_layout(addend: Tensor, v: Tensor) -> bool:
    """Whether ``addend`` (1, ...) is one float32 sample of ``v`` laid out as v's samples are, densely,
    so that its memory order is each of v's rows' (scale_bf16 adds it row by row)."""
    return (addend.dtype == torch.float32 and addend.dim() == v.dim() and addend.shape[0] == 1
            and addend.shape[1:] == v.shape[1:] and rows_outer_dense(addend)
            and all(a == b for a, b, n in zip(addend.stride()[1:], v.stride()[1:], v.shape[1:]) if n > 1))


def exact_codes(levels: Optional[Tensor]) -> Optional[Tensor]:
    """Per sample (or per tensor), whether the gradient's codes at ``levels`` are exact in bfloat16 (2..8
    bits); None if the gradient is not quantized, or if a sample's option leaves it unquantized (levels
    0: its rows pass through, as fracpass.gating.quantize_grad_rows does), so that the whole batch's
    backward takes the float32 products on ghat."""
    if levels is None or bool((levels <= 0).any()):
        return None
    return (levels >= 3) & (levels <= 2**options.MAX_INT8_BITS - 1)


def grad_range(grad: Tensor, gbits: int, gating: Optional[gated.Gating], minmax=None):
    """(min, max, level count) the gradient quantizer rounds ``grad`` over: per tensor at ``gbits`` (its
    min and max ``minmax`` when known), or per sample over its option group's range at its option's
    levels (fracpass.gating's GatedGradQuant). The level count is None where the gradient is not quantized."""
    if gating is not None and gating.grad_levels is not None:
        mn, mx = range_per_row(grad)
        mn, mx, _, _ = range_per_group(mn, mx, gating.choice, gating.grad_levels.numel())
        return mn, mx, gating.grad_levels[gating.choice]
    if gbits >= FULL_PRECISION:
        return None, None, None
    mn, mx = value_range(grad) if minmax is None else minmax
    return mn, mx, torch.tensor(float(2**gbits - 1), device=grad.device)


def take_samples(v: Tensor, idx: Tensor) -> Tensor:
    """The samples ``idx`` of ``v`` in v's memory layout (channels_last stays channels_last)."""
    out = torch.empty_like(v[:idx.numel()])
    return torch.index_select(v, 0, idx, out=out)


def shape_only(like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A stand-in with ``like``'s shape and layout for a convolution_backward operand whose gradient is not
    asked for: never written or read (an expanded scalar took oneDNN off its fast path: 1.6x slower)."""
    return torch.empty_like(like, dtype=dtype)
