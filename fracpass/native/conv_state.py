"""A bf16 convolution's state between its call and its ops: ConvState (what the backward reads besides the
saved tensors), the input codes it keeps (saved_codes, operands), and the flat form in which the registered
ops (fracpass::bf16_conv, fracpass::bf16_conv_bn and their backward ops) take it as arguments and keep it
on their autograd context (flat, unflat, save_flat, saved_flat), with the seed and the gradients their
backward returns (grad_seed, dense_grads)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fracpass.quant import FULL_PRECISION, draw_seed, rows_outer_dense, value_range
from fracpass.native import gated, units


class ConvState(NamedTuple):
    """What a bf16 convolution's backward reads besides its saved tensors (conv_backward): the
    convolution's arguments (stride, padding, dilation, transposed, output_padding, groups), the
    gradient's bits, the gated op's state (None: static), whether the gate's one-hot choice needs its
    gradient (computed from dx), whether dx's and dw's products run on int8 (int8_conv.int8_reasons) with
    the weight codes' split limit, the offset of the saved input codes when they are bytes q - offset
    (saved_codes; None: the bfloat16 codes; a 0-d tensor at the call, a float inside the ops), ``hand``: the
    shape and strides of the fused output x whose placeholders may take dx's int8 product
    (conv_bn.Handover.grad), or None, and ``finite``: whether the input's range is finite (a 0-d bool
    tensor, read inside the ops; None: not checked). A non-finite input has no codes: the ops then compute
    what the simulation does, whose quantized input is NaN everywhere (conv_product, conv_backward)."""

    conv: tuple
    gbits: int
    gating: Optional[gated.Gating] = None
    has_bias: bool = False
    gate_grad: bool = False
    int8: Tuple[bool, bool] = (False, False)
    split: float = 0.0
    code_offset: Optional[float] = None
    hand: Optional[tuple] = None
    finite: Optional[Tensor] = None

    def has_codes(self) -> bool:
        """Whether the op's input has codes: a finite range (inside an op: a host read of a CPU tensor is a load)."""
        return self.finite is None or bool(self.finite)


