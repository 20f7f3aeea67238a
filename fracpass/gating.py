"""DFQ gates: per-sample precision chosen by small gate networks, executed in one pass per batch.

A gated unit (a residual block, or one compute op) has a gate that reads the unit's input and
picks, per sample, one of K options (a_k, g_k). The unit's activation quantizers then quantize
each sample at its a_k and its gradient quantizers each sample's output gradient at its g_k, in one
vectorised pass: a per-row range and level count feed the same fused kernels the static
quantizers use. Each sample's range is taken over the samples that chose the same option (its
option group), never over the zeros of other samples.

Why the task loss reaches the gate: the forward uses the hard choice c = onehot(argmax p), and
the quantized activation is read as the mixture y = sum_k c_k Q_k(x). Its gradient w.r.t. c_k is
<dL/dy, Q_k(x)> per sample — the quantizer computes all K of them in one extra pass over x and
dL/dy in backward (``option_scores``), and the straight-through estimator hands them to the
softmax. An option with a = 0 skips the unit for that sample (output = shortcut, SkipNet); its
gradient comes from the gate's multiplier on the block's residual branch.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fracpass.errors import FracpassError, PlanError
from fracpass.quant import (FULL_PRECISION, PLAN_MISMATCH_FIX, Quantizer, fused_kernels, memory_rows, RangeTracker,
                            rows_outer_dense, torch_seed, plan_state_mismatch,
                            draw_seed, traced_ops, traced_layout)

__all__ = ["GateHub", "GateBranch", "GatedActQuant", "GatedGradQuant", "GateStats", "skip_gate",
           "fake_quantize_rows", "quantize_grad_rows", "option_scores", "onehot_grad"]

FEATURES = 32  # width of the gate's first 1x1 conv (C -> 32), as in FracTrain / SkipNet
HIDDEN = 16  # LSTM input and hidden size


# -- per-row kernels (torch-op fallbacks compute the same values) ---------------------------------
def _levels(bits: Tensor) -> Tensor:
    """2^b - 1 per entry, 0 where b is 0 (skip) or >= 32 (not quantized): those rows pass through."""
    bits = bits.to(torch.float32)
    quantized = (bits > 0) & (bits < FULL_PRECISION)
    return torch.where(quantized, torch.exp2(bits) - 1, torch.zeros_like(bits))


def fake_quantize_rows(x: Tensor, mn: Tensor, mx: Tensor, levels: Tensor) -> Tensor:
    """Fake-quantize each row of ``x`` (dim 0) over its own range [mn_r, mx_r] to levels_r + 1 values."""
    ext = traced_ops(x, mn, mx, levels) if torch.compiler.is_compiling() else fused_kernels(x, mn, mx, levels)
    if ext is not None and rows_outer_dense(x) and x.dim() > 0:
        return ext.fake_quant_rows(x, mn.contiguous(), mx.contiguous(), levels.contiguous())
    shape = (-1,) + (1,) * (x.dim() - 1)
    lv = levels.view(shape).to(x.dtype)
    active = lv > 0
    safe = torch.where(active, lv, torch.ones_like(lv))
    mn_, mx_ = mn.view(shape).clamp(max=0), mx.view(shape).clamp(min=0)
    scale = (mx_ / safe - mn_ / safe).clamp_(min=torch.finfo(x.dtype).tiny)
    zp = torch.round(-mn_ / scale)
    q = torch.div(x, scale).round_()
    q = torch.maximum(q, -zp)
    q = torch.minimum(q, safe - zp)
    return torch.where(active, q * scale, x)


def quantize_grad_rows(g: Tensor, mn: Tensor, mx: Tensor, levels: Tensor) -> Tensor:
    """Stochastic rounding of each row of ``g`` over its own range to levels_r + 1 values."""
    ext = fused_kernels(g, mn, mx, levels)
    if ext is not None and g.dim() > 0:
        g = g if rows_outer_dense(g) else g.contiguous()
        return ext.grad_sr_rows(g, mn.contiguous(), mx.contiguous(), levels.contiguous(), torch_seed())
    shape = (-1,) + (1,) * (g.dim() - 1)
    lv = levels.view(shape).to(g.dtype)
    active = lv > 0
    safe = torch.where(active, lv, torch.ones_like(lv))
    mn_, mx_ = mn.view(shape), mx.view(shape)
    scale = (mx_ / safe - mn_ / safe).clamp_(min=torch.finfo(g.dtype).tiny)
    y = ((g - mn_) / scale + torch.rand_like(g)).floor_()
    y = torch.minimum(y, safe)
    return torch.where(active, y * scale + mn_, g)


def option_scores(x: Tensor, g: Tensor, mn: Tensor, mx: Tensor, option_levels: Tensor) -> Tensor:
    """(rows, K): sum over each row of g * fake_quantize(x) at option k's levels and the row's range."""
    ext = (traced_ops(x, g, mn, mx, option_levels) if torch.compiler.is_compiling()
           else fused_kernels(x, g, mn, mx, option_levels))
    if ext is not None and x.dim() > 0 and option_levels.numel() <= 16:
        # the kernel pairs x and g by memory index and sums each row in that order: x's, whatever layout g
        # comes in (eager's autograd and a compiled backward may give g different strides)
        if not rows_outer_dense(x):
            x = x.contiguous()
        if g.stride() != x.stride():
            g = torch.empty_like(x).copy_(g)
        return ext.option_scores(x, g, mn.contiguous(), mx.contiguous(), option_levels)
    rows = x.shape[0]
    cols = []
    for lv in option_levels.tolist():
        if lv <= 0:
            cols.append(x.new_zeros(rows))
            continue
        q = fake_quantize_rows(x, mn, mx, torch.full_like(mn, lv))
        cols.append((g * q).reshape(rows, -1).sum(1))
    return torch.stack(cols, 1)


def range_per_row(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-sample min and max. A NaN propagates into its row's range and an Inf makes the scale
    infinite: either way that row's output comes out NaN, as in the static quantizers."""
    x = x.detach()
    # channels_last: rows in memory order (eager; Inductor reads any layout in its own reduction, and Dynamo cannot
    # trace memory_rows' storage_offset)
    if not torch.compiler.is_compiling() and rows_outer_dense(x) and x.dim() > 1 and not x.is_contiguous():
        flat = memory_rows(x)
    else:
        flat = x.reshape(x.shape[0], -1)
    # amin and amax separately: aminmax(dim=1) took 0.83 ms per 2M floats here, the pair 0.4 ms
    return torch.amin(flat, 1), torch.amax(flat, 1)


