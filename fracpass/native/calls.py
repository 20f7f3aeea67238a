"""The native calls the lower-native pass puts in the graph, and the one table that describes them.

Each call takes the op's arguments, then its quantizer modules (aq, wq, gq), for a gated op its gate's
one-hot choice, and the keyword ``site`` (its NativeSite: options and last-call record). It picks its
path on every call from the quantizers' current bits (so ``set_stage`` needs no re-trace) and runs the
format's product, or the simulated group (the quantizer modules in sequence, bit for bit the simulated
graph).

``CALLS`` holds one ``CallRule`` per native call: the op kind it computes (its cost and coverage rules
come from the registry's entry of that kind), where its quantizer arguments start, and which F function
it lowers. Adding a native op is a call function and a rule here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fracpass import registry
from fracpass.gating import GatedActQuant, GatedGradQuant
from fracpass.native import (bf16_conv, bf16_mm, breaks, codes, conv_bn, conv_state, decide, gated, int8_conv, int8_conv2d,
                             int8_mm, layout)
from fracpass.native.site import NativeSite, quantized, record, site_options


def native_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], aq: Optional[nn.Module],
                  wq: Optional[nn.Module], gq: Optional[nn.Module], gate: Optional[Tensor] = None, *,
                  site: Optional[NativeSite] = None) -> Tensor:
    """``gq(F.linear(aq(x), wq(weight), bias))``, on int8 codes where the current bits allow; a gated
    linear (``gate``: its gate's one-hot choice) on bfloat16 codes with per-sample scales."""
    opts = site_options(site)
    if gate is not None:
        return gated.gated_linear(x, weight, bias, aq, wq, gq, gate, site)
    why = decide.decide(aq, wq, gq, device=x.device)[0] != "int8" or decide.linear_reason(x, weight, aq, wq, opts)
    if why:
        if why is not True:
            record(site, why)
        return quantized(gq, F.linear(quantized(aq, x), quantized(wq, weight), bias))
    record(site, None)
    x2 = x.reshape(-1, x.shape[-1])
    with torch.no_grad():  # the ranges tracked here, the codes made in the op
        ranges = aq.qrange(x), wq.qrange(weight)
    fp8 = int8_mm.int8_call_fp8(site, aq, wq, gq, x.device, *x2.shape, weight.shape[0])
    y = int8_mm.product(x2, weight, bias, ranges[0], aq, ranges[1], wq, decide.grad_bits(gq), fp8, b_rows=True)
    return y.view(*x.shape[:-1], weight.shape[0])


def native_matmul(a: Tensor, b: Tensor, qa: Optional[nn.Module], qb: Optional[nn.Module],
                  gq: Optional[nn.Module], gate: Optional[Tensor] = None, *, site: Optional[NativeSite] = None) -> Tensor:
    """``gq(torch.matmul(qa(a), qb(b)))`` where the bits allow: on int8 codes for a 2-D right operand,
    on bfloat16 codes for a batched one (torch.bmm, attention's products), gated ones (``gate``: its
    gate's one-hot choice) with per-sample scales."""
    opts = site_options(site)
    if gate is not None:
        return bf16_mm.gated_matmul(a, b, qa, qb, gq, gate, site)
    path = "int8" if b.dim() == 2 else "bf16"
    why = decide.decide(qa, qb, gq, path=path, device=a.device)[0] != path or (
        decide.matmul_reason(a, b, qa, qb, opts) if path == "int8" else decide.batched_matmul_reason(a, b, qa, qb, opts))
    if why:
        if why is not True:
            record(site, why)
        return quantized(gq, torch.matmul(quantized(qa, a), quantized(qb, b)))
    record(site, None)
    if site is not None:
        site.last.path = path  # op_paths reports the path of the last call
    if path == "bf16":
        return bf16_mm.product(a, b, qa, qb, decide.grad_bits(gq))
    a2 = a.reshape(-1, a.shape[-1])
    with torch.no_grad():
        ranges = qa.qrange(a), qb.qrange(b)
    fp8 = int8_mm.int8_call_fp8(site, qa, qb, gq, a.device, *a2.shape, b.shape[1])
    y = int8_mm.product(a2, b, None, ranges[0], qa, ranges[1], qb, decide.grad_bits(gq), fp8, b_rows=False)
    return y.view(*a.shape[:-1], b.shape[1])


def _bf16_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, transposed: bool,
               output_padding, groups: int, aq, wq, gq, gate, simulated, site: Optional[NativeSite], fused=None,
               handed: Optional[conv_bn.Handover] = None, give: Optional[bool] = None):
    """The convolution on bf16 codes where the bits and sizes allow, else ``simulated``; ``fused`` (bn,
    act, residual, bn_first): the BatchNorm (then residual add, then ReLU) that follows it, run in the
    same op (fracpass::bf16_conv_bn) or, on the simulated route, as the unfused graph runs them. ``handed``:
    what the fused op that wrote x gives this call (its range; its gradient placeholders if this call is
    x's only reader). ``give`` (a fused call that FuseNativeBNPass wired to its readers): return
    (out, conv_bn.Handover) instead of out, the placeholders in it if ``give`` is True (out's only
    reader is a 2-D convolution call that reads it once)."""
    out = _bf16_conv_out(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, aq, wq, gq,
                         gate, simulated, site, fused, handed, bool(give))
    if isinstance(out, Tensor):  # simulated, or unfused
        return out if give is None else (out, conv_bn.Handover())
    y, low, high, *placeholders = out[:6]  # then what its backward reads
    if give is None:
        return y
    given = lambda t: t if t.numel() else None  # the fused op's outputs are empty where it has none
    return y, conv_bn.Handover(given(low), given(high), tuple(placeholders) if placeholders[0].numel() else None)


