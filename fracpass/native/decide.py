"""The path choice: int8, bf16 or simulated per call, from the quantizers' bits, the device's units and
the operands' shapes, with the reason when an op stays simulated."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fracpass.gating import GatedActQuant, GatedGradQuant
from fracpass.quant import FULL_PRECISION, ActQuant, GradQuant, WeightQuant
from fracpass.native import options, units
from fracpass.native.options import NativeOptions

def _operand_reason(q, role: str, path: str = "int8") -> Optional[str]:
    if q is None:
        return f"its {role} operand is not quantized by the plan"
    if isinstance(q, GatedActQuant):
        if path != "bf16":
            return (f"its {role} quantizer is gated (per-sample scales): gated ops run native as convolutions, "
                    "linear layers and batched products (bf16) only")
        wide = sorted({b for b in q.option_bits if not 2 <= b <= options.MAX_INT8_BITS})
        if wide:
            return (f"its {role} gate options include {wide} bits: bfloat16 codes need 2..{options.MAX_INT8_BITS} bits in "
                    "every option")
        return None
    if type(q) not in (ActQuant, WeightQuant):
        return f"its {role} quantizer is {type(q).__name__}: no native path for it"
    if q.bits > options.MAX_INT8_BITS:
        holds = "int8 holds" if path == "int8" else "bfloat16 holds codes of"
        return f"{role} at {'fp32' if q.bits >= FULL_PRECISION else q.bits} bits: {holds} at most {options.MAX_INT8_BITS}"
    if q.bits < 2:
        return f"{role} at {q.bits} bits"
    return None


def grad_bits(gq) -> int:
    """The gradient's bits: a gated quantizer's widest option (what decides its backward path in the
    reports), -1 for a gradient quantizer with no native path."""
    if gq is None:
        return FULL_PRECISION
    if isinstance(gq, GatedGradQuant):
        return max(gq.option_bits)
    if type(gq) is not GradQuant:
        return -1
    return gq.bits


def decide(qa, qb, gq, path: str = "int8", device=None) -> Tuple[str, str]:
    """(path, note) from the quantizers' current bits and ``device``'s units (default: this CPU): ``path``
    ("int8", or "bf16" for convolutions) or "simulated"; the note says why not native, or which
    backward products run off the path (``backward_products``)."""
    if torch.compiler.is_exporting() and any(isinstance(q, (GatedActQuant, GatedGradQuant)) for q in (qa, qb, gq)):
        return "simulated", "torch.export: a gated call's Python reads the gates' choices on the host"
    for q, role in ((qa, "first"), (qb, "second")):
        why = _operand_reason(q, role, path)
        if why is not None:
            return "simulated", why
    gbits = grad_bits(gq)
    if gbits == -1 or (isinstance(gq, GatedGradQuant) and path != "bf16"):
        return "simulated", (f"its gradient quantizer is {type(gq).__name__}: gated ops run native as convolutions, "
                             "linear layers and batched products (bf16) only")
    why = units.int8_support(device) if path == "int8" else units.bf16_support(device)
    if why is not None:
        return "simulated", why
    if isinstance(gq, GatedGradQuant) and gbits > options.MAX_INT8_BITS:
        return path, (f"backward products in fp32 in batches where a sample chose a gradient option above "
                      f"{options.MAX_INT8_BITS} bits (gate options g={gq.option_bits})")
    if not 2 <= gbits <= options.MAX_INT8_BITS:
        return path, f"backward products in fp32 (gradient at {'fp32' if gbits >= FULL_PRECISION else gbits} bits)"
    first, _ = backward_products(qa, qb, gbits, path, device)
    if first != path:
        how = ("in fp32" if first == "fp32" else
               "on bf16 over the weight's values with its per-channel scale folded in (docs/native.md)")
        return path, (f"g x w {how} (the weight's per-channel scale lies on its contracted axis; a plan rule "
                      f"with weight_scale='tensor' puts it on {path} too)")
    return path, ""


def _per_channel(q) -> bool:
    return isinstance(q, WeightQuant) and q.axis is not None


def backward_products(qa, qb, gbits: int, path: str, device=None) -> Tuple[str, str]:
    """What an op on ``path`` runs the gradients of its first / second operand on: both "fp32" when the
    gradient is not quantized to 2..8 bits. The first's (g x b), where b has a per-channel weight scale
    (on that product's contracted axis, so it cannot scale the product's output): "bf16" over b's
    values with the scale folded in (bf16_conv.folded_weight, int8_mm.folded_input_grad) on a bf16 op, or
    on an int8 op where ``device`` has bfloat16 units; else "fp32". The second's (a^T x g) is "fp32"
    when a has a per-channel weight scale."""
    if not 2 <= gbits <= options.MAX_INT8_BITS:
        return "fp32", "fp32"
    first = path
    if _per_channel(qb):
        first = "bf16" if path == "bf16" or units.bf16_support(device) is None else "fp32"
    return first, "fp32" if _per_channel(qa) else path


def _tensor_reason(*tensors: Tensor, host_reads: bool = False) -> Optional[str]:
    """Why these operands stay simulated, or None. Fake tensors: a shape-only run, except under torch.export,
    which traces a static call's registered ops into the program (the eval model's products as eager runs them);
    a call whose Python reads tensor values on the host (``host_reads``: the opt-in int8 conv2d's NaN check) is
    exported simulated, as are gated calls (``decide``)."""
    for t in tensors:
        if isinstance(t, torch._subclasses.FakeTensor):
            if not torch.compiler.is_exporting():
                return "a shape-only (fake tensor) run"
            if host_reads:
                return "torch.export: its Python reads tensor values on the host, so the program simulates it"
        if units.device_kind(t.device) not in ("cpu", "cuda"):
            return f"a {t.device.type} tensor (native paths exist for CPUs and NVIDIA GPUs only)"
        if t.dtype != torch.float32:
            return f"{t.dtype} operands"
        if t.numel() == 0:
            return "an empty operand"
    return None


def _free_axis(q, free: int) -> bool:
    """True if ``q``'s scale is per tensor or along the free (non-contracted) axis ``free`` of a 2-D operand."""
    return not isinstance(q, WeightQuant) or q.axis is None or q.axis % 2 == free


def linear_reason(x: Tensor, weight: Tensor, aq, wq, opts: NativeOptions) -> Optional[str]:
    if not isinstance(aq, ActQuant) or not _free_axis(wq, 0):
        return "the input's scale is not per tensor or the weight's is not per output channel"
    if weight.dim() != 2 or x.dim() < 1:
        return f"a {weight.dim()}-D weight or {x.dim()}-D input"
    k = x.shape[-1]
    m, n = x.numel() // max(k, 1), weight.shape[0]
    return _size_reason(k) or _tensor_reason(x, weight) or _cuda_mm_reason(x.device, m, k, n) or _intensity_reason(m, k, n, opts)


def matmul_reason(a: Tensor, b: Tensor, qa, qb, opts: NativeOptions) -> Optional[str]:
    if b.dim() != 2 or a.dim() < 1:
        return (f"a {b.dim()}-D right operand: torch._int_mm multiplies 2-D matrices and a batched int8 product is "
                "not implemented here")
    if (a.dim() != 2 and isinstance(qa, WeightQuant)) or not _free_axis(qa, 0) or not _free_axis(qb, 1):
        return "a weight operand's channel axis is the contracted one"
    k = a.shape[-1]
    m, n = a.numel() // max(k, 1), b.shape[1]
    return _size_reason(k) or _tensor_reason(a, b) or _cuda_mm_reason(a.device, m, k, n) or _intensity_reason(m, k, n, opts)


def batched_matmul_reason(a: Tensor, b: Tensor, qa, qb, opts: NativeOptions) -> Optional[str]:
    if a.dim() < 2 or b.dim() < 2:
        return (f"a {min(a.dim(), b.dim())}-D operand (matrix-vector products are left to the simulation)")
    if _per_channel(qa) or _per_channel(qb):
        return "a per-channel weight scale on a batched product's operand"
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    return _tensor_reason(a, b) or _intensity_reason(m, k, n, opts, batched=True)


def _cuda_mm_reason(device, m: int, k: int, n: int) -> Optional[str]:
    """torch._int_mm's limits on CUDA (aten/src/ATen/native/cuda/Blas.cpp, _int_mm_out_cuda: the left
    operand's rows above 16, its columns and the right operand's a multiple of 8) for all three products
    of an (M, K) x (K, N) op: the forward, (M, N) x (N, K) for the first operand's gradient and
    (K, M) x (M, N) for the second's. Nothing on a CPU, whose int8 GEMM takes any shape."""
    if units.device_kind(device) != "cuda" or (min(m, k) > 16 and m % 8 == 0 and k % 8 == 0 and n % 8 == 0):
        return None
    return (f"a {m}x{k}x{n} product: torch._int_mm on CUDA needs M and K above 16 and M, K and N multiples of 8 "
            "(for the forward product and both gradient products)")


def fp8_products(device, abits: int, bbits: int, gbits: int, m: int, k: int, n: int) -> Tuple[bool, bool, bool]:
    """Which of an int8 op's products run on FP8 e4m3 instead (the forward a x b, then the gradient
    products g x b^T and a^T x g): those whose two operands' codes are exact in e4m3, which holds every
    integer of magnitude <= 16 (activation and weight codes up to 4 bits lie in [-15, 15], gradient
    codes up to 5 bits in [-16, 15]), on a device with FP8 units (fp8_support), with the dimensions
    torch._scaled_mm takes on CUDA (multiples of 16) and a contraction whose float32 accumulation of
    products <= 16^2 stays exact (< 2^24)."""
    if units.fp8_support(device) is not None or m % 16 or k % 16 or n % 16:
        return False, False, False
    a4, b4, g5 = abits <= 4, bbits <= 4, 2 <= gbits <= 5
    fits = lambda contraction: contraction <= options.MAX_FP8_CONTRACTION
    return a4 and b4 and fits(k), g5 and b4 and fits(n), a4 and g5 and fits(m)


def _size_reason(k: int) -> Optional[str]:
    return None if k <= options.MAX_CONTRACTION else f"a contraction of {k} > {options.MAX_CONTRACTION} overflows int32 accumulation"


EXPORT_SIZE = ("torch.export with a dynamic batch: whether the product is large enough to pay depends on the batch, so "
               "the program simulates it (NativeOptions with min_intensity, min_bmm_intensity and min_conv_macs 0 "
               "exports it native)")


def _symbolic(*sizes) -> bool:
    """Whether torch.export traces a size as a symbol (its dynamic batch), which no threshold can be checked
    against. (torch.compile guards on the comparison instead, and recompiles where it changes.)"""
    return torch.compiler.is_exporting() and any(isinstance(v, (torch.SymInt, torch.SymFloat)) for v in sizes)


def _shown(v, spec: str = "") -> str:
    """A number ``v`` formatted for a message, "?" while torch.compile traces: there a dynamic batch (or, with
    dynamic=True, any size or float) is a symbol, which Dynamo cannot format, and whose value would specialize the
    graph."""
    return "?" if torch.compiler.is_compiling() else format(v, spec)


def _intensity_reason(m: int, k: int, n: int, opts: NativeOptions, batched: bool = False) -> Optional[str]:
    """Too small a product for int8 (bf16 for a ``batched`` one, per batch entry) to pay: the path's passes
    over the operands and the output (codes, sums, the epilogue) cost per element, the product time it
    saves per multiply-add (NativeOptions.min_intensity, min_bmm_intensity)."""
    minimum = opts.min_bmm_intensity if batched else opts.min_intensity
    if minimum <= 0:
        return None
    if _symbolic(m, k, n):
        return EXPORT_SIZE
    elements = m * k + k * n + m * n
    intensity = m * k * n / elements if elements else 0.0
    if intensity >= minimum:
        return None
    if batched:
        return (f"a small batched product ({_shown(m)}x{_shown(k)}x{_shown(n)} per batch entry: {_shown(intensity, '.0f')} multiply-adds per operand or "
                f"output element, under NativeOptions.min_bmm_intensity = {_shown(minimum, 'g')}): encoding and rescaling would "
                "cost more than the bf16 product saves")
    return (f"a small product ({_shown(m)}x{_shown(k)}x{_shown(n)}: {_shown(intensity, '.0f')} multiply-adds per operand or output element, under "
            f"NativeOptions.min_intensity = {_shown(minimum, 'g')}): encoding and rescaling would cost more than the int8 GEMM "
            "saves")


def gated_matmul_reason(a: Tensor, b: Tensor, qa, qb, gate: Tensor, opts: NativeOptions) -> Optional[str]:
    if not (isinstance(qa, GatedActQuant) and isinstance(qb, GatedActQuant)):
        return "a gated product with a weight operand (gated matmul runs native with two gated activations)"
    if qa.option_bits != qb.option_bits:
        return "its operands' gate options differ"
    if a.dim() < 3 or a.shape[:-2] != b.shape[:-2] or a.shape[0] != gate.shape[0]:
        return (f"operands {tuple(a.shape)} x {tuple(b.shape)} whose batch dims differ or do not lead with the gate's "
                f"batch of {gate.shape[0]} (per-sample rows back to back are left to the simulation)")
    return _tensor_reason(a, b) or _intensity_reason(a.shape[-2], a.shape[-1], b.shape[-1], opts, batched=True)


def conv_reason(x: Tensor, weight: Tensor, padding, aq, wq) -> Optional[str]:
    if not isinstance(aq, ActQuant) or not isinstance(wq, WeightQuant) or wq.axis not in (0, -4):
        return "the input's scale is not per tensor or the weight's is not per output channel"
    if x.dim() != 4 or weight.dim() != 4:
        return f"a {x.dim()}-D input (oneDNN's int8 convolution here takes a batched 4-D input)"
    if isinstance(padding, str):
        return f"padding={padding!r}"
    if not hasattr(torch.ops.onednn, "qconv_pointwise"):
        return "this torch build has no oneDNN int8 convolution (torch.ops.onednn.qconv_pointwise)"
    if units.device_kind(x.device) != "cpu":
        return "not a CPU tensor (oneDNN's int8 convolution runs on CPUs)"
    return _tensor_reason(x, weight, host_reads=True)


def tuple_arg(v, n: int) -> list:
    """A convolution's int-or-sequence argument (stride, padding, ...) as a list of n ints."""
    return [v] * n if isinstance(v, int) else list(v)


def gated_linear_reason(x: Tensor, weight: Tensor, aq, wq, gate: Tensor, opts: NativeOptions) -> Optional[str]:
    if not isinstance(aq, GatedActQuant) or not _free_axis(wq, 0):
        return "the input's quantizer is not gated or the weight's scale is not per output channel"
    if weight.dim() != 2 or x.dim() < 2 or gate.dim() != 2 or x.shape[0] != gate.shape[0]:
        return (f"a {x.dim()}-D input whose first dimension is not the gate's batch of {gate.shape[0]} (per-sample "
                "rows back to back are left to the simulation)")
    if not x.is_contiguous():
        return "a non-contiguous input"
    k = x.shape[-1]
    return _tensor_reason(x, weight) or _intensity_reason(x.numel() // max(k, 1), k, weight.shape[0], opts)


def bf16_conv_reason(x: Tensor, weight: Tensor, padding, aq, wq, transposed: bool, gate) -> Optional[str]:
    axis = 1 if transposed else 0
    if not isinstance(aq, (ActQuant, GatedActQuant)) or not isinstance(wq, WeightQuant) or (
            wq.axis is not None and wq.axis % weight.dim() != axis):
        return "the input's scale is not per tensor or the weight's is not per output channel"
    if isinstance(padding, str):
        return f"padding={padding!r}"
    if x.dim() != weight.dim():
        return f"an unbatched {x.dim()}-D input"
    if gate is not None and (gate.dim() != 2 or gate.shape[0] != x.shape[0]):
        return f"a gate choice of shape {tuple(gate.shape)} for a batch of {x.shape[0]}"
    return _tensor_reason(x, weight)  # the device's bf16 support: decide() checked it


def _conv_macs(x: Tensor, weight: Tensor, stride, padding, dilation, transposed: bool) -> int:
    """Forward multiply-adds of a batched convolution: every output element's window (a transposed one:
    every input element's scatter)."""
    n = weight.dim() - 2
    taps = math.prod(weight.shape[1:])  # C_in / groups x kernel (a transposed weight: C_out / groups x kernel)
    if transposed:
        return x.numel() * taps
    out = 1
    for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], tuple_arg(stride, n), tuple_arg(padding, n),
                                tuple_arg(dilation, n)):
        out *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
    return x.shape[0] * weight.shape[0] * out * taps


