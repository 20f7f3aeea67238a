"""fracpass's quantizer kernels as torch ops, ``torch.ops.fracpass.<name>``, with their fake implementations.

The kernels of ``csrc/quant_cpu.cpp`` are bound twice: as pybind functions (``fracpass.kernels.load()``, what
``fracpass.quant`` calls) and as torch ops, registered by the same extension when it loads
(``TORCH_LIBRARY_FRAGMENT(fracpass, m)``). Dynamo, AOTAutograd and ``torch.export`` can trace the ops, not the
pybind calls; for that each op needs a fake implementation, which gives its outputs' shapes, dtypes and
strides without computing them. They are here, one per op, under the schema they implement.

The native kernels' extension (``csrc/native_module.cpp``) registers every native kernel as an op only
(``NATIVE_FAKES``; ``load_native()`` gives them as ``NativeKernels``, what ``fracpass.native.units.ext()``
returns); its Python module binds just the build's capability query. Arguments mutated in place
(``Tensor(a!)`` in the schemas): ``track_range_``'s running range, flag and count of non-finite batches,
``relu_bits_``'s input (ReLU-ed), ``bn_forward_bf16``'s running statistics and ``epilogue``'s accumulator
(its float32 output written over it); every other op returns new tensors.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

import torch
from torch import Tensor

from . import kernels

FAKES = {}  # quant_cpu.cpp's op name -> its fake implementation, registered once the extension defined it (load)
NATIVE_FAKES = {}  # the native kernels' (native_module.cpp), registered by load_native
_lock = threading.Lock()
_registered = set()  # the fake tables registered


def _fake(name: str, table: dict = FAKES):
    def keep(fn):
        table[name] = fn
        return fn

    return keep


# fracpass::fake_quant(Tensor x, Tensor mn, Tensor mx, float levels) -> Tensor
@_fake("fake_quant")
def _fake_quant(x: Tensor, mn: Tensor, mx: Tensor, levels: float) -> Tensor:
    return torch.empty_like(x)  # the kernel's empty_like: x's layout kept


# fracpass::grad_sr(Tensor g, Tensor mn, Tensor mx, float levels, Tensor seed) -> Tensor
#   seed: a 0-d int64 tensor (fracpass.quant.draw_seed), so that a compiled graph draws it without int(tensor)
@_fake("grad_sr")
def _grad_sr(g: Tensor, mn: Tensor, mx: Tensor, levels: float, seed: Tensor) -> Tensor:
    return torch.empty_like(g)


# fracpass::fake_quant_rows(Tensor x, Tensor mn, Tensor mx, Tensor levels) -> Tensor
@_fake("fake_quant_rows")
def _fake_quant_rows(x: Tensor, mn: Tensor, mx: Tensor, levels: Tensor) -> Tensor:
    return torch.empty_like(x)


# fracpass::grad_sr_rows(Tensor g, Tensor mn, Tensor mx, Tensor levels, Tensor seed) -> Tensor
@_fake("grad_sr_rows")
def _grad_sr_rows(g: Tensor, mn: Tensor, mx: Tensor, levels: Tensor, seed: Tensor) -> Tensor:
    return torch.empty_like(g)


# fracpass::option_scores(Tensor x, Tensor g, Tensor mn, Tensor mx, Tensor levels) -> Tensor
@_fake("option_scores")
def _option_scores(x: Tensor, g: Tensor, mn: Tensor, mx: Tensor, levels: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], levels.shape[0]))  # a score per row and option


# fracpass::affine_params(Tensor mn, Tensor mx, float levels) -> (Tensor, Tensor, Tensor)
@_fake("affine_params")
def _affine_params(mn: Tensor, mx: Tensor, levels: float) -> tuple:
    return tuple(torch.empty_like(mn, memory_format=torch.contiguous_format) for _ in range(3))  # scale, lo, hi


# fracpass::track_range_(Tensor(a!) rmin, Tensor(b!) rmax, Tensor(c!) ready, Tensor(d!) nonfinite, Tensor mn,
#                        Tensor mx, float momentum) -> ()
@_fake("track_range_")
def _track_range_(rmin: Tensor, rmax: Tensor, ready: Tensor, nonfinite: Tensor, mn: Tensor, mx: Tensor,
                  momentum: float) -> None:
    return None


# ---- the native kernels (csrc/native_module.cpp), in its order

def _like(t: Tensor, dtype=None) -> Tensor:
    """A tensor with t's shape and strides (the kernels' empty_strided), in ``dtype`` (t's by default)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype if dtype is None else dtype, device=t.device)


def _none(t: Tensor, dtype) -> Tensor:
    """The kernels' "not asked for" output: an empty 1-D tensor."""
    return t.new_empty((0,), dtype=dtype)


# fracpass::codes_to_u8(Tensor q, float offset) -> Tensor
@_fake("codes_to_u8", NATIVE_FAKES)
def _codes_to_u8(q: Tensor, offset: float) -> Tensor:
    return _like(q, torch.uint8)


# fracpass::u8_to_codes(Tensor u, float offset, bool batch_sum) -> Tensor[]
@_fake("u8_to_codes", NATIVE_FAKES)
def _u8_to_codes(u: Tensor, offset: float, batch_sum: bool) -> list:
    rest = u.numel() // u.shape[0] if u.dim() and u.shape[0] else 0
    return [_like(u, torch.bfloat16), u.new_empty((rest,), dtype=torch.float32) if batch_sum else _none(u, torch.float32)]


# fracpass::relu_bits_(Tensor(a!) out) -> Tensor: ReLU in place, and the mask out <= 0 as bits in memory order
@_fake("relu_bits_", NATIVE_FAKES)
def _relu_bits_(out: Tensor) -> Tensor:
    return out.new_empty(((out.numel() + 7) // 8,), dtype=torch.uint8)


# fracpass::relu_grad_bits(Tensor grad, Tensor bits) -> Tensor
@_fake("relu_grad_bits", NATIVE_FAKES)
def _relu_grad_bits(grad: Tensor, bits: Tensor) -> Tensor:
    return _like(grad)


# fracpass::decode_u8(Tensor u, Tensor zp, Tensor scale) -> Tensor
@_fake("decode_u8", NATIVE_FAKES)
def _decode_u8(u: Tensor, zp: Tensor, scale: Tensor) -> Tensor:
    return _like(u, torch.float32)


# fracpass::decode(Tensor t, Tensor k, Tensor scale) -> Tensor
@_fake("decode", NATIVE_FAKES)
def _decode(t: Tensor, k: Tensor, scale: Tensor) -> Tensor:
    return t.new_empty(t.shape, dtype=torch.float32)


# fracpass::encode(Tensor x, Tensor scale, Tensor lo, Tensor hi, Tensor shift) -> Tensor[]: codes, row sums, column sums
@_fake("encode", NATIVE_FAKES)
def _encode(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, shift: Tensor) -> list:
    rows, cols = x.shape
    return [x.new_empty((rows, cols), dtype=torch.int8), x.new_empty((rows,), dtype=torch.int32),
            x.new_empty((cols,), dtype=torch.int32)]


# fracpass::grad_codes(Tensor g, Tensor mn, Tensor mx, float levels, int seed, bool values) -> Tensor[]:
#   values (or empty), codes, row sums, column sums
@_fake("grad_codes", NATIVE_FAKES)
def _grad_codes(g: Tensor, mn: Tensor, mx: Tensor, levels: float, seed: int, values: bool) -> list:
    rows, cols = g.shape
    return [g.new_empty((rows, cols)) if values else _none(g, torch.float32), g.new_empty((rows, cols), dtype=torch.int8),
            g.new_empty((rows,), dtype=torch.int32), g.new_empty((cols,), dtype=torch.int32)]


# fracpass::encode_bf16(Tensor x, Tensor scale, Tensor lo, Tensor hi, bool bytes, bool codes) -> Tensor[]
@_fake("encode_bf16", NATIVE_FAKES)
def _encode_bf16(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, bytes: bool, codes: bool) -> list:
    return [_like(x, torch.bfloat16) if codes else _none(x, torch.bfloat16), _like(x, torch.uint8) if bytes else _none(x, torch.uint8)]


# fracpass::weight_grad_u8(Tensor ug, float kg, Tensor ua, float lo, int KH, int KW, int[] pad, int[] dilation)
#   -> Tensor[]: the integer product and the window sums, float64, (C_out, C_in, KH, KW) and (1, C_in, KH, KW)
@_fake("weight_grad_u8", NATIVE_FAKES)
def _weight_grad_u8(ug: Tensor, kg: float, ua: Tensor, lo: float, KH: int, KW: int, pad, dilation) -> list:
    return [ug.new_empty((ug.shape[1], ua.shape[1], KH, KW), dtype=torch.float64),
            ug.new_empty((1, ua.shape[1], KH, KW), dtype=torch.float64)]


# fracpass::int8_weight_codes(Tensor qw, int max_extra) -> Tensor[]: int8 codes (C_out, C_in + extra, ...), the
#   shift per output channel, whether it shifted (0-d bool), the extra channels' sources (extra,): how many
#   extra channels, the values decide
@_fake("int8_weight_codes", NATIVE_FAKES)
def _int8_weight_codes(qw: Tensor, max_extra: int) -> list:
    extra = torch.library.get_ctx().new_dynamic_size()
    shape = (qw.shape[0], qw.shape[1] + extra) + tuple(qw.shape[2:])
    return [qw.new_empty(shape, dtype=torch.int8), qw.new_empty((qw.shape[0],), dtype=torch.float32),
            qw.new_empty((), dtype=torch.bool), qw.new_empty((extra,), dtype=torch.int64)]


# fracpass::append_channels(Tensor u, Tensor dup) -> Tensor: (N, C + len(dup), H, W), channels-last
@_fake("append_channels", NATIVE_FAKES)
def _append_channels(u: Tensor, dup: Tensor) -> Tensor:
    shape = (u.shape[0], u.shape[1] + dup.shape[0]) + tuple(u.shape[2:])
    return u.new_empty(shape).contiguous(memory_format=torch.channels_last)


# fracpass::shifted_product_bf16(Tensor y, Tensor u, float offset, Tensor k, int KH, int KW, int[] stride, int[] pad,
#   int[] dilation, Tensor scale, Tensor addend) -> Tensor: bfloat16, or float32 with a scale, in y's layout
@_fake("shifted_product_bf16", NATIVE_FAKES)
def _shifted_product_bf16(y: Tensor, u: Tensor, offset: float, k: Tensor, KH: int, KW: int, stride, pad, dilation,
                          scale: Tensor, addend: Tensor) -> Tensor:
    return _like(y, torch.float32 if scale.numel() > 0 else torch.bfloat16)


# fracpass::grad_codes_bf16(Tensor g, Tensor mn, Tensor mx, Tensor levels, Tensor zero, int seed, bool values,
#   bool bytes) -> Tensor[]: values (or empty), codes, bytes (or empty), in g's layout
@_fake("grad_codes_bf16", NATIVE_FAKES)
def _grad_codes_bf16(g: Tensor, mn: Tensor, mx: Tensor, levels: Tensor, zero: Tensor, seed: int, values: bool,
                     bytes: bool) -> list:
    return [_like(g) if values else _none(g, g.dtype), _like(g, torch.bfloat16),
            _like(g, torch.uint8) if bytes else _none(g, torch.uint8)]


# fracpass::batch_sum_bf16(Tensor q) -> Tensor: float32, one value per element of a sample
@_fake("batch_sum_bf16", NATIVE_FAKES)
def _batch_sum_bf16(q: Tensor) -> Tensor:
    return q.new_empty((q.numel() // q.shape[0] if q.dim() and q.shape[0] else 0,), dtype=torch.float32)


# fracpass::scale_bf16(Tensor v, Tensor scale, Tensor bias, Tensor row_scale, Tensor addend) -> Tensor
@_fake("scale_bf16", NATIVE_FAKES)
def _scale_bf16(v: Tensor, scale: Tensor, bias: Tensor, row_scale: Tensor, addend: Tensor) -> Tensor:
    return _like(v, torch.float32)


# fracpass::bn_forward_bf16(Tensor v, Tensor scale, Tensor bias, Tensor w, Tensor b, Tensor(a!) running_mean,
#   Tensor(b!) running_var, bool training, float momentum, float eps, Tensor residual, bool relu) -> (Tensor x 7):
#   out (v's layout), the ReLU's mask bits (or empty), ref, mean and invstd per channel (float64), out's min and max
@_fake("bn_forward_bf16", NATIVE_FAKES)
def _bn_forward_bf16(v: Tensor, scale: Tensor, bias: Tensor, w: Tensor, b: Tensor, running_mean: Tensor,
                     running_var: Tensor, training: bool, momentum: float, eps: float, residual: Tensor,
                     relu: bool) -> tuple:
    c = v.shape[1]
    return (_like(v, torch.float32), v.new_empty(((v.numel() + 7) // 8 if relu else 0,), dtype=torch.uint8),
            v.new_empty((c,), dtype=torch.float32), v.new_empty((c,), dtype=torch.float64),
            v.new_empty((c,), dtype=torch.float64), v.new_empty((), dtype=torch.float32),
            v.new_empty((), dtype=torch.float32))


# fracpass::bn_backward_bf16(Tensor grad, Tensor bits, Tensor v, Tensor ref, Tensor scale, Tensor bias, Tensor w,
#   Tensor mean, Tensor invstd, bool training, bool keep_grad, Tensor grad_scale, Tensor grad_addend) -> Tensor[]:
#   dy (grad's layout), its min and max, the gradient after the ReLU where kept and masked (else empty), dw, db
@_fake("bn_backward_bf16", NATIVE_FAKES)
def _bn_backward_bf16(grad: Tensor, bits: Tensor, v: Tensor, ref: Tensor, scale: Tensor, bias: Tensor, w: Tensor,
                      mean: Tensor, invstd: Tensor, training: bool, keep_grad: bool, grad_scale: Tensor,
                      grad_addend: Tensor) -> list:
    c = v.shape[1]
    kept = _like(grad) if keep_grad and bits.numel() > 0 else _none(grad, grad.dtype)
    return [_like(grad, torch.float32), grad.new_empty((), dtype=torch.float32), grad.new_empty((), dtype=torch.float32),
            kept, grad.new_empty((c,), dtype=torch.float32), grad.new_empty((c,), dtype=torch.float32)]


# fracpass::ones_input_grad(Tensor qw, int H, int W, int Ho, int Wo, int[] stride, int[] pad, int[] dilation) -> Tensor:
#   float32 (1, C_in, H, W), channels-last
@_fake("ones_input_grad", NATIVE_FAKES)
def _ones_input_grad(qw: Tensor, H: int, W: int, Ho: int, Wo: int, stride, pad, dilation) -> Tensor:
    return qw.new_empty((1, qw.shape[1], H, W), dtype=torch.float32).contiguous(memory_format=torch.channels_last)


# fracpass::window_sums(Tensor total, int KH, int KW, int Ho, int Wo, int[] stride, int[] pad, int[] dilation) -> Tensor:
#   float32 (1, C_in, KH, KW)
@_fake("window_sums", NATIVE_FAKES)
def _window_sums(total: Tensor, KH: int, KW: int, Ho: int, Wo: int, stride, pad, dilation) -> Tensor:
    return total.new_empty((1, total.shape[1], KH, KW))


# fracpass::epilogue(Tensor(a!) acc, Tensor sa, Tensor sb, Tensor row_a, Tensor kb, Tensor ka, Tensor col_b,
#   Tensor ca, Tensor cb, Tensor bias, int K) -> (): the float32 output written over the int32 acc
@_fake("epilogue", NATIVE_FAKES)
def _epilogue(acc: Tensor, sa: Tensor, sb: Tensor, row_a: Tensor, kb: Tensor, ka: Tensor, col_b: Tensor, ca: Tensor,
              cb: Tensor, bias: Tensor, K: int) -> None:
    return None


class NativeKernels:
    """What ``fracpass.native.units.ext()`` gives the native code: each kernel as its torch op
    (``torch.ops.fracpass.<name>``, fake registered), called as the Python module's function was, and the
    build's capability query. ``epilogue`` returns its acc viewed as float32 (the op writes it there)."""

    def __init__(self, module):
        self._module = module
        self._vnni = bool(module.vnni_weight_grad())  # asked once: torch.compile then reads an attribute
        for name in NATIVE_FAKES:  # each op an attribute, which torch.compile reads (it does not run __getattr__)
            if not hasattr(type(self), name):  # the methods above wrap theirs
                setattr(self, name, getattr(torch.ops.fracpass, name))

    def vnni_weight_grad(self) -> bool:
        """Whether weight_grad_u8 was built (AVX512-VNNI): a fact of the build, not an op."""
        return self._vnni

    def epilogue(self, acc: Tensor, *args) -> Tensor:
        torch.ops.fracpass.epilogue(acc, *args)
        return acc.view(torch.float32)

    def __getattr__(self, name: str):  # only reached for a name __init__ did not bind
        raise AttributeError(f"no native kernel {name!r} (csrc/native_module.cpp registers {sorted(NATIVE_FAKES)})")


def _register(table: dict) -> None:
    with _lock:
        if id(table) not in _registered:
            for name, fake in table.items():
                torch.library.register_fake(f"fracpass::{name}", fake)
            _registered.add(id(table))


def load() -> Optional[Any]:
    """``torch.ops.fracpass`` with the quantizer kernels' ops and their fakes registered (building the extension
    on first use), or None where ``fracpass.kernels.load()`` gives no extension (FRACPASS_KERNELS=0, no
    compiler). A fake can only be registered for an op that exists: after the extension is loaded."""
    if kernels.load() is None:
        return None
    _register(FAKES)
    return torch.ops.fracpass


def load_native() -> Optional[NativeKernels]:
    """The native kernels (NativeKernels: their torch ops, fakes registered), as ``load``; None where
    ``fracpass.kernels.load_native()`` gives no extension."""
    module = kernels.load_native()
    if module is None:
        return None
    _register(NATIVE_FAKES)
    return NativeKernels(module)
