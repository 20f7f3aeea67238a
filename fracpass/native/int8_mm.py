"""Linear and 2-D matmul products on int8 codes (torch._int_mm, int32 accumulation: exact), forward and
both gradient products; FP8 e4m3 on GPUs that have it for codes of <= 4 bits."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fracpass.quant import FULL_PRECISION, draw_seed, fused_kernels, quantize_grad_stochastic
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


def folded_input_grad(coded_g: codes.Coded, cb: codes.Coded) -> Tensor:
    """dA = ghat @ B^T for a right operand B (K, N) whose scale is per column (a per-channel weight scale,
    on this product's contracted axis): with ghat = s_g t + c, dA = s_g s (t @ B'^T) + c rowsum(B_hat),
    B' = B_hat / s rounded once to bfloat16 (s = max of B's scales: the scale folded into the values,
    relative error <= u = 2^-8), t exact in bfloat16, the product accumulated in float32 and rounded to
    bfloat16, the offset term in float32: |dA - dA_exact| <= u |dA_exact| + u (1 + u) s_g (|t| @ |B_hat|^T)
    beside float32 rounding (docs/native.md)."""
    b_hat = cb.decode(free=1)  # (K, N) float32
    s = cb.s.max().reshape(1)
    folded = b_hat.div(s).to(torch.bfloat16)
    v = coded_g.t.to(torch.bfloat16) @ folded.t()  # (M, K), bfloat16
    return codes.scale_out(v, coded_g.s.reshape(1) * s, None).add_(b_hat.sum(1).mul_(coded_g.c))


# -- the product as registered torch ops -------------------------------------------------------------------
# fracpass::int8_mm encodes both operands and multiplies their codes; fracpass::int8_mm_backward quantizes the
# incoming gradient and runs both gradient products. Their autograd is registered (register_autograd), so
# the saved codes pass from one to the other as the forward op's outputs, not through a Function's ctx
# alone, and both ops have fakes: torch.compile and torch.export can trace a native linear layer. A Coded
# operand travels as five tensors (t, k, s, rows, cols); an absent one (None in Coded) as an empty tensor.

def _flat(c: codes.Coded) -> Tuple[Tensor, ...]:
    i32 = lambda v: c.t.new_empty(0, dtype=torch.int32) if v is None else v  # a fresh one each: outputs never alias
    return (c.t, i32(c.k), c.s, i32(c.rows), i32(c.cols))


def _coded(t: Tensor, k: Tensor, s: Tensor, rows: Tensor, cols: Tensor) -> codes.Coded:
    opt = lambda v: None if v.numel() == 0 else v
    return codes.Coded(t, opt(k), s, None, opt(rows), opt(cols))


@torch.library.custom_op("fracpass::int8_mm", mutates_args=())
def int8_mm(a: Tensor, b: Tensor, bias: Optional[Tensor], a_mn: Tensor, a_mx: Tensor, a_bits: int,
            b_mn: Tensor, b_mx: Tensor, b_bits: int, b_rows: bool, g_bits: int,
            fp8: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y = A @ B (+ bias) for A (M, K) and B (K, N) on int8 codes over the ranges [a_mn, a_mx], [b_mn, b_mx]
    (``b_rows``: b is given as B^T, (N, K), a weight with its range per row: a per-channel scale), and
    both operands' codes (five tensors each, B's as given) for the backward. ``g_bits`` and ``fp8`` (which
    of the forward, dA and dB run on FP8 codes: decide.fp8_products) are for the backward."""
    ca = codes.encode(a, a_mn, a_mx, a_bits)
    cb = codes.encode(b, b_mn, b_mx, b_bits)
    y = _affine_mm(ca, cb.T if b_rows else cb, bias, fp8[0])
    return (y, *_flat(ca), *_flat(cb))


@int8_mm.register_fake
def _int8_mm_fake(a, b, bias, a_mn, a_mx, a_bits, b_mn, b_mx, b_bits, b_rows, g_bits, fp8):
    n = b.shape[0] if b_rows else b.shape[1]

    def coded(x: Tensor, mn: Tensor, bits: int):
        """encode's outputs: the codes, k at 8 bits, the scale per row or per tensor, row and column sums
        from the CPU kernel (none on the torch-op path: the fake says what this device's call returns)."""
        k = (mn.numel(),) if bits >= options.MAX_INT8_BITS else (0,)
        sums = units.ext(x) is not None and x.is_contiguous()
        return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(k, dtype=torch.int32), x.new_empty((mn.numel(),)),
                x.new_empty((x.shape[0],) if sums else (0,), dtype=torch.int32),
                x.new_empty((x.shape[1],) if sums else (0,), dtype=torch.int32))

    return (a.new_empty((a.shape[0], n)), *coded(a, a_mn, a_bits), *coded(b, b_mn, b_bits))


