"""The offset corrections of products of shifted codes: window sums of ones against the codes."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fracpass.quant import memory_rows, rows_outer_dense
from fracpass.native import units

def _window_kernels(t: Tensor, qa: Tensor, qw: Tensor, args):
    """The CPU kernels for the offset corrections' window sums (ones_input_grad / window_sums), with the
    output's height and width (t's) and the geometry as they take it, where they apply: a 2-D
    convolution, ungrouped, not transposed; else None (a convolution of ones runs instead)."""
    stride, padding, dilation, transposed, _, groups = args
    ext = units.ext(qa)
    if ext is None or transposed or groups != 1 or qw.dim() != 4 or qa.dim() != 4:
        return None
    return ext, (t.shape[2], t.shape[3]), (list(stride), list(padding), list(dilation))


def ones_input_grad(t: Tensor, qa: Tensor, qw: Tensor, args) -> Tensor:
    """conv^T(1, q_w) over one sample, float32 in q_a's layout: the input gradient of a gradient of ones
    (dx's offset correction), exact (integer sums under 2^24) from the kernels, else a bf16 convolution
    of ones rounded to bfloat16."""
    window = _window_kernels(t, qa, qw, args)
    if window is not None:
        ext, (ho, wo), geometry = window
        corr = ext.ones_input_grad(qw, qa.shape[2], qa.shape[3], ho, wo, *geometry)  # channels_last
        return corr if qa.stride(1) == 1 else corr.contiguous()
    ones = t.new_ones((1,) + tuple(t.shape[1:]))
    return torch.ops.aten.convolution_backward(ones, qa[:1], qw, None, *args, [True, False, False])[0].float()


def ones_weight_grad(t: Tensor, qa: Tensor, qw: Tensor, args, factor: Tensor,
                      total: Optional[Tensor] = None) -> Tensor:
    """factor * conv_w(1, q_a) as float32 in the weight's shape: the window sums of the input codes.
    They are the same for every sample's ones, so q_a is summed over the batch first (exact in float32:
    |q_a| <= 255; ``total``: that sum, when already made) and the sums are taken once per group, on one
    sample, then expanded to the group's output channels (a one-channel convolution over the whole batch
    cost 60 % of the main product)."""
    stride, padding, dilation, transposed, output_padding, groups = args
    total = _batch_sum(qa) if total is None else total
    window = _window_kernels(t, qa, qw, args)
    if window is not None:  # the window sums from the kernel (float64 sums, rounded once)
        ext, (ho, wo), geometry = window
        return ext.window_sums(total, qw.shape[2], qw.shape[3], ho, wo, *geometry).mul_(factor).expand(qw.shape)
    ones = t.new_ones((1, groups) + tuple(t.shape[2:]), dtype=torch.float32)
    if transposed:  # weight (C_in, C_out / groups, k...)
        probe = total.new_empty((qw.shape[0], 1) + tuple(qw.shape[2:]))
        sums = torch.ops.aten.convolution_backward(ones, total, probe, None, *args, [False, True, False])[1]
        return sums.mul_(factor).expand(qw.shape)
    probe = total.new_empty((groups,) + tuple(qw.shape[1:]))  # weight (C_out, C_in / groups, k...)
    sums = torch.ops.aten.convolution_backward(ones, total, probe, None, *args, [False, True, False])[1]
    if groups == 1:  # one row for every output channel: a broadcast view (the caller adds it)
        return sums.mul_(factor).expand(qw.shape)
    return sums.mul_(factor).repeat_interleave(qw.shape[0] // groups, 0)


def _batch_sum(q: Tensor) -> Tensor:
    """q summed over dim 0 into float32, keepdim, in q's layout: a reduction over memory rows for the
    layouts that keep dim 0 outermost (aten's sum of a channels_last bf16 tensor over dim 0 took 1.4 ms
    for 4 MB here, over memory rows 0.48 ms, the fused kernel less)."""
    if not rows_outer_dense(q):
        return q.sum(0, keepdim=True, dtype=torch.float32)
    ext = units.ext(q)
    if ext is not None and q.dtype == torch.bfloat16:
        total = ext.batch_sum_bf16(q)
    else:
        total = memory_rows(q).sum(0, dtype=torch.float32)
    return total.as_strided((1,) + tuple(q.shape[1:]), q.stride())
