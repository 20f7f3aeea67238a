"""Gated (DFQ) ops' per-sample state, and gated linear layers on bfloat16 codes with per-sample scales."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fracpass.gating import GatedGradQuant, onehot_grad
from fracpass.quant import dense
from fracpass.native import breaks, codes, decide
from fracpass.native.site import NativeSite, quantized, record, site_options

class Gating(NamedTuple):
    """A gated op's per-sample state for bf16_conv.bf16_conv: each sample's option (``choice``), the activation's
    per-sample range and its options' level counts (the gate's gradient needs them), and the gradient
    quantizer's options' level counts (None: the gradient is quantized per tensor, ``gbits``). A batch
    whose samples all chose one option shares one range, so it runs as a static op."""

    choice: Tensor
    mn: Tensor
    mx: Tensor
    act_levels: Optional[Tensor]
    grad_levels: Optional[Tensor]
    one_group: bool  # every sample chose the same option: its scales hold one value for the whole batch
    mn_b: Optional[Tensor] = None  # a gated product's second operand's per-sample range
    mx_b: Optional[Tensor] = None


def _one_option(choice: Tensor) -> bool:
    return bool(choice.min() == choice.max())


# whether every sample chose one option: the op then takes one scale for the batch (and a fused BatchNorm its
# fast route), so the op's outputs depend on it; a host read, where torch.compile breaks the graph
one_group_of = breaks.eager(_one_option, "a gated call", "it checks whether every sample chose one option")


def option_groups(choice: Tensor):
    """(the samples that chose one option, the first of them, whether they are the whole batch) per option
    chosen: a gated op's samples share their scales within such a group."""
    for option in torch.unique(choice).tolist():
        idx = (choice == option).nonzero().view(-1)
        yield idx, int(idx[0]), idx.numel() == choice.numel()


def group_value(v: Tensor, first: int) -> Tensor:
    """A per-sample scale's value for a group (its sample ``first``), or the per-tensor one."""
    return v[first] if v.numel() > 1 else v.reshape(())


def gated_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], aq, wq, gq, gate: Tensor,
                 site: Optional[NativeSite] = None) -> Tensor:
    """A gated linear layer: each sample's rows (x is (B, ..., K)) at its option's bits over its option
    group's range, as bfloat16 codes; the product on bfloat16 (float32 accumulation), the scales per
    row (the sample's) and per output column (the weight's) applied to its output."""
    why = decide.decide(aq, wq, gq, path="bf16", device=x.device)[0] != "bf16" or decide.gated_linear_reason(
        x, weight, aq, wq, gate, site_options(site))
    if why:
        if why is not True:
            record(site, why)
        return quantized(gq, F.linear(quantized(aq, x, gate), quantized(wq, weight), bias), gate)
    record(site, None)
    batch = x.shape[0]
    per = x.numel() // (batch * x.shape[-1])  # rows per sample
    with torch.no_grad():
        choice = gate.detach().argmax(1)
        mn, mx = aq.row_range(x, choice)
        mn, mx = mn.float().contiguous(), mx.float().contiguous()
        act_levels = aq.option_levels.to(torch.float32)
        one_group = one_group_of(choice)
        qa, sa = codes.bf16_codes(x.detach().reshape(batch, -1), mn, mx, act_levels[choice])  # per sample, memory order
        qw, sw = codes.bf16_codes(weight.detach(), *wq.qrange(weight), float(2**wq.bits - 1))
    gating = Gating(choice, mn, mx, act_levels,
                     gq.option_levels.to(torch.float32) if isinstance(gq, GatedGradQuant) else None, one_group)
    sa = sa[:1] if one_group else sa
    y = gated_linear_op(x, weight, bias, gate, qa.view(-1, x.shape[-1]), sa, qw, sw, per,
                        decide.grad_bits(gq), *gating[:5], one_group)
    return y.view(*x.shape[:-1], weight.shape[0])


def _sample_rows(samples: Tensor, per: int) -> Tensor:
    """The row indices of ``samples`` when each sample holds ``per`` consecutive rows."""
    return (samples.view(-1, 1) * per + torch.arange(per, device=samples.device)).view(-1)


def _rows(v: Tensor, per: int) -> Tensor:
    """A per-sample vector repeated for each of the sample's ``per`` rows (a per-tensor one as is)."""
    return v if v.numel() == 1 else v.repeat_interleave(per)