@torch.library.custom_op("fracpass::int8_mm_backward", mutates_args=())
def int8_mm_backward(grad: Tensor, a_t: Tensor, a_k: Tensor, a_s: Tensor, a_rows: Tensor, a_cols: Tensor,
                     b_t: Tensor, b_k: Tensor, b_s: Tensor, b_rows_sum: Tensor, b_cols: Tensor, b_rows: bool,
                     g_bits: int, fp8: List[bool], needs: List[bool], seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dA, dB as b was given, dbias) of int8_mm from dL/dy; empty where ``needs`` (a, b, bias) is False.
    The gradient is quantized as the gradient quantizer would (``seed``: the stochastic rounding's, drawn
    by the caller where the CPU kernels run; empty: the torch-op path draws its own noise)."""
    ca = _coded(a_t, a_k, a_s, a_rows, a_cols)
    cb = _coded(b_t, b_k, b_s, b_rows_sum, b_cols)
    cb = cb.T if b_rows else cb
    da, db, dbias = _product_grads(grad.contiguous(), ca, cb, g_bits, fp8, needs, seed if seed.numel() else None)
    if db is not None and b_rows:
        db = db.t().contiguous()
    none = lambda v: grad.new_empty(0) if v is None else v  # a fresh one each: outputs never alias
    return none(da), none(db), none(dbias)


@int8_mm_backward.register_fake
def _int8_mm_backward_fake(grad, a_t, a_k, a_s, a_rows, a_cols, b_t, b_k, b_s, b_rows_sum, b_cols, b_rows, g_bits,
                           fp8, needs, seed):
    return (grad.new_empty(a_t.shape if needs[0] else (0,)), grad.new_empty(b_t.shape if needs[1] else (0,)),
            grad.new_empty((grad.shape[1],) if needs[2] else (0,)))


def _product_grads(grad: Tensor, ca: codes.Coded, cb: codes.Coded, gbits: int, fp8, needs, seed: Optional[Tensor]):
    """dA = dy B^T and dB = A^T dy (and dbias) for codes ca, cb, with dy quantized to ``gbits``. dA contracts
    over B's free axis and dB over A's: each runs on int8 when the contracted operand's scale is per tensor.
    Else dA, where B's scale is per column (a per-channel weight), runs on bfloat16 with that scale folded
    into B's values where the device has bfloat16 units (``folded_input_grad``), and otherwise in float32
    on the decoded codes, as dB does (a per-channel scale cannot be applied to a product's output when it
    lies on the contracted axis)."""
    need_a, need_b, need_bias = needs
    coded_g = None
    # which of the products run on int8 (the gradient's codes); the others read ghat
    int8_a = need_a and cb.s.numel() == 1 and cb.t.shape[1] <= options.MAX_CONTRACTION
    int8_b = need_b and ca.s.numel() == 1 and ca.t.shape[0] <= options.MAX_CONTRACTION
    fold_a = need_a and cb.s.numel() > 1 and units.bf16_support(grad.device) is None  # decide.backward_products
    if 2 <= gbits <= options.MAX_INT8_BITS:
        ghat, coded_g = codes.grad_codes(grad, gbits, values=(need_a and not int8_a and not fold_a)
                                         or (need_b and not int8_b), seed=seed)
    else:
        ghat = quantize_grad_stochastic(grad, gbits, seed=seed) if gbits < FULL_PRECISION else grad
    da = db = dbias = None
    int8_a, int8_b, fold_a = (f and coded_g is not None for f in (int8_a, int8_b, fold_a))
    if need_a:
        if int8_a:
            da = _affine_mm(coded_g, cb.T, fp8=fp8[1])
        elif fold_a:
            da = folded_input_grad(coded_g, cb)
        else:
            da = ghat @ cb.decode(free=1).t()
    if need_b:
        db = _affine_mm(ca.T, coded_g, fp8=fp8[2]) if int8_b else ca.decode(free=0).t() @ ghat
    if need_bias:
        dbias = codes.bias_grad(ghat, coded_g)
    return da, db, dbias


def _setup_context(ctx, inputs, output) -> None:
    a, b, bias, *_, b_rows, g_bits, fp8 = inputs
    ctx.save_for_backward(*output[1:])  # int8 codes (and small vectors), never the float operands
    ctx.b_rows, ctx.g_bits, ctx.fp8 = b_rows, g_bits, fp8


def _backward(ctx, grad, *_codes_grads):
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    seeded = 2 <= ctx.g_bits < FULL_PRECISION and units.ext(grad) is not None and fused_kernels(grad) is not None
    seed = draw_seed() if seeded else grad.new_empty(0, dtype=torch.int64)
    da, db, dbias = torch.ops.fracpass.int8_mm_backward(grad, *ctx.saved_tensors, ctx.b_rows, ctx.g_bits, ctx.fp8,
                                                        needs, seed)
    return (da if needs[0] else None, db if needs[1] else None, dbias if needs[2] else None) + (None,) * 9


int8_mm.register_autograd(_backward, setup_context=_setup_context)


def product(a: Tensor, b: Tensor, bias: Optional[Tensor], a_range, qa, b_range, qb, gbits: int, fp8,
            b_rows: bool) -> Tensor:
    """y = qa(a) @ qb(b) (+ bias) on int8 codes (fracpass::int8_mm): a (M, K) over ``a_range`` (min, max);
    b (K, N), or with ``b_rows`` a weight (N, K) whose range is per row, over ``b_range``."""
    return torch.ops.fracpass.int8_mm(a, b, bias, *a_range, qa.bits, *b_range, qb.bits, b_rows, gbits, list(fp8))[0]


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
