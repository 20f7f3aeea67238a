"""Batched products (torch.bmm, attention's q k^T and P v) on bfloat16 codes, static and gated."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fracpass.gating import GatedGradQuant, onehot_grad
from fracpass.quant import FULL_PRECISION, dense, draw_seed, fused_kernels
from fracpass.native import codes, decide, gated
from fracpass.native.site import NativeSite, quantized, record, site_options

@torch.library.custom_op("fracpass::gated_bmm", mutates_args=())
def gated_bmm(a: Tensor, b: Tensor, onehot: Tensor, qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, gbits: int,
              choice: Tensor, mn: Tensor, mx: Tensor, act_levels: Tensor, grad_levels: Optional[Tensor],
              one_group: bool, mn_b: Tensor, mx_b: Tensor) -> Tensor:
    """y = a_hat @ b_hat for a gated batched product (attention's q k^T and P v in a gated block) on bfloat16
    codes: forward s_a s_b (q_a @ q_b); backward (fracpass::gated_bmm_backward), with ghat = s_g t + c,
    da = s_g s_b (t @ q_b^T) + c s_b rowsum(q_b) and db = s_a s_g (q_a^T @ t) + c s_a colsum(q_a) (the
    offset's products with ones are the codes' sums, exact in float32). The codes are exact in bfloat16 and
    the products accumulate in float32; each product's output is rounded to bfloat16 (unit roundoff 2^-8),
    as on the convolution path. The samples lie on dim 0 of both operands and of y, which no product
    contracts, so every scale and offset is per sample (a factor per sample on each output); samples whose
    gradient option exceeds 8 bits get their entries of da and db in float32 on ghat; the gate's gradient
    sums both operands' <dL/d(operand), Q_k(operand)>, from da, db and the float inputs. a, b and onehot
    (the gate's one-hot choice) are inputs for their gradients; the gating state is the Gating's, flattened."""
    return codes.scale_out(torch.matmul(qa, qb), sa.new_ones(1), None, sa * sb)


@gated_bmm.register_fake
def _gated_bmm_fake(a, b, onehot, qa, sa, qb, sb, gbits, choice, mn, mx, act_levels, grad_levels, one_group, mn_b,
                    mx_b):
    return torch.matmul(qa, qb).new_empty(torch.broadcast_shapes(qa.shape[:-2], qb.shape[:-2])
                                          + (qa.shape[-2], qb.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("fracpass::gated_bmm_backward", mutates_args=())
def gated_bmm_backward(grad: Tensor, qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, a: Tensor, b: Tensor,
                       onehot: Tensor, gbits: int, choice: Tensor, mn: Tensor, mx: Tensor, act_levels: Tensor,
                       grad_levels: Optional[Tensor], one_group: bool, mn_b: Tensor, mx_b: Tensor,
                       needs: List[bool], a_shape: List[int], b_shape: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """(da, db, d_onehot) of fracpass::gated_bmm from dL/dy (a broadcast operand's summed to its shape);
    empty where ``needs`` (a, b, onehot) is False. ``a``, ``b`` and ``onehot``: the forward's, for the gate's
    gradient (else empty). The gradient is quantized as the gated gradient quantizer would, drawing its
    noise as it does."""
    gating = gated.Gating(choice, mn, mx, act_levels, grad_levels, one_group, mn_b, mx_b)
    need_a, need_b, gate_grad = needs
    da, db = _grads(grad, qa, sa, qb, sb, gbits, gating, need_a or gate_grad, need_b or gate_grad)
    d_onehot = None
    if gate_grad:
        d_onehot = (onehot_grad(a, mn, mx, act_levels, onehot, da) + onehot_grad(b, mn_b, mx_b, act_levels, onehot, db))
    da = da.sum_to_size(a_shape) if need_a else None  # broadcast: summed
    db = db.sum_to_size(b_shape) if need_b else None
    none = lambda v: grad.new_empty(0) if v is None else v  # a fresh one each: outputs never alias
    return none(da), none(db), none(d_onehot)


@gated_bmm_backward.register_fake
def _gated_bmm_backward_fake(grad, qa, sa, qb, sb, a, b, onehot, gbits, choice, mn, mx, act_levels, grad_levels,
                             one_group, mn_b, mx_b, needs, a_shape, b_shape):
    need_a, need_b, gate_grad = needs
    return (grad.new_empty(tuple(a_shape) if need_a else (0,)), grad.new_empty(tuple(b_shape) if need_b else (0,)),
            grad.new_empty(tuple(onehot.shape) if gate_grad else (0,)))


def _gated_setup_context(ctx, inputs, output) -> None:
    a, b, onehot, qa, sa, qb, sb, gbits, choice, mn, mx, act_levels, grad_levels, one_group, mn_b, mx_b = inputs
    ctx.gate_grad = onehot.requires_grad
    keep = (a, b, onehot) if ctx.gate_grad else (a.new_empty(0), b.new_empty(0), onehot.new_empty(0))
    ctx.save_for_backward(qa, sa, qb, sb, *keep, choice, mn, mx, act_levels,
                          grad_levels if grad_levels is not None else act_levels.new_empty(0), mn_b, mx_b)
    ctx.gbits, ctx.one_group, ctx.shapes = gbits, one_group, (list(a.shape), list(b.shape))


def _gated_backward(ctx, grad):
    qa, sa, qb, sb, a, b, onehot, choice, mn, mx, act_levels, grad_levels, mn_b, mx_b = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), ctx.gate_grad]
    da, db, d_onehot = gated_bmm_backward(grad, qa, sa, qb, sb, a, b, onehot, ctx.gbits, choice, mn, mx, act_levels,
                                          grad_levels if grad_levels.numel() else None, ctx.one_group, mn_b, mx_b,
                                          needs, *ctx.shapes)
    picked = lambda v, need: v if need else None
    return (picked(da, needs[0]), picked(db, needs[1]), picked(d_onehot, needs[2])) + (None,) * 13


gated_bmm.register_autograd(_gated_backward, setup_context=_gated_setup_context)


def _grads(grad: Tensor, qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, gbits: int, gating: Optional[gated.Gating],
           need_a: bool, need_b: bool, seed: Optional[Tensor] = None):
    """(da, db) of y = a_hat @ b_hat from dL/dy (the products of fracpass::bf16_mm and gated_bmm, before any
    broadcast is summed)."""
    grad = dense(grad)
    mn, mx, levels = codes.grad_range(grad, gbits, gating)
    exact = codes.exact_codes(levels)
    a_hat = lambda: qa.float().mul_(codes.per_row_view(sa, qa))
    b_hat = lambda: qb.float().mul_(codes.per_row_view(sb, qb))
    da = db = None
    if exact is None or not bool(exact.any()):  # float32 products on ghat
        ghat = codes.simulated_grad(grad, mn, mx, levels, gbits, seed)
        if need_a:
            da = ghat @ b_hat().transpose(-2, -1)
        if need_b:
            db = a_hat().transpose(-2, -1) @ ghat
        return da, db
    wide = None if bool(exact.all()) else (~exact).nonzero().view(-1)
    ghat, t, sg, c, _ = codes.bf16_grad_codes(grad, mn, mx, levels, gbits, values=wide is not None, seed=seed)
    if gating is not None and gating.one_group:  # one option group: one s_g and c
        sg, c = sg[:1], c[:1]
    if need_a:
        rowsum = qb.sum(-1, dtype=torch.float32).unsqueeze(-2)  # (..., 1, K): ones @ q_b^T
        da = codes.scale_out(t @ qb.transpose(-2, -1), sg.new_ones(1), None, sg * sb).add_(
            rowsum.mul_(codes.per_row_view(c * sb, rowsum)))
    if need_b:
        colsum = qa.sum(-2, dtype=torch.float32).unsqueeze(-1)  # (..., K, 1): q_a^T @ ones
        db = codes.scale_out(qa.transpose(-2, -1) @ t, sg.new_ones(1), None, sa * sg).add_(
            colsum.mul_(codes.per_row_view(c * sa, colsum)))
    if wide is not None:  # those samples' entries again, in float32 on ghat (no product mixes samples)
        g_w = codes.take_samples(ghat, wide)
        if need_a:
            da.index_copy_(0, wide, g_w @ codes.take_samples(b_hat(), wide).transpose(-2, -1))
        if need_b:
            db.index_copy_(0, wide, codes.take_samples(a_hat(), wide).transpose(-2, -1) @ g_w)
    return da, db


# -- the static (ungated) product as registered torch ops: fracpass::bf16_mm encodes both operands as
# bfloat16 codes and multiplies them, fracpass::bf16_mm_backward quantizes dL/dy and runs both gradient
# products (_grads, gated_bmm's arithmetic too); autograd, fakes and the codes passed as outputs as int8_mm's.

@torch.library.custom_op("fracpass::bf16_mm", mutates_args=())
def bf16_mm(a: Tensor, b: Tensor, a_mn: Tensor, a_mx: Tensor, a_levels: float, b_mn: Tensor, b_mx: Tensor,
            b_levels: float, g_bits: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y = a_hat @ b_hat (broadcast as torch.matmul) on bfloat16 codes over per-tensor ranges, and the codes
    and scales (qa, sa, qb, sb) for the backward; ``g_bits`` is the backward's."""
    qa, sa = codes.bf16_codes(a, a_mn, a_mx, a_levels)
    qb, sb = codes.bf16_codes(b, b_mn, b_mx, b_levels)
    y = codes.scale_out(torch.matmul(qa, qb), sa.new_ones(1), None, sa * sb)
    return y, qa, sa, qb, sb


@bf16_mm.register_fake
def _bf16_mm_fake(a, b, a_mn, a_mx, a_levels, b_mn, b_mx, b_levels, g_bits):
    y = torch.empty_like(torch.matmul(a, b))  # matmul's output shape; scale_out writes float32 in its layout
    return (y, torch.empty_like(a, dtype=torch.bfloat16), a.new_empty((1,)), torch.empty_like(b, dtype=torch.bfloat16),
            b.new_empty((1,)))


@torch.library.custom_op("fracpass::bf16_mm_backward", mutates_args=())
def bf16_mm_backward(grad: Tensor, qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, g_bits: int, needs: List[bool],
                     seed: Tensor) -> Tuple[Tensor, Tensor]:
    """(da, db) of bf16_mm from dL/dy, each summed to its operand's shape (torch.matmul's broadcast); empty
    where ``needs`` is False. ``seed``: the stochastic rounding's where the CPU kernels run, else empty."""
    da, db = _grads(grad, qa, sa, qb, sb, g_bits, None, needs[0], needs[1], seed if seed.numel() else None)
    da = da.sum_to_size(qa.shape).contiguous() if needs[0] else grad.new_empty(0)
    db = db.sum_to_size(qb.shape).contiguous() if needs[1] else grad.new_empty(0)
    return da, db


@bf16_mm_backward.register_fake
def _bf16_mm_backward_fake(grad, qa, sa, qb, sb, g_bits, needs, seed):
    return (grad.new_empty(qa.shape if needs[0] else (0,)), grad.new_empty(qb.shape if needs[1] else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[1:])  # the bfloat16 codes and their scales, never the float operands
    ctx.g_bits = inputs[-1]


def _backward(ctx, grad, *_codes_grads):
    needs = [bool(n) for n in ctx.needs_input_grad[:2]]
    seed = (draw_seed() if ctx.g_bits < FULL_PRECISION and fused_kernels(grad) is not None
            else grad.new_empty(0, dtype=torch.int64))
    da, db = torch.ops.fracpass.bf16_mm_backward(grad, *ctx.saved_tensors, ctx.g_bits, needs, seed)
    return (da if needs[0] else None, db if needs[1] else None) + (None,) * 7


bf16_mm.register_autograd(_backward, setup_context=_setup_context)


def product(a: Tensor, b: Tensor, qa, qb, gbits: int) -> Tensor:
    """qa(a) @ qb(b) on bfloat16 codes (fracpass::bf16_mm), the quantizers' ranges tracked here."""
    with torch.no_grad():
        (a_mn, a_mx), (b_mn, b_mx) = qa.qrange(a), qb.qrange(b)
    return torch.ops.fracpass.bf16_mm(a, b, a_mn, a_mx, float(2**qa.bits - 1), b_mn, b_mx, float(2**qb.bits - 1),
                                      gbits)[0]


def gated_matmul(a: Tensor, b: Tensor, qa, qb, gq, gate: Tensor, site: Optional[NativeSite] = None) -> Tensor:
    """A gated batched product (attention's q k^T and P v in a gated block): each sample's entries at
    its option's bits over its option group's range, as bfloat16 codes; the product on bfloat16, each
    sample's scales on its entries of the output."""
    why = decide.decide(qa, qb, gq, path="bf16", device=a.device)[0] != "bf16" or decide.gated_matmul_reason(
        a, b, qa, qb, gate, site_options(site))
    if why:
        if why is not True:
            record(site, why)
        return quantized(gq, torch.matmul(quantized(qa, a, gate), quantized(qb, b, gate)), gate)
    record(site, None)
    with torch.no_grad():
        choice = gate.detach().argmax(1)
        act_levels = qa.option_levels.to(torch.float32)
        (mn_a, mx_a), (mn_b, mx_b) = qa.row_range(a, choice), qb.row_range(b, choice)
        mn_a, mx_a, mn_b, mx_b = (v.float().contiguous() for v in (mn_a, mx_a, mn_b, mx_b))
        ca, sa = codes.bf16_codes(a.detach(), mn_a, mx_a, act_levels[choice])
        cb, sb = codes.bf16_codes(b.detach(), mn_b, mx_b, act_levels[choice])
        one_group = gated.one_group_of(choice)
    gating = gated.Gating(choice, mn_a, mx_a, act_levels,
                     gq.option_levels.to(torch.float32) if isinstance(gq, GatedGradQuant) else None, one_group,
                     mn_b, mx_b)
    if one_group:
        sa, sb = sa[:1], sb[:1]
    return gated_bmm(a, b, gate, ca, sa, cb, sb, decide.grad_bits(gq), *gating[:6], mn_b, mx_b)
