"""fracpass's quantizer kernels as torch ops, ``torch.ops.fracpass.<name>``, with their fake implementations.

The kernels of ``csrc/quant_cpu.cpp`` are bound twice: as pybind functions (``fracpass.kernels.load()``, what
``fracpass.quant`` calls) and as torch ops, registered by the same extension when it loads
(``TORCH_LIBRARY_FRAGMENT(fracpass, m)``). Dynamo, AOTAutograd and ``torch.export`` can trace the ops, not the
pybind calls; for that each op needs a fake implementation, which gives its outputs' shapes, dtypes and
strides without computing them. They are here, one per op, under the schema they implement.

Only ``track_range_`` mutates its arguments (the running range, its flag and its count of non-finite
batches, in place: ``Tensor(a!)`` in its schema); every other op returns new tensors.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

import torch
from torch import Tensor

from . import kernels

FAKES = {}  # op name -> its fake implementation, registered once the extension has defined the op (load)
_lock = threading.Lock()
_registered = False


def _fake(name: str):
    def keep(fn):
        FAKES[name] = fn
        return fn

    return keep


# fracpass::fake_quant(Tensor x, Tensor mn, Tensor mx, float levels) -> Tensor
@_fake("fake_quant")
def _fake_quant(x: Tensor, mn: Tensor, mx: Tensor, levels: float) -> Tensor:
    return torch.empty_like(x)  # the kernel's empty_like: x's layout kept


# fracpass::grad_sr(Tensor g, Tensor mn, Tensor mx, float levels, int seed) -> Tensor
@_fake("grad_sr")
def _grad_sr(g: Tensor, mn: Tensor, mx: Tensor, levels: float, seed: int) -> Tensor:
    return torch.empty_like(g)


# fracpass::fake_quant_rows(Tensor x, Tensor mn, Tensor mx, Tensor levels) -> Tensor
@_fake("fake_quant_rows")
def _fake_quant_rows(x: Tensor, mn: Tensor, mx: Tensor, levels: Tensor) -> Tensor:
    return torch.empty_like(x)


# fracpass::grad_sr_rows(Tensor g, Tensor mn, Tensor mx, Tensor levels, int seed) -> Tensor
@_fake("grad_sr_rows")
def _grad_sr_rows(g: Tensor, mn: Tensor, mx: Tensor, levels: Tensor, seed: int) -> Tensor:
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


def load() -> Optional[Any]:
    """``torch.ops.fracpass`` with the quantizer kernels' ops and their fakes registered (building the extension
    on first use), or None where ``fracpass.kernels.load()`` gives no extension (FRACPASS_KERNELS=0, no
    compiler). A fake can only be registered for an op that exists: after the extension is loaded."""
    global _registered
    if kernels.load() is None:
        return None
    with _lock:
        if not _registered:
            for name, fake in FAKES.items():
                torch.library.register_fake(f"fracpass::{name}", fake)
            _registered = True
    return torch.ops.fracpass