def _bf16_conv_out(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, aq, wq, gq, gate,
                   simulated, site, fused, handed, give):
    """_bf16_conv's work: out, or the fused op's outputs (fracpass::bf16_conv_bn's)."""
    opts = site_options(site)
    known = handed.known_range if handed is not None and gate is None else None
    why = (decide.decide(aq, wq, gq, path="bf16", device=x.device)[0] != "bf16"
           or decide.bf16_conv_reason(x, weight, padding, aq, wq, transposed, gate)
           or decide.conv_size_reason(x, weight, stride, padding, dilation, transposed, opts))
    if why:
        if why is not True:
            record(site, why)
        y = quantized(gq, simulated(quantized(aq, x, gate, known), quantized(wq, weight)), gate)
        return y if fused is None else conv_bn.unfused(y, *fused)
    record(site, None)
    n = weight.dim() - 2
    if n == 2 and not transposed and opts.channels_last:  # its products' fast forms are channels-last ones
        x, fused = _channels_last(x, fused, site)
    conv = (decide.tuple_arg(stride, n), decide.tuple_arg(padding, n), decide.tuple_arg(dilation, n), transposed,
            decide.tuple_arg(output_padding, n), groups)
    gating, kept, take, finite = None, None, (None, None, None), None
    gated_call = isinstance(aq, GatedActQuant) or isinstance(gq, GatedGradQuant)
    # the hand-over between fused ops is decided from values: eager execution only (docs/native.md)
    hand = opts.hand_gradient and not torch.compiler.is_compiling()
    if not gated_call:
        with torch.no_grad():
            mn, mx = aq.qrange(x, known)
            # a NaN or Inf in x leaves it without codes: the ops then compute what the simulation does (NaN;
            # ConvState.finite, read inside them), the codes made over a stand-in range are never read
            finite = decide.finite_range(mn, mx)
            mn, mx = torch.where(finite, mn, torch.zeros_like(mn)), torch.where(finite, mx, torch.ones_like(mx))
    with torch.no_grad():
        qw, sw = codes.bf16_codes(weight.detach(), *wq.qrange(weight), float(2**wq.bits - 1))
        if gated_call:
            choice = gate.detach().argmax(1)
            act = isinstance(aq, GatedActQuant)
            mn, mx = aq.row_range(x, choice) if act else aq.qrange(x)
            levels = aq.option_levels.to(torch.float32)[choice] if act else float(2**aq.bits - 1)
            qa, sa = codes.bf16_codes(x.detach(), mn.float().contiguous(), mx.float().contiguous(), levels)
            one_group = gated.one_group_of(choice)  # every sample at one option: one scale for all
            gating = gated.Gating(choice, mn.float().contiguous(), mx.float().contiguous(),
                                  aq.option_levels.to(torch.float32) if act else None,
                                  gq.option_levels.to(torch.float32) if isinstance(gq, GatedGradQuant) else None,
                                  one_group)
            sa = sa[:1] if one_group else sa
        else:
            forward, dx, dw = int8_conv.int8_reasons(x, weight, conv, sw, decide.grad_bits(gq), opts)
            qa, sa, kept = codes.bf16_input_codes(x.detach(), mn, mx, aq.bits, codes=forward is not None)
            if kept is not None:
                int8_dx = x.requires_grad and dx is None
                if int8_dx and hand and handed is not None and handed.grad is not None:
                    take = handed.grad  # dx's product goes to the fused op before as these placeholders' gradients
                kept = kept._replace(int8_dx=int8_dx, int8_dw=weight.requires_grad and dw is None,
                                     split=opts.split_channels)
    if site is not None:
        site.last.int8 = (qa is None,) + ((kept.int8_dx, kept.int8_dw) if kept is not None else (False, False))
    onehot = gate if gating is not None and gating.act_levels is not None else None
    unfused = None if fused is None else conv_bn.fused_reason(x, *fused)
    keep, state = conv_state.operands(qa, kept, conv, decide.grad_bits(gq), gating, bias is not None, finite)
    if fused is None or unfused:  # a BatchNorm the fused op does not take: run it unfused
        if unfused and site is not None:
            site.last.bn = f"its BatchNorm runs unfused: {unfused}"
        y = bf16_conv.apply(x, weight, bias, onehot, qa, sa, qw, sw, keep, state, take)
        return y if fused is None else conv_bn.unfused(y, *fused)
    bn, act, residual, _ = fused
    outs = conv_bn.apply(x, weight, bias, onehot, qa, sa, qw, sw, keep, state, bn, residual, act is not None,
                         give and hand and torch.is_grad_enabled(), opts.fast_bn, take)
    if site is not None:
        site.last.bn = conv_bn.bn_route(outs[0], sa, residual, opts.fast_bn)
    return outs