@torch.library.custom_op("fracpass::gated_linear", mutates_args=())
def gated_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], onehot: Tensor, qa: Tensor, sa: Tensor,
                    qw: Tensor, sw: Tensor, per: int, gbits: int, choice: Tensor, mn: Tensor, mx: Tensor,
                    act_levels: Tensor, grad_levels: Optional[Tensor], one_group: bool) -> Tensor:
    """y = x_hat w_hat^T (+ bias) for a gated linear layer on bfloat16 codes, x as R = B x per rows (qa,
    (R, K)): forward s_a[r] s_w[n] (q_a q_w^T); backward (fracpass::gated_linear_backward) dx = s_g[r] (t q_w)
    s_w + c[r] s_w colsum(q_w) with per-tensor weights (with per-channel ones, whose scale lies on the
    contracted axis, q_w s_w / max(s_w) rounded once to bfloat16 takes q_w's place and max(s_w) s_w's:
    bf16_conv.folded_weight's bound), dw once per option group (the rows' scales lie on its contracted axis);
    rows of samples whose gradient option exceeds 8 bits in float32 on ghat. Each product's output is
    rounded to bfloat16 (unit roundoff 2^-8), as on the convolution path. x, weight and onehot (the gate's
    one-hot choice) are inputs for their gradients; the gating state (choice, the per-sample range, the
    options' level counts) is the Gating's, flattened."""
    v = qa @ qw.t()  # bfloat16 codes, float32 accumulation, bfloat16 out
    return codes.scale_out(v, sw.reshape(-1), bias, _rows(sa, per))