def conv_size_reason(x: Tensor, weight: Tensor, stride, padding, dilation, transposed: bool,
                     opts: NativeOptions) -> Optional[str]:
    if opts.min_conv_macs <= 0:
        return None
    macs = _conv_macs(x, weight, stride, padding, dilation, transposed)
    if _symbolic(macs):
        return EXPORT_SIZE
    if macs >= opts.min_conv_macs:
        return None
    return (f"a small convolution ({_shown(macs / 1e6, '.1f')}M multiply-adds, under NativeOptions.min_conv_macs = "
            f"{_shown(opts.min_conv_macs / 1e6, 'g')}M): the bf16 path's codes, scaling and offset corrections would cost more than "
            "it saves")


NONFINITE = "a non-finite value (NaN/Inf) in its input: simulated, whose output is NaN as the model's is"


def finite_range(mn: Tensor, mx: Tensor) -> Tensor:
    """Whether an input's range is finite (a 0-d bool tensor): codes exist for it. A NaN or an infinity in the
    input has no codes (the kernels refuse it): the opt-in int8 conv2d reads this on the host and runs simulated
    on the same range (``NONFINITE``); a bf16 convolution's ops read it inside (ConvState.finite). Either way the
    batch comes out NaN as in the simulation, and the loop can skip it."""
    return torch.isfinite(mn).all() & torch.isfinite(mx).all()