def saved_codes(q: Optional[Tensor], kept: Optional[tuple], narrow: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """The input codes a bf16 convolution keeps for backward, and their offset: as bytes q - offset when
    they span at most 256 values, as a per-tensor quantizer's codes always do (a gated op's rows may not),
    in one byte per element instead of bfloat16's two; else q itself (offset None). ``kept``: those bytes
    and their offset, already made by the encoding kernel (codes.bf16_input_codes: no pass over q here).
    Without ``narrow`` (a call torch.compile traces: whether q fits is a value) q stays as it is then. The
    offset is a 0-d float32 tensor."""
    if kept is not None:
        return kept[0], kept[1]
    ext = units.ext(q)
    if not narrow or ext is None or q.numel() == 0 or not rows_outer_dense(q):
        return q, None
    lo, hi = (float(m) for m in value_range(q))
    if hi - lo > 255:
        return q, None
    return ext.codes_to_u8(q, lo), torch.tensor(lo)


def flat(state: ConvState) -> list:
    """A ConvState as fracpass::bf16_conv's (and bf16_conv_bn's) arguments ``code_offset`` .. ``finite``."""
    stride, padding, dilation, transposed, output_padding, groups = state.conv
    g = state.gating if state.gating is not None else gated.Gating(None, None, None, None, None, False)
    return [state.code_offset, *state.int8, state.split, list(stride), list(padding), list(dilation), transposed,
            list(output_padding), groups, state.gbits, *g[:6], state.finite]


def unflat(args, has_bias: bool = False, gate_grad: bool = False, hand_shape=(), hand_stride=()) -> ConvState:
    """flat()'s inverse inside an op (the codes' offset as a float), with the backward's settings:
    ``hand_shape`` and ``hand_stride`` (empty: no hand-over)."""
    (code_offset, int8_dx, int8_dw, split, stride, padding, dilation, transposed, output_padding, groups, gbits,
     choice, mn, mx, act_levels, grad_levels, one_group, finite) = args
    gating = None if choice is None else gated.Gating(choice, mn, mx, act_levels, grad_levels, one_group)
    hand = (torch.Size(hand_shape), tuple(hand_stride)) if hand_shape else None
    offset = None if code_offset is None else float(code_offset)
    return ConvState((list(stride), list(padding), list(dilation), transposed, list(output_padding), groups), gbits,
                     gating, has_bias, gate_grad, (int8_dx, int8_dw), split, offset, hand, finite)


FLAT = 18  # flat()'s length
_TENSOR_ARGS = (0, 11, 12, 13, 14, 15, 17)  # flat()'s tensors: the offset, the gated state, finite


def save_flat(ctx, args, *tensors) -> None:
    """Keep flat() arguments and ``tensors`` on an op's autograd ctx (the tensors saved; None as empty)."""
    empty = torch.empty(0)
    flat_tensors = [args[i] for i in _TENSOR_ARGS]
    ctx.save_for_backward(*(empty if t is None else t for t in (*tensors, *flat_tensors)))
    ctx.flat = [None if i in _TENSOR_ARGS else a for i, a in enumerate(args)]


def saved_flat(ctx) -> Tuple[list, tuple]:
    """save_flat's (arguments, tensors), None for an empty one."""
    saved = [t if t.numel() else None for t in ctx.saved_tensors]
    n = len(saved) - len(_TENSOR_ARGS)
    args = list(ctx.flat)
    for i, t in zip(_TENSOR_ARGS, saved[n:]):
        args[i] = t
    return args, tuple(saved[:n])


def grad_seed(args) -> Optional[Tensor]:
    """The seed of a backward's stochastic rounding (quant.draw_seed, drawn where the simulation's gradient
    quantizer draws it: a graph op under torch.compile, the same noise as eager) when flat() ``args`` round
    the gradient per tensor; None when it is not quantized or is rounded per sample (gated: its rows draw
    theirs)."""
    gbits, grad_levels = args[10], args[15]
    return draw_seed() if gbits < FULL_PRECISION and grad_levels is None else None


def dense_grads(needs, grads, handed, hand: bool, gap: int = FLAT + 5) -> tuple:
    """An op's gradients from its backward op's outputs: None where not needed, dx None where it was handed
    over (then the placeholders' gradients are the handed product, scale and addend); ``gap``: the Nones
    between the gradients and the placeholders' (bf16_conv's other inputs)."""
    handed_over = hand and handed[0].numel() > 0
    picked = lambda v, need: v if need else None
    out = [picked(g, need and not (i == 0 and handed_over)) for i, (g, need) in enumerate(zip(grads, needs))]
    return tuple(out) + (None,) * gap + (picked(handed[0], handed_over), picked(handed[1], handed_over),
                                             picked(handed[2], handed_over and handed[2].numel() > 0))


def operands(qa: Optional[Tensor], kept: Optional[tuple], conv, gbits: int, gating: Optional[gated.Gating],
             has_bias: bool, finite: Optional[Tensor] = None) -> Tuple[Tensor, ConvState]:
    """A native call's input codes to keep (saved_codes) and its ConvState: ``qa`` the bfloat16 input codes (or,
    None, their bytes in ``kept``: codes.bf16_input_codes's, with whether the gradients' products run on int8).
    A static call (no ``gating``), and any call torch.compile traces (whether codes fit a byte is a value), keeps its
    codes narrowed only as the kernel made them: the same values, in two bytes per element instead of one."""
    keep, offset = saved_codes(qa, kept, narrow=gating is not None and not torch.compiler.is_compiling())
    flags = ((kept.int8_dx, kept.int8_dw), kept.split) if kept is not None else ((False, False), 0.0)
    return keep, ConvState(tuple(conv), gbits, gating, has_bias, False, *flags, offset, None, finite)
