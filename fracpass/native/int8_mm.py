"""Linear and 2-D matmul products on int8 codes (torch._int_mm, int32 accumulation: exact), forward and
both gradient products; FP8 e4m3 on GPUs that have it for codes of <= 4 bits."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fracpass.quant import FULL_PRECISION, quantize_grad_stochastic
from fracpass.native import codes, decide, options, units

def _code_mm(a: Tensor, b: Tensor, fp8: bool = False) -> Tensor:
    """a @ b of int8 codes, exactly: int32 from torch._int_mm, or, with ``fp8`` (every code of magnitude
    <= 16, contraction <= MAX_FP8_CONTRACTION), float32 from torch._scaled_mm over the same codes in
    FP8 e4m3, the left operand row-major and the right one column-major as cuBLASLt's FP8 GEMM takes them."""
    if not fp8:
        return torch._int_mm(a, b)
    one = torch.ones((), device=a.device)
    a8 = a.to(torch.float8_e4m3fn).contiguous()
    b8 = b.t().to(torch.float8_e4m3fn).contiguous().t()
    return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.float32)


def _affine_mm(a: codes.Coded, b: codes.Coded, bias: Optional[Tensor] = None, fp8: bool = False) -> Tensor:
    """a @ b (+ bias) for a (M, K) and b (K, N) given as codes: one int8 GEMM (int32 accumulation,
    exact for K <= MAX_CONTRACTION; with ``fp8`` an FP8 one, see _code_mm), then the scales and the
    zero-point corrections on the output."""
    k_len = a.t.shape[1]
    acc = _code_mm(a.t, b.t, fp8)
    need_rows, need_cols = b.k is not None or b.c is not None, a.k is not None or a.c is not None
    row_a = a.row_sums() if need_rows else None
    col_b = b.col_sums() if need_cols else None
    ext = units.ext(a.t)
    if ext is not None and acc.dtype == torch.int32:
        pick = lambda v, empty: empty if v is None else v.reshape(-1)
        return ext.epilogue(acc, a.s.reshape(-1), b.s.reshape(-1), pick(row_a, codes.NONE_I), pick(b.k, codes.NONE_I),
                            pick(a.k, codes.NONE_I), pick(col_b, codes.NONE_I), pick(a.c, codes.NONE_F), pick(b.c, codes.NONE_F),
                            pick(bias, codes.NONE_F), k_len)
    sa, sb = a.s.view(-1, 1), b.s.view(1, -1)
    ka = None if a.k is None else a.k.view(-1, 1)
    kb = None if b.k is None else b.k.view(1, -1)
    if row_a is not None:
        row_a = row_a.view(-1, 1)
        if kb is not None:
            acc += row_a * kb
        if ka is not None:
            row_a = row_a + k_len * ka
    if col_b is not None:
        col_b = col_b.view(1, -1) + (k_len * kb if kb is not None else 0)
        if ka is not None:
            acc += ka * col_b
    y = acc.float().mul_(sa * sb)
    if a.c is not None:
        y += (a.c * sb) * col_b.float()
    if b.c is not None:
        y += (b.c * sa) * row_a.float()
    if a.c is not None and b.c is not None:
        y += k_len * a.c * b.c
    return y if bias is None else y.add_(bias)


class Int8Product(torch.autograd.Function):
    """y = A @ B (+ bias) on int8 codes; backward quantizes dy as the gradient quantizer would.

    Only the codes are saved for backward. dA = dy B^T contracts over B's free axis and dB = A^T dy
    over A's: each runs on int8 when the contracted operand's scale is per tensor, else in float32
    on the decoded codes (a per-channel weight scale cannot be applied to that product's output).
    ``fp8``: which of the three products (forward, dA, dB) run on FP8 codes instead (decide.fp8_products)."""

    @staticmethod
    def forward(ctx, a, b, bias, ca: codes.Coded, cb: codes.Coded, gbits: int, fp8=(False, False, False)):  # type: ignore[override]
        y = _affine_mm(ca, cb, bias, fp8[0])
        ctx.save_for_backward(*ca, *cb)  # int8 codes (and small vectors), never the float operands
        ctx.gbits, ctx.fp8 = gbits, fp8
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        saved = ctx.saved_tensors
        ca, cb = codes.Coded(*saved[:6]), codes.Coded(*saved[6:])
        need_a, need_b, need_bias = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        gbits = ctx.gbits
        coded_g = None
        # which of the products run on int8 (the gradient's codes); the others read ghat
        int8_a = need_a and cb.s.numel() == 1 and cb.t.shape[1] <= options.MAX_CONTRACTION
        int8_b = need_b and ca.s.numel() == 1 and ca.t.shape[0] <= options.MAX_CONTRACTION
        if 2 <= gbits <= options.MAX_INT8_BITS:
            ghat, coded_g = codes.grad_codes(grad, gbits, values=(need_a and not int8_a) or (need_b and not int8_b))
        else:
            ghat = quantize_grad_stochastic(grad, gbits) if gbits < FULL_PRECISION else grad
        da = db = dbias = None
        int8_a, int8_b = int8_a and coded_g is not None, int8_b and coded_g is not None
        if need_a:
            da = _affine_mm(coded_g, cb.T, fp8=ctx.fp8[1]) if int8_a else ghat @ cb.decode(free=1).t()
        if need_b:
            db = _affine_mm(ca.T, coded_g, fp8=ctx.fp8[2]) if int8_b else ca.decode(free=0).t() @ ghat
        if need_bias:
            dbias = codes.bias_grad(ghat, coded_g)
        return da, db, dbias, None, None, None, None


def int8_call_fp8(site, qa, qb, gq, device, m: int, k: int, n: int) -> Tuple[bool, bool, bool]:
    """decide.fp8_products for an int8 call, its device and (M, K, N) kept in the call's site record for
    the reports (last_call_fp8)."""
    if site is not None:
        site.last.mm = (device, m, k, n)
    return decide.fp8_products(device, qa.bits, qb.bits, decide.grad_bits(gq), m, k, n)


def last_call_fp8(site, qa, qb, gq) -> Tuple[bool, bool, bool]:
    """decide.fp8_products at the quantizers' current bits for the device and shape of the op's last int8
    call (none before one)."""
    last = None if site is None else site.last.mm
    if last is None:
        return False, False, False
    device, m, k, n = last
    return decide.fp8_products(device, qa.bits, qb.bits, decide.grad_bits(gq), m, k, n)
