"""The per-op record of a native call (NativeSite), and the simulated route's quantizer call.

The lower-native pass gives every native call a ``site``: a small module (no parameters, no buffers,
so state_dict is unchanged) named ``{op}_native`` that holds the model's NativeOptions and a typed
record of the op's last call (LastCall). The call reads its options there and writes what it did;
``report.op_paths`` / ``product_paths`` read it back. Nothing is kept on quantizers or tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fracpass.native.options import NativeOptions
from fracpass.quant import ActQuant

NATIVE = "fracpass.native"  # node.meta key: NativeInfo on every compute op of a native model


@dataclass(frozen=True)
class NativeInfo:
    """Whether the lower-native pass replaced an op by a native call, and if not, why."""

    lowered: bool
    reason: str = ""


@dataclass
class LastCall:
    """What an op's last native call did (None / False before its first call).

    ``fallback``: why that call ran simulated although the bits allow the native path (a reason that
    depends on the operands: shape, dtype, device), None if it ran native. ``path``: the path a
    native_matmul took ("int8" for a 2-D right operand, "bf16" for a batched one). ``mm``: the device and
    (M, K, N) of its last int8 product (which products run on FP8 depends on them). ``int8``: which of a
    bf16 convolution's products (forward, input gradient, weight gradient) ran on int8 units. ``bn``: how
    a fused convolution ran its BatchNorm. ``converted``: which of a 2-D convolution's operands ("input",
    "residual") it converted from NCHW to channels_last (NativeOptions.channels_last)."""

    fallback: Optional[str] = None
    path: Optional[str] = None
    mm: Optional[Tuple[torch.device, int, int, int]] = None
    int8: Tuple[bool, bool, bool] = (False, False, False)
    bn: Optional[str] = None
    converted: Tuple[str, ...] = ()


class NativeSite(nn.Module):
    """A native call's options and the record of its last call (see the module docstring)."""

    def __init__(self, options: NativeOptions):
        super().__init__()
        self.options = options
        self.last = LastCall()

    def ran(self, fallback: Optional[str]) -> None:
        """Record a call: native (``fallback`` None) or simulated because of its operands."""
        self.last.fallback = fallback

    def extra_repr(self) -> str:
        return "" if self.options == NativeOptions() else repr(self.options)


def site_options(site: Optional[NativeSite]) -> NativeOptions:
    """The options a call runs with: its site's, or the defaults for a call made outside a lowered graph."""
    return site.options if site is not None else _DEFAULT


_DEFAULT = NativeOptions()


def record(site: Optional[NativeSite], fallback: Optional[str]) -> None:
    """The call's path for ``summary``; torch.export's trace is no call of the model and leaves it."""
    if site is not None and not torch.compiler.is_exporting():
        site.ran(fallback)


def quantized(q, x: Tensor, gate: Optional[Tensor] = None, known: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """q(x), or q(x, gate) for the activation and gradient quantizers of a gated op (a gated op's come
    with its gate: the lowering checked that; export's markers take the same arguments). A gated
    op's weight quantizer is static: it takes no gate. ``known``: x's min and max, handed over by the
    op that wrote x (conv_bn.Handover), for a static activation quantizer: the same values as q(x)
    without the pass over x."""
    if q is None:
        return x
    if known is not None and gate is None and isinstance(q, ActQuant):
        return q(x, known)
    return q(x, gate) if gate is not None and getattr(q, "role", None) != "weight" else q(x)
