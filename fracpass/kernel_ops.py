"""fracpass's quantizer kernels as torch ops, ``torch.ops.fracpass.<name>``, with their fake implementations.

The kernels of ``csrc/quant_cpu.cpp`` are bound twice: as pybind functions (``fracpass.kernels.load()``, what
``fracpass.quant`` calls) and as torch ops, registered by the same extension when it loads
(``TORCH_LIBRARY_FRAGMENT(fracpass, m)``). Dynamo, AOTAutograd and ``torch.export`` can trace the ops, not the
pybind calls; for that each op needs a fake implementation, which gives its outputs' shapes, dtypes and
strides without computing them. They are here, one per op, under the schema they implement.

The native kernels' extension (``csrc/native_module.cpp``) registers ``relu_bits_`` and ``relu_grad_bits``
the same way so far (``load_native()``). Only ``track_range_`` (the running range, its flag and its count of
non-finite batches) and ``relu_bits_`` (its input, ReLU-ed) mutate arguments, in place: ``Tensor(a!)`` in
their schemas; every other op returns new tensors.
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


# fracpass::relu_bits_(Tensor(a!) out) -> Tensor: ReLU in place, and the mask out <= 0 as bits in memory order
@_fake("relu_bits_", NATIVE_FAKES)
def _relu_bits_(out: Tensor) -> Tensor:
    return out.new_empty(((out.numel() + 7) // 8,), dtype=torch.uint8)


# fracpass::relu_grad_bits(Tensor grad, Tensor bits) -> Tensor
@_fake("relu_grad_bits", NATIVE_FAKES)
def _relu_grad_bits(grad: Tensor, bits: Tensor) -> Tensor:
    return torch.empty_strided(grad.shape, grad.stride(), dtype=grad.dtype, device=grad.device)


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


def load_native() -> Optional[Any]:
    """``torch.ops.fracpass`` with the native kernels' ops (``NATIVE_FAKES``) and their fakes registered, as
    ``load``; None where ``fracpass.kernels.load_native()`` gives no extension."""
    if kernels.load_native() is None:
        return None
    _register(NATIVE_FAKES)
    return torch.ops.fracpass