def _per_sample(x: Tensor, batch: int, where: nn.Module) -> Tensor:
    """``x`` with one row per sample: as is, or (B, -1) when its leading dim holds B samples' rows
    back to back (GPT-2's Conv1D flattens (B, T, C) to (B*T, C) before its addmm)."""
    if x.dim() > 0 and x.shape[0] == batch:
        return x
    if x.dim() > 0 and batch > 0 and x.shape[0] % batch == 0:
        return x.reshape(batch, -1)
    raise FracpassError(f"{type(where).__name__}: a gated tensor of shape {tuple(x.shape)} has no per-sample leading "
                       f"dimension for the gate's batch of {batch}; exclude this op from gating with a plan rule")


def range_per_group(mn: Tensor, mx: Tensor, choice: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Range of each option group, then gathered back per row: (row mn, row mx, group mn, group mx)."""
    gmn = mn.new_full((k,), float("inf")).scatter_reduce(0, choice, mn, "amin")
    gmx = mx.new_full((k,), float("-inf")).scatter_reduce(0, choice, mx, "amax")
    return gmn[choice], gmx[choice], gmn, gmx


# -- autograd -------------------------------------------------------------------------------------
class _GatedFakeQuant(torch.autograd.Function):
    """y = Q_{c_r}(x_r) per row; dy/dx straight through; dL/dc_k = <dL/dy, Q_k(x)> per row."""

    @staticmethod
    def forward(ctx, x: Tensor, onehot: Tensor, mn: Tensor, mx: Tensor, row_levels: Tensor,  # type: ignore[override]
                option_levels: Tensor) -> Tensor:
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, mn, mx, option_levels, onehot)
        return fake_quantize_rows(x, mn, mx, row_levels)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        d_onehot = None
        if ctx.needs_input_grad[1]:
            d_onehot = onehot_grad(*ctx.saved_tensors, grad)
        return grad, d_onehot, None, None, None, None


def onehot_grad(x: Tensor, mn: Tensor, mx: Tensor, option_levels: Tensor, onehot: Tensor, grad: Tensor) -> Tensor:
    """dL/d onehot of a gated activation quantizer given dL/d(its output) ``grad``: per row and option,
    <grad, Q_k(x)> over the row's range (``option_scores``)."""
    scores = option_scores(x, grad, mn, mx, option_levels)
    # a skip option has no quantizer output; give it the score of what the row used, which is
    # neutral (the softmax's backward ignores a common offset): skipping is costed at the block's add
    used = (scores * onehot).sum(1, keepdim=True)
    skip = (option_levels <= 0).unsqueeze(0)
    return torch.where(skip, used, scores).to(onehot.dtype)


class _GatedGradQuantFn:
    """Identity forward; each row's incoming gradient stochastically rounded at its option's g bits.

    A tensor hook on the op's output, like ``fracpass.quant._GradQuantFn``, so that in-place users
    of the output stay allowed and nothing is copied."""

    @staticmethod
    def apply(x: Tensor, choice: Tensor, option_levels: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            x.register_hook(_GatedGradQuantFn.traced(x, choice, option_levels))
        else:
            x.register_hook(lambda grad: _GatedGradQuantFn.quantize(grad, choice, option_levels))
        return x

    @staticmethod
    def traced(x: Tensor, choice: Tensor, option_levels: Tensor):
        """The hook a compiled graph runs (see ``fracpass.quant._traced_grad_quantizer``): everything that
        depends on the gradient's layout or shape is decided from ``x`` in forward. On float32 CPU tensors,
        eager's kernel (grad_sr_rows, its seed drawn in the graph): the same values, compiled or not."""
        ops = traced_ops(x, option_levels)
        layout = traced_layout(x)
        rows = choice.shape[0]
        per_sample = x.shape[0] != rows  # sample-major rows (see _per_sample): quantize per sample

        def hook(grad: Tensor) -> Tensor:
            g = grad.reshape(rows, -1) if per_sample else grad.contiguous(memory_format=layout)
            dims = tuple(range(1, g.dim()))
            mn, mx = (torch.amin(g, dims), torch.amax(g, dims)) if dims else (g, g)
            mn, mx, _, _ = range_per_group(mn, mx, choice, option_levels.numel())
            if ops is None:
                out = quantize_grad_rows(g, mn, mx, option_levels[choice])
            else:
                out = ops.grad_sr_rows(g, mn, mx, option_levels[choice], draw_seed())
            return out.view_as(grad) if per_sample else out

        return hook

    @staticmethod
    def quantize(grad: Tensor, choice: Tensor, option_levels: Tensor) -> Tensor:
        if grad.shape[0] != choice.numel():  # sample-major rows (see _per_sample): quantize per sample
            return _GatedGradQuantFn.quantize(grad.reshape(choice.numel(), -1), choice, option_levels).view_as(grad)
        mn, mx = range_per_row(grad)
        mn, mx, _, _ = range_per_group(mn, mx, choice, option_levels.numel())
        return quantize_grad_rows(grad, mn, mx, option_levels[choice])


class _HardChoice(torch.autograd.Function):
    """One-hot of the argmax in forward, the identity in backward (straight-through to the softmax)."""

    @staticmethod
    def forward(ctx, probs: Tensor) -> Tensor:  # type: ignore[override]
        return torch.zeros_like(probs).scatter_(1, probs.argmax(1, keepdim=True), 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad


def skip_gate(main: Tensor, onehot: Tensor, skip: Tuple[int, ...]) -> Tensor:
    """The residual branch times 1 - (mass on skip options): 0 for a skipped sample, 1 otherwise."""
    keep = 1 - onehot[:, list(skip)].sum(1)
    return main * keep.view((-1,) + (1,) * (main.dim() - 1)).to(main.dtype)


# -- modules --------------------------------------------------------------------------------------
class GatedActQuant(RangeTracker):
    """Activation quantizer of a gated op: per sample at the bits of the option its gate chose.

    Training: each option group's batch range (tracked as an EMA per option); eval: that EMA
    (``eval_ranges``: an option never chosen in training takes the union of the others' ranges),
    or before any training batch, the batch group range. ``stage_bits`` holds the most
    precise option, for tools that read one width per quantizer. A batch in which any chosen
    group's range is not finite is left out of every option's EMA (see ``fracpass.quant``).
    """

    role = "act"
    PLAN_BUFFERS = ("stage_bits", "options")  # option_levels follow from options

    def __init__(self, options: Sequence[int], num_stages: int, momentum: float = 0.1):
        super().__init__([max(options)] * num_stages)
        self.momentum = momentum
        k = len(options)
        self.register_buffer("options", torch.tensor(list(options), dtype=torch.int64))
        self.register_buffer("option_levels", _levels(self.options))
        self.option_bits = tuple(int(b) for b in options)  # the options as constants (a plan's, like the buffer)
        self.register_buffer("running_min", torch.zeros(k))
        self.register_buffer("running_max", torch.zeros(k))
        self.register_buffer("range_ready", torch.zeros(k, dtype=torch.bool))

    def forward(self, x: Tensor, onehot: Tensor) -> Tensor:
        if x.numel() == 0:  # an empty batch: nothing to quantize, no range to track
            return x
        choice = onehot.detach().argmax(1)
        rows = _per_sample(x, choice.numel(), self)
        if rows is not x:
            return self.forward(rows, onehot).view_as(x)
        mn, mx = self.row_range(x, choice)
        levels = self.option_levels.to(x.dtype)
        return _GatedFakeQuant.apply(x, onehot, mn.to(x.dtype), mx.to(x.dtype), levels[choice], levels)

    def row_range(self, x: Tensor, choice: Tensor) -> Tuple[Tensor, Tensor]:
        """Each sample's (min, max) that ``forward`` quantizes over, its option group's (tracking the
        groups' EMA in training), for callers that compute the codes themselves (``fracpass.native``).
        ``x`` leads with one row per sample; ``choice`` holds each sample's option."""
        if self.training or not self._range_ready:
            mn, mx = range_per_row(x)
            mn, mx, gmn, gmx = range_per_group(mn, mx, choice, self.options.numel())
            if self.training:
                self._track(gmn, gmx)
            return mn, mx
        table_min, table_max = self.eval_ranges()  # eval: the per-option EMA ranges, no pass over x
        return table_min[choice], table_max[choice]

    def eval_ranges(self) -> Tuple[Tensor, Tensor]:
        """Per-option (min, max) used in eval: each option's EMA, and for an option no training batch
        chose, the union of the seen options' ranges (what ONNX export writes too)."""
        ready = self.range_ready
        fill_min, fill_max = self.running_min[ready].min(), self.running_max[ready].max()
        return (torch.where(ready, self.running_min, fill_min), torch.where(ready, self.running_max, fill_max))

    @torch.no_grad()
    def _track(self, gmn: Tensor, gmx: Tensor) -> None:
        # an option no sample chose keeps the (inf, -inf) it started from in range_per_group
        chosen = (gmn != float("inf")) | (gmx != float("-inf"))
        finite = torch.isfinite(gmn) & torch.isfinite(gmx)
        batch_ok = (finite | ~chosen).all()  # decided on the device, as in ActQuant._track
        self.nonfinite_batches += ~batch_ok
        seen = chosen & finite & batch_ok
        first = seen & ~self.range_ready
        again = seen & self.range_ready
        gmn, gmx = gmn.to(self.running_min.dtype), gmx.to(self.running_max.dtype)
        self.running_min.copy_(torch.where(first, gmn, torch.where(again, torch.lerp(self.running_min, gmn, self.momentum),
                                                                   self.running_min)))
        self.running_max.copy_(torch.where(first, gmx, torch.where(again, torch.lerp(self.running_max, gmx, self.momentum),
                                                                   self.running_max)))
        self.range_ready |= seen

    def extra_repr(self) -> str:
        return f"options={tuple(self.options.tolist())}"


class GatedGradQuant(Quantizer):
    """Gradient quantizer of a gated op: each sample's output gradient at its option's g bits."""

    role = "grad"
    PLAN_BUFFERS = ("stage_bits", "options")  # option_levels follow from options

    def __init__(self, options: Sequence[int], num_stages: int):
        super().__init__([max(options)] * num_stages)
        self.register_buffer("options", torch.tensor(list(options), dtype=torch.int64))
        self.register_buffer("option_levels", _levels(self.options))
        self.option_bits = tuple(int(b) for b in options)  # the options as constants (a plan's, like the buffer)

    def forward(self, x: Tensor, onehot: Tensor) -> Tensor:
        if not x.requires_grad or x.numel() == 0:
            return x
        return _GatedGradQuantFn.apply(x, onehot.detach().argmax(1), self.option_levels.to(x.dtype))

    def extra_repr(self) -> str:
        return f"options={tuple(self.options.tolist())}"


class GateBranch(nn.Module):
    """A unit's own gate layers: global average pool -> 1x1 conv (C->32) -> ReLU -> 1x1 conv (32->16).

    A 1x1 conv on a pooled 1x1 map is a linear layer, which is how it is stored (``fc1``, ``fc2``),
    so the same branch serves conv feature maps (channels on dim 1) and sequences (channels last).
    """

    def __init__(self, channels: int, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.fc1 = nn.Linear(channels, FEATURES)
        self.fc2 = nn.Linear(FEATURES, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            channel = self.channel_dim % x.dim()
            if x.stride(channel) == 1:  # channels innermost (channels_last, sequences): rows of C, a view
                x = x.movedim(channel, -1).flatten(1, -2).mean(1)
            else:  # NCHW: a mean over the other dims (flattening copied the map: 3.9 vs 0.9 ms fwd+bwd alone
                # at 128x16x32x32; in a gated ResNet-74 step the accumulating adds took ~10 ms less)
                x = x.mean([d for d in range(1, x.dim()) if d != channel])
        return self.fc2(F.relu(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"channel_dim={self.channel_dim}"


@dataclass(frozen=True)
class GateStats:
    """The gates' choices on the last batch: per unit, the fraction of samples per option."""

    options: Tuple[Tuple[int, int], ...]  # (a_k, g_k)
    units: Dict[str, Tuple[float, ...]]
    mean_cost: float  # mean relative cost of the batch, % of FP32 (FracTrain's cp)
    target: float  # the target in force, %
    stage: int
    batch: int

    def __str__(self) -> str:
        head = ["unit"] + [f"a{a}/g{g}" if a else "skip" for a, g in self.options]
        rows = [[name] + [f"{100 * p:.0f}%" for p in mix] for name, mix in self.units.items()]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        lines = [f"gates on the last batch ({self.batch} samples, stage {self.stage}): mean cost "
                 f"{self.mean_cost:.3f}% of FP32, target {self.target:.3f}%", fmt(head),
                 "  ".join("-" * w for w in widths)]
        return "\n".join(lines + [fmt(r) for r in rows])


class GateHub(nn.Module):
    """All gates of a model: each unit's ``GateBranch`` (``gates.<unit>``), the LSTM cell and the
    projection they share, the per-option costs, and the cost target per stage.

    Called once per unit, in graph order: ``hub(x, state, unit)`` returns the unit's hard one-hot
    choice (B, K) and the LSTM state for the next unit; unit 0 starts from a zero state, so the
    state resets every forward. Gates always run at full precision.
    """

    def __init__(self, a: Sequence[int], g: Sequence[int], w: int, unit_names: Sequence[str],
                 channels: Sequence[int], channel_dims: Sequence[int], unit_costs: Sequence[Sequence[float]],
                 base_costs: Sequence[float], targets: Sequence[float], beta: float, controller: str):
        super().__init__()
        k = len(a)
        self.unit_names = list(unit_names)
        for name, c, dim in zip(unit_names, channels, channel_dims):
            self.add_module(name, GateBranch(c, dim))
        self.lstm = nn.LSTMCell(HIDDEN, HIDDEN)
        self.proj = nn.Linear(HIDDEN, k)
        self.beta, self.controller, self.w = beta, controller, w
        self.register_buffer("options_a", torch.tensor(list(a), dtype=torch.int64))
        self.register_buffer("options_g", torch.tensor(list(g), dtype=torch.int64))
        self.register_buffer("unit_costs", torch.tensor([list(c) for c in unit_costs], dtype=torch.float64).view(-1, k))
        self.register_buffer("base_costs", torch.tensor(list(base_costs), dtype=torch.float64))
        self.register_buffer("targets", torch.tensor(list(targets), dtype=torch.float64))
        self.register_buffer("stage", torch.zeros((), dtype=torch.int64))
        self._choices: List[Optional[Tensor]] = [None] * len(self.unit_names)

    # set by the plan (the gates' options and targets): a checkpoint must agree, never overwrite them
    PLAN_BUFFERS = ("options_a", "options_g", "targets")

    def plan_mismatch(self, state_dict, prefix: str) -> List[str]:
        return plan_state_mismatch(self, state_dict, prefix, self.PLAN_BUFFERS)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        diffs = self.plan_mismatch(state_dict, prefix)
        if diffs:
            raise PlanError(f"load_state_dict: gate hub {prefix[:-1] or 'GateHub'!r}: {'; '.join(diffs)}. The checkpoint "
                            "was saved from a model transformed with different gates; "
                            + PLAN_MISMATCH_FIX.format(keys=", ".join(self.PLAN_BUFFERS)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]], unit: int):
        if unit == 0:
            self._choices = [None] * len(self.unit_names)
        feat = getattr(self, self.unit_names[unit])(x.float() if x.dtype != torch.float32 else x)
        h, c = self.lstm(feat, state)
        probs = F.softmax(self.proj(h), dim=1)
        onehot = _HardChoice.apply(probs).to(x.dtype)
        if not torch.compiler.is_exporting():  # gate_stats and gate_loss read them; an ExportedProgram has neither
            self._choices[unit] = onehot
        return onehot, (h, c)

    def set_stage(self, stage: int) -> None:
        self.stage.fill_(stage)

    @contextlib.contextmanager
    def keeping_choices(self):
        """Run the model (cost analysis, a re-capture) without replacing the user's last batch's choices."""
        saved = list(self._choices)
        try:
            yield
        finally:
            self._choices = saved

    def macs_per_sample(self) -> int:
        """Forward MACs of every unit's gate: fc1, fc2, the LSTM cell's four gates and the projection."""
        k = self.options_a.numel()
        return sum(getattr(self, u).fc1.in_features * FEATURES + FEATURES * HIDDEN + 4 * HIDDEN * 2 * HIDDEN + HIDDEN * k
                   for u in self.unit_names)

    @property
    def target(self) -> float:
        return float(self.targets[int(self.stage)])

    def sample_costs(self) -> Optional[Tensor]:
        """Per-sample relative cost (% of FP32) of the last batch's choices, with a gradient to the gates."""
        if not self._choices or any(c is None for c in self._choices):
            return None
        costs = self.unit_costs.to(self._choices[0].dtype)
        total = sum(onehot @ costs[u] for u, onehot in enumerate(self._choices))
        return total + self._at_stage(self.base_costs)  # 0-d float64: added as float32, as a Python float is

    def _at_stage(self, per_stage: Tensor) -> Tensor:
        """``per_stage``'s value at the current stage, a 0-d tensor (no host read: a compiled step traces it)."""
        return per_stage.index_select(0, self.stage.view(1)).view(())

    def loss(self) -> Tensor:
        """beta x weight x the batch's summed costs, the weight from the mean cost's error against the stage's
        target. Tensor arithmetic throughout, in float64 where Python floats were (the same values), so that
        torch.compile traces a training step with it as one graph."""
        costs = self.sample_costs()
        if costs is None:
            return self.proj.weight.new_zeros(())
        target = self._at_stage(self.targets)
        error = costs.detach().mean().double() - target
        if self.controller == "sign":
            weight = torch.sign(error)
        else:  # "smooth": proportional to the relative error, saturating at +-1; zero at the target
            weight = (error / target).clamp(-1.0, 1.0)
        return (self.beta * weight).to(costs.dtype) * costs.sum()

    def stats(self) -> Optional[GateStats]:
        costs = self.sample_costs()
        if costs is None:
            return None
        units = {}
        for name, onehot in zip(self.unit_names, self._choices):
            counts = onehot.detach().sum(0)
            units[name] = tuple(float(v) for v in (counts / max(1, onehot.shape[0])).tolist())
        options = tuple(zip(self.options_a.tolist(), self.options_g.tolist()))
        return GateStats(options, units, float(costs.detach().mean()), self.target, int(self.stage),
                         int(self._choices[0].shape[0]))

    def __deepcopy__(self, memo):
        # the recorded choices belong to the last forward's autograd graph, which is not copied
        choices, self._choices = self._choices, [None] * len(self.unit_names)
        try:
            copied = nn.Module.__new__(type(self))
            memo[id(self)] = copied
            for key, value in self.__dict__.items():
                copied.__dict__[key] = copy.deepcopy(value, memo)
            return copied
        finally:
            self._choices = choices

    def extra_repr(self) -> str:
        opts = ", ".join(f"{a}/{g}" if a else "skip" for a, g in zip(self.options_a.tolist(), self.options_g.tolist()))
        return f"units={len(self.unit_names)}, options(a/g)=[{opts}], w={self.w}, beta={self.beta}, controller={self.controller}"
