"""Quantizer ops (autograd) and the quantizer modules the passes insert.

The formula is FracTrain's asymmetric uniform quantizer, s = (max - min) / (2^b - 1), with two
deliberate refinements:

* activations and weights use an integer zero point and ``round(x / s)`` — bit for bit what ONNX
  QuantizeLinear computes — and the range always contains 0, so zero (padding, ReLU output) is
  exact and a constant tensor is representable;
* gradients keep FracTrain's float offset (``floor((g - min) / s + u)``), which gives exactly 2^b
  levels over [min, max] and keeps stochastic rounding unbiased at both ends.

Non-finite input: a NaN or Inf anywhere in a training batch makes its range non-finite, so the
whole quantized tensor comes out NaN (every row, not only the bad sample's) and so does the loss:
divergence is never masked as finite numbers. The batch's range is *not* tracked: the running
range keeps its last finite value, ``nonfinite_batches`` counts the skipped updates (on the
device, no host sync) and ``warn_nonfinite`` logs a warning once per quantizer (the transformed
model calls it when it enters eval mode; the ``Scheduler`` at the end of each loss window). In
eval mode the running range is used, so only the non-finite elements' rows come out NaN.

An empty batch (a zero-size tensor) passes through unchanged and leaves the ranges alone.

Bits live in buffers (``stage_bits``, ``stage``), mirrored in a Python int so the forward and
backward never read a tensor on the host. ``bits >= 32`` means "not quantized": the quantizer
returns its input unchanged. The bits belong to the plan: ``load_state_dict`` checks a
checkpoint's ``stage_bits`` against the module's own and raises ``PlanError`` if they differ,
rather than let a checkpoint change the precision the plan (and ``summary``/``cost``) states.
"""
from __future__ import annotations

import logging
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from fracpass import kernels
from fracpass.errors import PlanError

__all__ = [
    "Quantizer",
    "ActQuant",
    "WeightQuant",
    "GradQuant",
    "fake_quantize",
    "quantize_grad_stochastic",
    "draw_seed",
    "traced_ops",
    "FULL_PRECISION",
    "warn_nonfinite",
]

log = logging.getLogger("fracpass.quant")

FULL_PRECISION = 32  # bits at or above this mean "leave the tensor alone"

_DITHER_SCALE = 1.0 / 256  # one random byte per element: u = (k + 0.5) / 256, k in 0..255
_DITHER_OFFSET = 0.5 / 256


def _scalar_kernels(mn: Tensor, mx: Tensor):
    """The compiled CPU kernels for one float32 CPU range (plain tensors outside tracing and compiling,
    no autograd), else None: affine_params and _track then take one call instead of about ten ops."""
    if (type(mn) is not Tensor or type(mx) is not Tensor or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or mn.device.type != "cpu" or mx.device.type != "cpu" or mn.dtype != torch.float32
            or mx.dtype != torch.float32 or mn.numel() != 1 or mx.shape != mn.shape or mn.requires_grad
            or mx.requires_grad):
        return None
    return kernels.load()


def affine_params(mn: Tensor, mx: Tensor, levels: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Scale and the integer bounds of ``round(x / scale)`` for a range holding zero."""
    ext = _scalar_kernels(mn, mx) if type(levels) is float else None
    if ext is not None:  # the same float32 arithmetic (quant_cpu.cpp's affine)
        scale, lo, hi = ext.affine_params(mn, mx, levels)
        return scale, lo, hi
    mn = mn.clamp(max=0)
    mx = mx.clamp(min=0)
    # (mx - mn) / levels overflows for ranges near the float limit; the split form does not.
    scale = (mx / levels - mn / levels).clamp_(min=torch.finfo(mx.dtype).tiny)
    zero_point = torch.round(-mn / scale)
    return scale, -zero_point, levels - zero_point


def fused_kernels(x: Tensor, *ranges: Tensor):
    """The compiled CPU kernels when they apply to these tensors, else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or any(r.dtype != torch.float32 for r in ranges):
        return None
    return kernels.load()


def rows_outer_dense(x: Tensor) -> bool:
    """The fused kernels' layouts where the channels (dim 1) lie where they expect them: contiguous, or
    channels_last (3-D too), which keep dim 0 outermost. The kernels run over memory order and keep the
    layout, so a channels_last model's tensors stay channels_last (the gradient dither is keyed by memory
    index). Work that is the same for every element of a row takes any such layout: _outer_dense."""
    return (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))