@gated_linear_op.register_fake
def _gated_linear_fake(x, weight, bias, onehot, qa, sa, qw, sw, per, gbits, choice, mn, mx, act_levels, grad_levels,
                       one_group):
    return qa.new_empty((qa.shape[0], qw.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fracpass::gated_linear_backward", mutates_args=())
def gated_linear_backward(grad: Tensor, qa: Tensor, sa: Tensor, qw: Tensor, sw: Tensor, x: Tensor, onehot: Tensor,
                          per: int, gbits: int, choice: Tensor, mn: Tensor, mx: Tensor, act_levels: Tensor,
                          grad_levels: Optional[Tensor], one_group: bool, needs: List[bool],
                          x_shape: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw, dbias, d_onehot) of fracpass::gated_linear from dL/dy; empty where ``needs`` (x, weight, bias,
    onehot) is False. ``x`` and ``onehot``: the forward's, for the gate's gradient (else empty). The gradient
    is quantized as the gated gradient quantizer would, drawing its noise as it does."""
    gating = Gating(choice, mn, mx, act_levels, grad_levels, one_group)
    need_x, need_w, need_b, need_gate = needs
    dx, dw, db, d_onehot = _linear_grads(grad, qa, sa, qw, sw, x if need_gate else None, onehot if need_gate else None,
                                         per, gbits, gating, need_x, need_w, need_b)
    none = lambda v: grad.new_empty(0) if v is None else v  # a fresh one each: outputs never alias
    return none(dx.view(x_shape) if need_x else None), none(dw), none(db), none(d_onehot)


@gated_linear_backward.register_fake
def _gated_linear_backward_fake(grad, qa, sa, qw, sw, x, onehot, per, gbits, choice, mn, mx, act_levels, grad_levels,
                                one_group, needs, x_shape):
    need_x, need_w, need_b, need_gate = needs
    return (grad.new_empty(tuple(x_shape) if need_x else (0,)), grad.new_empty(tuple(qw.shape) if need_w else (0,)),
            grad.new_empty((qw.shape[0],) if need_b else (0,)),
            grad.new_empty(tuple(onehot.shape) if need_gate else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, onehot, qa, sa, qw, sw, per, gbits, choice, mn, mx, act_levels, grad_levels, one_group = inputs
    ctx.gate_grad = onehot.requires_grad
    keep = (x, onehot) if ctx.gate_grad else (x.new_empty(0), onehot.new_empty(0))
    ctx.save_for_backward(qa, sa, qw, sw, *keep, choice, mn, mx, act_levels,
                          grad_levels if grad_levels is not None else act_levels.new_empty(0))
    ctx.per, ctx.gbits, ctx.one_group, ctx.has_bias, ctx.x_shape = per, gbits, one_group, bias is not None, list(x.shape)


def _backward(ctx, grad):
    qa, sa, qw, sw, x, onehot, choice, mn, mx, act_levels, grad_levels = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
             ctx.has_bias and bool(ctx.needs_input_grad[2]), ctx.gate_grad]
    dx, dw, db, d_onehot = gated_linear_backward(
        grad, qa, sa, qw, sw, x, onehot, ctx.per, ctx.gbits, choice, mn, mx, act_levels,
        grad_levels if grad_levels.numel() else None, ctx.one_group, needs, ctx.x_shape)
    picked = lambda v, need: v if need else None
    return (picked(dx, needs[0]), picked(dw, needs[1]), picked(db, needs[2]), picked(d_onehot, needs[3])) + (None,) * 12


gated_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _linear_grads(grad, qa, sa, qw, sw, x, onehot, per, gbits, gating: Gating, need_w_x: bool, need_w: bool,
                  need_b: bool):
    """The gated linear product's gradients (dx as (R, K), dw, dbias, d_onehot; None where not needed),
    from dL/dy. ``x`` and ``onehot``: given where the gate's gradient is needed (it is computed from dx)."""
    batch = gating.choice.numel()
    gate_grad = onehot is not None
    need_x = need_w_x or gate_grad  # the gate's gradient is computed from dx
    g = dense(grad).view(batch, -1)  # per sample, in the memory order the gradient quantizer reads
    mn, mx, levels = codes.grad_range(g, gbits, gating)
    exact = codes.exact_codes(levels)
    w_hat = lambda: qw.float().mul_(sw.view(-1, 1) if sw.numel() > 1 else sw)
    dx = dw = db = None
    if exact is None or not bool(exact.any()):  # no bf16-exact gradient codes: float32 products on ghat
        ghat = codes.simulated_grad(g, mn, mx, levels, gbits).view(-1, qw.shape[0])
        if need_x:
            dx = ghat @ w_hat()
        if need_w:
            dw = ghat.t() @ qa.float().mul_(_rows(sa, per).view(-1, 1) if sa.numel() > 1 else sa)
    else:
        wide = None if bool(exact.all()) else (~exact).nonzero().view(-1)
        ghat, t, sg, c, _ = codes.bf16_grad_codes(g, mn, mx, levels, gbits, values=wide is not None)
        if gating.one_group:
            sg, c = sg[:1], c[:1]
        t = t.view(-1, qw.shape[0])
        ghat = None if ghat is None else ghat.view(-1, qw.shape[0])
        if need_x:
            if sw.numel() > 1:  # per-channel: the scale folded into bfloat16 weight values, the offset's sums in float32
                sx = sw.max().reshape(1)
                values = qw.float().mul_((sw / sx).view(-1, 1))
                qw_x, colsum = values.to(torch.bfloat16), values.sum(0)
            else:
                sx, qw_x, colsum = sw, qw, qw.sum(0, dtype=torch.float32)  # exact: integer codes
            if sg.numel() > 1:
                dx = codes.scale_out(t @ qw_x, sx, None, _rows(sg, per)).addr_(_rows(c, per), colsum.mul_(sx))
            else:
                dx = codes.scale_out(t @ qw_x, sg * sx, None).add_(colsum.mul_(c * sx))
            if wide is not None:  # those samples' rows again, in float32 on ghat
                rows = _sample_rows(wide, per)
                dx.index_copy_(0, rows, ghat.index_select(0, rows) @ w_hat())
        if need_w:
            dw = _grouped_linear_weight_grad(t, ghat, qa, sa, sg, c, gating, exact, per)
    if need_b:
        if ghat is not None:
            db = ghat.sum(0)
        elif sg.numel() > 1:
            db = (t.float().t() @ _rows(sg, per)).add_(c.sum() * per)
        else:
            db = t.sum(0, dtype=torch.float32).mul_(sg).add_(c * t.shape[0])
    d_onehot = None
    if gate_grad:
        d_onehot = onehot_grad(x.reshape(batch, -1), gating.mn, gating.mx, gating.act_levels, onehot,
                               dx.view(batch, -1))
    return dx, dw, db, d_onehot


def _grouped_linear_weight_grad(t: Tensor, ghat: Optional[Tensor], qa: Tensor, sa: Tensor, sg: Tensor, c: Tensor,
                                gating: Gating, exact: Tensor, per: int) -> Tensor:
    """dw = sum over rows of ghat[r]^T x_hat[r]: the rows' scales lie on its contracted axis, so one
    bf16 product per option group (whose rows share s_a, s_g and c), float32 on ghat for a group whose
    gradient codes are not exact in bfloat16."""
    dw = None
    for samples, first, whole in option_groups(gating.choice):
        rows = None if whole else _sample_rows(samples, per)
        s_a = group_value(sa, first)
        qa_k = qa if rows is None else qa.index_select(0, rows)
        if not bool(group_value(exact, first)):
            g_k = ghat if rows is None else ghat.index_select(0, rows)
            part = g_k.t() @ qa_k.float().mul_(s_a)
        else:
            t_k = t if rows is None else t.index_select(0, rows)
            s_g, c_k = group_value(sg, first), group_value(c, first)
            part = codes.scale_out(t_k.t() @ qa_k, (s_a * s_g).reshape(1), None).add_(
                qa_k.sum(0, dtype=torch.float32).mul_(c_k * s_a))
        dw = part if dw is None else dw.add_(part)
    return dw