def _channels_last(x: Tensor, fused, site: Optional[NativeSite]):
    """(x, fused) with an NCHW x and fused residual converted to channels_last (layout.to_channels_last: their
    gradients go back NCHW); which were converted is kept in the site's record for op_paths."""
    converted = []
    if layout.converts(x):
        x = layout.to_channels_last(x)
        converted.append("input")
    if fused is not None and layout.converts(fused[2]):
        fused = (fused[0], fused[1], layout.to_channels_last(fused[2]), fused[3])
        converted.append("residual")
    if site is not None:
        site.last.converted = tuple(converted)
    return x, fused


def _conv_call(fn):
    """The native form of ``fn`` (F.conv{1,2,3}d): its arguments, then the three quantizers and, for a
    gated op, its gate's one-hot choice."""
    def call(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, aq=None, wq=None, gq=None, gate=None,
             *, handed=None, site=None):
        return _bf16_conv(x, weight, bias, stride, padding, dilation, False, 0, groups, aq, wq, gq, gate,
                          lambda a, w: fn(a, w, bias, stride, padding, dilation, groups), site, handed=handed)

    call.__doc__ = f"``gq({fn.__name__}(aq(x), wq(weight), ...))``, on bfloat16 codes where the bits allow."
    return call


def _conv_bn_call(fn):
    """The native form of ``fn`` (F.conv{1,2,3}d) followed by a BatchNorm module ``bn``, then optionally
    the residual add (``bn(y) + residual``, or ``residual + bn(y)`` if not ``bn_first``) and a ReLU
    (``act``: an nn.ReLU, or "relu" for the functional one): see FuseNativeBNPass."""
    def call(x, weight, bias, stride, padding, dilation, groups, aq, wq, gq, gate, bn, act=None, residual=None,
             bn_first=True, *, give=None, handed=None, site=None):
        return _bf16_conv(x, weight, bias, stride, padding, dilation, False, 0, groups, aq, wq, gq, gate,
                          lambda a, w: fn(a, w, bias, stride, padding, dilation, groups), site,
                          fused=(bn, act, residual, bn_first), handed=handed, give=give)

    call.__doc__ = (f"``act(bn(gq({fn.__name__}(aq(x), wq(weight), ...))) + residual)``, the convolution on "
                    "bfloat16 codes where the bits allow, saving less for backward (fracpass::bf16_conv_bn).")
    return call


def _conv_transpose_call(fn):
    """The native form of ``fn`` (F.conv_transpose{1,2,3}d): its arguments, then the three quantizers
    and, for a gated op, its gate's one-hot choice."""
    def call(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, aq=None, wq=None,
             gq=None, gate=None, *, handed=None, site=None):
        return _bf16_conv(x, weight, bias, stride, padding, dilation, True, output_padding, groups, aq, wq, gq, gate,
                          lambda a, w: fn(a, w, bias, stride, padding, output_padding, groups, dilation), site,
                          handed=handed)

    call.__doc__ = f"``gq({fn.__name__}(aq(x), wq(weight), ...))``, on bfloat16 codes where the bits allow."
    return call


def _named(fn, name: str):
    """``fn`` as this module's ``name``, for fx code and pickles, which find it in this module."""
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    return fn