def _outer_dense(x: Tensor) -> bool:
    """Dense with dim 0 outermost in memory, the other dims in any order (an attention head's (b, h, t, d)
    view of a (b, t, h, d) tensor too): what the fused kernels read in memory order for work that is the
    same for every element of a row of dim 0 (fake quantization with one range per tensor or per row;
    csrc/quant_cpu.cpp's rows_outer_dense checks the same)."""
    if x.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(x.shape, x.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return x.shape[0] <= 1 or x.stride(0) == x.numel() // x.shape[0]


def dense(x: Tensor) -> Tensor:
    """x itself in a layout the fused kernels read in memory order, else a contiguous copy."""
    return x if rows_outer_dense(x) else x.contiguous()


def memory_rows(x: Tensor) -> Tensor:
    """A dense tensor that keeps dim 0 outermost (``rows_outer_dense``) viewed as (rows of dim 0, the
    rest) in memory order: a channels_last tensor's samples without a copy."""
    rest = x.numel() // max(x.shape[0], 1)
    return x.as_strided((x.shape[0], rest), (rest, 1), x.storage_offset())


def memory_order(x: Tensor) -> Tensor:
    """A dense tensor's elements as a 1-D view in memory order."""
    return x.as_strided((x.numel(),), (1,), x.storage_offset())


def value_range(x: Tensor) -> Tuple[Tensor, Tensor]:
    """torch.aminmax over every element (never building a graph); a dense tensor with dim 0 outermost
    (channels_last, an attention head's transposed view) is read in memory order as it lies (aten's
    aminmax would first copy it to contiguous: 0.9 ms per 4 MB here)."""
    if torch.compiler.is_compiling():  # Inductor reads any layout in its own reduction
        return torch.aminmax(x.detach())
    x = x.detach()
    if not x.is_contiguous() and _outer_dense(x):
        x = memory_order(x)
    return torch.aminmax(x)


def _per_row(x: Tensor, mn: Tensor) -> bool:
    """True if ``mn`` is per tensor or holds one value per index of x's dim 0 (the kernel's layouts)."""
    return mn.numel() == 1 or (mn.dim() == x.dim() and mn.shape[0] == x.shape[0] == mn.numel())


def draw_seed() -> Tensor:
    """A 63-bit seed drawn from torch's default CPU generator, as a 0-d int64 tensor: what the kernels'
    torch ops take, so that a compiled graph draws it in place (no ``int(tensor)``) and, under
    ``torch.manual_seed``, draws the value eager execution draws."""
    # aten's out-of-place random: Dynamo does not trace Tensor.random_; the value and the generator's
    # advance are random_()'s
    return torch.ops.aten.random.default(torch.empty((), dtype=torch.int64))


def torch_seed() -> int:
    """``draw_seed``'s value as a Python int, for the pybind kernels (eager execution)."""
    return int(draw_seed())


def constant_when_traced(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo, which takes about 2 s
    here, at fracpass's import: the mark that the decorator sets and Dynamo reads when it traces a call of
    ``fn`` (tests/test_compile.py checks both)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_when_traced
def traced_kernels() -> bool:
    """Whether the quantizer kernels are there as torch ops (``torch.ops.fracpass``, their fakes registered),
    building them on first use. Called while torch.compile or torch.export traces: Dynamo runs it once and
    keeps its answer as a constant, so the graph calls the ops or the torch-op path, never the loader."""
    from fracpass import kernel_ops

    return kernel_ops.load() is not None


def traced_ops(*tensors: Tensor):
    """In a graph that torch.compile or torch.export traces: ``torch.ops.fracpass`` when the kernels apply to
    these tensors (float32 on the CPU) and are there, else None (the torch-op path). What ``fused_kernels``
    is to eager execution, with the kernels as traceable torch ops instead of pybind functions."""
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and traced_kernels():
        return torch.ops.fracpass
    return None


@constant_when_traced
def traced_lerp_is_fma() -> bool:
    """``_lerp_is_fma`` as a constant of a traced graph (see ``traced_kernels``)."""
    return _lerp_is_fma()


def fake_quantize(x: Tensor, mn: Tensor, mx: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize ``x`` to ``bits`` over the range [mn, mx] (broadcastable to x).

    Equals ONNX ``DequantizeLinear(QuantizeLinear(x))`` with the same scale and zero point.
    Returns a new tensor; no gradient is defined here (see ``_FakeQuantSTE``).
    """
    if torch.compiler.is_compiling():
        # the kernel as a torch op (torch.ops.fracpass.fake_quant, its fake registered), which Dynamo and
        # torch.export trace; elsewhere the torch ops below, bit for bit its values, which Inductor fuses. On
        # this project's AVX2 CPU, Inductor's fusion of those ops ran ResNet-74's compiled step 1.28-1.44x
        # compiled FP32, the kernel 1.22-1.32x (benchmarks/compile_step.py)
        ops = traced_ops(x, mn, mx)
        if ops is not None and _outer_dense(x) and _per_row(x, mn):
            return ops.fake_quant(x, mn, mx, float(2**bits - 1))
    else:
        ext = fused_kernels(x, mn, mx)
        if ext is not None and _outer_dense(x) and _per_row(x, mn):
            return ext.fake_quant(x, mn, mx, float(2**bits - 1))
    scale, lo, hi = affine_params(mn, mx, float(2**bits - 1))
    q = torch.div(x, scale)  # a true division: x * (1 / s) differs from QuantizeLinear on ties
    q.round_()
    # Two one-sided clamps: two-sided clamp_ with tensor bounds is ~6x slower on CPU here.
    q.clamp_min_(lo)
    q.clamp_max_(hi)
    return q.mul_(scale)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, mn: Tensor, mx: Tensor, bits: int) -> Tensor:  # type: ignore[override]
        return fake_quantize(x, mn, mx, bits)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None, None, None


def _cpu_dither(numel: int) -> Tensor:
    """One random byte per element from a fast bit generator, seeded from torch's generator.

    ``torch.rand_like`` costs ~7.5 ms per 2M floats on this class of CPU; SFC64 bytes ~1.6 ms.
    Seeding from torch's default generator keeps runs reproducible under ``torch.manual_seed``.
    """
    rng = np.random.Generator(np.random.SFC64(torch_seed()))
    return torch.from_numpy(rng.integers(0, 256, size=numel, dtype=np.uint8))


def quantize_grad_stochastic(g: Tensor, bits: int, seed: Optional[Tensor] = None) -> Tensor:
    """FracTrain's gradient quantizer: per-tensor min/max, stochastic rounding.

    q = floor((g - min) / s + u), u ~ U(0, 1), which is unbiased: E[q * s + min] = g. The fused CPU
    kernel draws u = (k + 0.5) / 2^24 from a counter-based hash of (seed, index); the torch-op CPU
    path uses one random byte per element, u = (k + 0.5) / 256, a bias of at most s / 512. ``seed``: the
    fused kernel's (a 0-d int64 tensor, draw_seed), else it draws one; the torch-op path draws its bytes.
    """
    if g.numel() == 0:
        return g.clone()
    levels = float(2**bits - 1)
    ext = fused_kernels(g)
    if ext is not None:
        g = dense(g)
        mn, mx = value_range(g)
        return ext.grad_sr(g, mn, mx, levels, torch_seed() if seed is None else int(seed))
    mn, mx = value_range(g)
    scale = (mx / levels - mn / levels).clamp_(min=torch.finfo(g.dtype).tiny)
    if g.device.type == "cpu":
        # (g - (mn - s * offset)) / s == (g - mn) / s + offset, folding the dither's mean into
        # the subtraction saves a pass over the tensor.
        y = torch.sub(g, mn - scale * _DITHER_OFFSET)
        y.div_(scale)
        y.add_(_cpu_dither(g.numel()).view(g.shape), alpha=_DITHER_SCALE)
    else:
        y = torch.sub(g, mn)
        y.div_(scale)
        y.add_(torch.rand_like(y))
    y.floor_()
    y.clamp_max_(levels)  # float error in (g - mn) / s can reach levels + 1 at the top
    return y.mul_(scale).add_(mn)


def _traced_grad_quantizer(x: Tensor, bits: int):
    """The gradient quantizer a compiled graph runs for the gradient of ``x``: decided from x in forward,
    since Dynamo cannot trace a hook that reads its gradient's layout or type. On a float32 CPU tensor, the
    kernel eager execution runs (grad_sr as a torch op, its seed drawn in the graph by ``draw_seed``): the
    same noise, compiled or not, under ``torch.manual_seed``, for a gradient in x's layout (contiguous or
    channels_last, as eager's gradients come). Elsewhere, the torch-op path with ``torch.rand_like``'s
    noise, as eager draws it on GPUs (the CPU's torch-op path draws NumPy bytes, which no graph can)."""
    levels = float(2**bits - 1)
    ops = traced_ops(x)
    if ops is not None:
        layout = traced_layout(x)

        def kernel(grad: Tensor) -> Tensor:
            g = grad.contiguous(memory_format=layout)
            mn, mx = torch.aminmax(g)
            return ops.grad_sr(g, mn, mx, levels, draw_seed())

        return kernel

    def torch_ops(grad: Tensor) -> Tensor:
        mn, mx = torch.aminmax(grad)
        scale = (mx / levels - mn / levels).clamp(min=torch.finfo(grad.dtype).tiny)
        y = torch.floor((grad - mn) / scale + torch.rand_like(grad)).clamp_max(levels)
        return y * scale + mn

    return torch_ops


def traced_layout(x: Tensor) -> torch.memory_format:
    """The layout a traced gradient hook gives the gradient of ``x`` before the kernels read it in memory
    order: x's own where it is channels_last, as eager's gradients come, else contiguous."""
    if not x.is_contiguous() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _GradQuantFn:
    """Identity forward; quantizes the incoming gradient in backward.

    A tensor hook on the op's output, not an autograd.Function: a Function that returns its input
    hands back a view, and in-place users (``ReLU(inplace=True)``, ``x.mul_``) may not modify such a
    view. A hook registered before an in-place op receives the gradient w.r.t. the value it was
    registered on (torch's documented hook semantics), i.e. the op's output, and what it returns
    replaces that gradient on the way to the op. Nothing is copied; the op's output is returned.
    Dynamo traces the hook into the compiled backward (``_traced_grad_quantizer``).
    """

    @staticmethod
    def apply(x: Tensor, bits: int) -> Tensor:
        if torch.compiler.is_compiling():
            x.register_hook(_traced_grad_quantizer(x, bits))
        else:
            x.register_hook(lambda grad: quantize_grad_stochastic(grad, bits))
        return x


def plan_state_mismatch(module: nn.Module, state_dict, prefix: str, keys: Sequence[str]) -> List[str]:
    """How the plan-owned buffers ``keys`` of a checkpoint differ from ``module``'s, one line each."""
    diffs = []
    for key in keys:
        saved, own = state_dict.get(prefix + key), getattr(module, key)
        if saved is None:
            continue
        if saved.shape != own.shape or not torch.equal(saved.to(own.dtype), own):
            diffs.append(f"{key} {saved.tolist()} in the checkpoint, {own.tolist()} in this model's plan")
    return diffs


PLAN_MISMATCH_FIX = ("transform the model with the plan the checkpoint was saved with (fracpass.save_checkpoint "
                     "stores it), or, to start this plan from the checkpoint's weights, drop the plan-owned entries "
                     "({keys}) and the stage from the state_dict and load it with strict=False")


class Quantizer(nn.Module):
    """Base of the inserted quantizer modules: per-stage bits as buffers, current bits as an int."""

    role = ""
    PLAN_BUFFERS: Tuple[str, ...] = ("stage_bits",)  # set by the plan: a checkpoint must agree, never overwrite

    def __init__(self, stage_bits: Sequence[int]):
        super().__init__()
        if not stage_bits:
            raise ValueError("a quantizer needs bits for at least one stage")
        self.register_buffer("stage_bits", torch.tensor(list(stage_bits), dtype=torch.int64))
        self.register_buffer("stage", torch.zeros((), dtype=torch.int64))
        self._bits = int(stage_bits[0])

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def num_stages(self) -> int:
        return int(self.stage_bits.numel())

    def set_stage(self, stage: int) -> None:
        self.stage.fill_(stage)
        self._bits = int(self.stage_bits[stage])

    def pass_through(self, bits: int = FULL_PRECISION) -> None:
        """Run at ``bits`` whatever the stage (``FULL_PRECISION``: leave tensors alone) until the next
        ``set_stage``: ``fracpass.bench``'s FP32 baseline on a copy of the model. The plan is unchanged."""
        self._bits = int(bits)

    def plan_mismatch(self, state_dict, prefix: str) -> List[str]:
        """How a checkpoint's plan-owned state differs from this quantizer's, plus a stage it does not have."""
        diffs = plan_state_mismatch(self, state_dict, prefix, self.PLAN_BUFFERS)
        stage = state_dict.get(prefix + "stage")
        if not diffs and stage is not None and not 0 <= int(stage) < self.num_stages:
            diffs.append(f"the checkpoint is at stage {int(stage)} but this model's plan has {self.num_stages} stage(s)")
        return diffs

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a transformed model checks all its quantizers at once (fracpass.checkpoint.check_plan_state);
        # this covers a quantizer loaded on its own or through a wrapper such as DDP
        diffs = self.plan_mismatch(state_dict, prefix)
        if diffs:
            name = prefix[:-1] or type(self).__name__
            raise PlanError(f"load_state_dict: quantizer {name!r}: {'; '.join(diffs)}. The checkpoint was saved from "
                            "a model transformed with a different plan; "
                            + PLAN_MISMATCH_FIX.format(keys=", ".join(self.PLAN_BUFFERS)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bits = int(self.stage_bits[int(self.stage)])

    def extra_repr(self) -> str:
        return f"bits={self._bits}, stage_bits={tuple(self.stage_bits.tolist())}"


class RangeTracker(Quantizer):
    """A quantizer that tracks a running range: a batch with a non-finite range is left out of it.

    ``range_ready`` (a buffer) says whether a finite batch has been tracked; ``_range_ready``
    mirrors it on the host for the eval forward, synced on load and when eval mode is entered,
    so training never reads it back. ``nonfinite_batches`` counts the skipped batches.
    """

    def __init__(self, stage_bits: Sequence[int]):
        super().__init__(stage_bits)
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.int64), persistent=False)
        self._nonfinite_warned = 0
        self._range_ready = False

    def train(self, mode: bool = True):
        if not mode:
            self._range_ready = bool(self.range_ready.any())
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._range_ready = bool(self.range_ready.any())


def warn_nonfinite(named: Iterable[Tuple[str, nn.Module]]) -> List[str]:
    """Log one warning for the quantizers that skipped range updates for non-finite batches since they
    were last warned about (their names, the list cut after a few); returns the names warned now.
    Reads every quantizer's count in one host transfer."""
    trackers = [(name, q) for name, q in named if isinstance(q, RangeTracker)]
    if not trackers:
        return []
    device = trackers[0][1].nonfinite_batches.device
    counts = torch.stack([q.nonfinite_batches.to(device) for _, q in trackers]).tolist()
    fresh = [(name, q, count) for (name, q), count in zip(trackers, counts) if count and not q._nonfinite_warned]
    if not fresh:
        return []
    names = [name for name, _, _ in fresh]
    shown = ", ".join(names[:_NAMES_SHOWN]) + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")
    batches = max(count for _, _, count in fresh)
    log.warning("%d activation quantizer(s) skipped range updates for up to %d non-finite (NaN/Inf) batch(es) (%s); "
                "their ranges keep the last finite values, but those batches' outputs and losses were NaN: skip "
                "backward and the optimizer step when the loss is not finite (docs/plans.md, 'Non-finite batches')",
                len(names), batches, shown)
    for _, q, count in fresh:
        q._nonfinite_warned = count
    return names


_NAMES_SHOWN = 4  # quantizer names a non-finite warning lists before "and N more"


class ActQuant(RangeTracker):
    """Per-tensor activation quantizer: batch min/max in training, an EMA of it in eval.

    In eval mode before any finite training batch has been seen, the batch range is used.
    """

    role = "act"

    def __init__(self, stage_bits: Sequence[int], momentum: float = 0.1):
        super().__init__(stage_bits)
        self.momentum = momentum  # weight of the newest batch, as in BatchNorm
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("range_ready", torch.zeros((), dtype=torch.bool))

    def forward(self, x: Tensor, known: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """``known``: x's min and max, when the op that wrote x computed them (see ``qrange``)."""
        if self._bits >= FULL_PRECISION or x.numel() == 0:
            return x
        mn, mx = self.qrange(x, known)
        return self.quantize(x, mn, mx)

    def quantize(self, x: Tensor, mn: Tensor, mx: Tensor) -> Tensor:
        """``forward``'s output for a range ``qrange`` already gave (and tracked): for callers that asked
        for the range first and then run the simulation after all (``fracpass.native``)."""
        return _FakeQuantSTE.apply(x, mn, mx, self._bits)

    def qrange(self, x: Tensor, known: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        """The range ``forward`` quantizes ``x`` over (tracking it in training), for callers that
        compute the codes themselves (``fracpass.native``). ``known``: x's min and max as torch.aminmax
        gives them, computed by the op that wrote x (fracpass.native's fused BatchNorm hands them over
        in the graph: conv_bn.Handover), used instead of a pass over x."""
        if self.training or not self._range_ready:
            mn, mx = value_range(x) if known is None else known
            if self.training:
                self._track(mn, mx)
            return mn, mx
        return self.running_min, self.running_max

    @torch.no_grad()
    def _track(self, mn: Tensor, mx: Tensor) -> None:
        # decided on the device (no host sync): a finite batch moves the EMA, or sets the range if
        # it is the first one; a non-finite one leaves it and is counted
        mn, mx = mn.to(self.running_min.dtype), mx.to(self.running_max.dtype)
        if torch.compiler.is_compiling():  # eager's choice of arithmetic, as a torch op Dynamo traces
            if (self.momentum < 0.5 and self.running_min.device.type == "cpu" and mn.device.type == "cpu"
                    and self.running_min.dtype == mn.dtype == torch.float32 and self.running_min.numel() == 1
                    and mn.numel() == 1 and traced_kernels() and traced_lerp_is_fma()):
                torch.ops.fracpass.track_range_(self.running_min, self.running_max, self.range_ready,
                                                self.nonfinite_batches, mn.reshape(()), mx.reshape(()),
                                                float(self.momentum))
                return
            ext = None
        else:
            ext = _scalar_kernels(mn, mx) if self.momentum < 0.5 and _lerp_is_fma() else None
        if (ext is not None and self.running_min.device.type == "cpu" and self.running_min.dtype == torch.float32
                and self.running_min.numel() == 1 and self.running_max.dtype == torch.float32):
            ext.track_range_(self.running_min, self.running_max, self.range_ready, self.nonfinite_batches, mn, mx,
                             float(self.momentum))  # the same arithmetic in one call (quant_cpu.cpp)
            return
        finite = torch.isfinite(mn) & torch.isfinite(mx)
        weight = torch.where(finite, torch.where(self.range_ready, self.momentum, 1.0), 0.0)
        self.running_min.lerp_(torch.where(finite, mn, self.running_min), weight)
        self.running_max.lerp_(torch.where(finite, mx, self.running_max), weight)
        self.range_ready |= finite
        self.nonfinite_batches += ~finite


_LERP_FMA: Optional[bool] = None


def _lerp_is_fma() -> bool:
    """Whether torch's scalar lerp_ at a weight under 0.5 rounds once (an FMA), as track_range_ computes it:
    checked once against torch on values where one and two roundings differ."""
    global _LERP_FMA
    if _LERP_FMA is None:
        ext = kernels.load()
        ok = ext is not None
        g = torch.Generator().manual_seed(0)
        pairs = (torch.randn(2, 64, generator=g) * 1000).tolist()
        for a, b in zip(*pairs) if ok else ():
            want = torch.tensor(a).lerp_(torch.tensor(b), torch.tensor(0.1))
            rmin, rmax = torch.tensor(a), torch.tensor(a)
            ext.track_range_(rmin, rmax, torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.int64),
                             torch.tensor(b), torch.tensor(b), 0.1)
            ok = ok and torch.equal(rmin, want)
        _LERP_FMA = ok
        if not ok and ext is not None:
            log.debug("torch's lerp_ does not round as track_range_ does here: range tracking stays on torch ops")
    return _LERP_FMA


class WeightQuant(Quantizer):
    """Per-output-channel weight quantizer; ``axis`` is the output-channel axis (None: per-tensor)."""

    role = "weight"

    def __init__(self, stage_bits: Sequence[int], axis: Optional[int] = 0):
        super().__init__(stage_bits)
        self.axis = axis

    def forward(self, w: Tensor) -> Tensor:
        if self._bits >= FULL_PRECISION:
            return w
        mn, mx = self.qrange(w)
        return _FakeQuantSTE.apply(w, mn, mx, self._bits)

    def qrange(self, w: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-channel (or per-tensor) min and max, shaped to broadcast against ``w``."""
        if self.axis is None or w.dim() == 0:
            return value_range(w.detach())
        axis = self.axis % w.dim()
        per_channel = w.detach().movedim(axis, 0).reshape(w.shape[axis], -1)
        mn, mx = torch.aminmax(per_channel, dim=1)
        shape = [1] * w.dim()
        shape[axis] = -1
        return mn.view(shape), mx.view(shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}"


class GradQuant(Quantizer):
    """Identity in forward; quantizes the gradient w.r.t. its input (the op's output) in backward."""

    role = "grad"

    def forward(self, x: Tensor) -> Tensor:
        if self._bits >= FULL_PRECISION or not x.requires_grad or x.numel() == 0:
            return x
        return _GradQuantFn.apply(x, self._bits)


QUANTIZER_TYPES = {"act": ActQuant, "weight": WeightQuant, "grad": GradQuant}