native_linear = _named(native_linear, "native_linear")  # traceable: the int8 product is a registered op
native_matmul = _named(native_matmul, "native_matmul")  # likewise its int8 and (static) bf16 products
# traceable: the static convolutions' products are registered ops and their Python reads no values
bf16_conv1d = _named(_conv_call(F.conv1d), "bf16_conv1d")
bf16_conv2d = _named(_conv_call(F.conv2d), "bf16_conv2d")
bf16_conv3d = _named(_conv_call(F.conv3d), "bf16_conv3d")
bf16_conv_transpose1d = _named(_conv_transpose_call(F.conv_transpose1d), "bf16_conv_transpose1d")
bf16_conv_transpose2d = _named(_conv_transpose_call(F.conv_transpose2d), "bf16_conv_transpose2d")
bf16_conv_transpose3d = _named(_conv_transpose_call(F.conv_transpose3d), "bf16_conv_transpose3d")
bf16_conv1d_bn = _named(_conv_bn_call(F.conv1d), "bf16_conv1d_bn")
bf16_conv2d_bn = _named(_conv_bn_call(F.conv2d), "bf16_conv2d_bn")
bf16_conv3d_bn = _named(_conv_bn_call(F.conv3d), "bf16_conv3d_bn")
native_conv2d = _named(breaks.eager(int8_conv2d.native_conv2d, "native_conv2d", "it checks its input for a NaN"),
                       "native_conv2d")


@dataclass(frozen=True)
class CallRule:
    """A native call: the registry op kind it computes, the index of its first quantizer argument (aq;
    wq and gq follow), the F function it lowers (None: chosen by the lowering itself), its path family
    ("int8", "bf16", or "mm": int8 for a 2-D right operand, bf16 for a batched one or a gated op),
    its form fused with the BatchNorm after it (FuseNativeBNPass), whether it is such a fused form, and
    whether a fused BatchNorm may hand it its input gradient (a 2-D convolution: int8_conv.int8_input_grad), and
    whether it takes a fused op's conv_bn.Handover (``handed=``: the bf16 convolutions)."""

    fn: Callable
    kind: str
    first_q: int
    lowers: Optional[Callable] = None
    path: str = "bf16"
    fused_form: Optional[Callable] = None
    is_fused: bool = False
    sole_reader: bool = False
    handed: bool = True


CALLS: Dict[Callable, CallRule] = {rule.fn: rule for rule in (
    CallRule(native_linear, "linear", 3, F.linear, "mm", handed=False),
    CallRule(native_matmul, "matmul", 2, torch.matmul, "mm", handed=False),
    CallRule(native_conv2d, "conv2d", 7, None, "int8", handed=False),
    CallRule(bf16_conv1d, "conv1d", 7, F.conv1d, fused_form=bf16_conv1d_bn),
    CallRule(bf16_conv2d, "conv2d", 7, F.conv2d, fused_form=bf16_conv2d_bn, sole_reader=True),
    CallRule(bf16_conv3d, "conv3d", 7, F.conv3d, fused_form=bf16_conv3d_bn),
    CallRule(bf16_conv_transpose1d, "conv_transpose1d", 8, F.conv_transpose1d),
    CallRule(bf16_conv_transpose2d, "conv_transpose2d", 8, F.conv_transpose2d),
    CallRule(bf16_conv_transpose3d, "conv_transpose3d", 8, F.conv_transpose3d),
    CallRule(bf16_conv1d_bn, "conv1d", 7, is_fused=True),
    CallRule(bf16_conv2d_bn, "conv2d", 7, is_fused=True, sole_reader=True),
    CallRule(bf16_conv3d_bn, "conv3d", 7, is_fused=True),
)}
BF16_CONVS = {rule.lowers: rule for rule in CALLS.values() if rule.kind.startswith("conv") and rule.lowers is not None}

# the native calls are the same op kinds for cost analysis and coverage (operands at args 0 and 1)
for _rule in CALLS.values():
    registry.add_functions(_rule.kind, _rule.fn)


def quantizer_modules(gm: nn.Module, node) -> tuple:
    """(aq, wq, gq) of a native call node: the modules its quantizer arguments name (None where absent)."""
    first = CALLS[node.target].first_q
    return tuple(None if r is None else gm.get_submodule(r.target) for r in node.args[first:first + 3])


def site_of(gm: nn.Module, node) -> Optional[NativeSite]:
    """A native call node's NativeSite (None for a call made without one)."""
    ref = node.kwargs.get("site")
    return None if ref is None else gm.get_submodule(ref.target)
