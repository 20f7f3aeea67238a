"""What a native model is configured with (NativeOptions), and the limits of exact integer products.

``fracpass.transform(model, plan, execution="native", native=NativeOptions(...))`` keeps the options in
the model's state: a re-capture (train/eval switch), a deepcopy and a pickle round trip build the same
graph with the same thresholds. ``fracpass.native.configure(qmodel, options)`` changes them on a
transformed model (it re-lowers the graph), which is how benchmarks compare settings in one process.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Tuple

from fracpass.errors import FracpassError

EXECUTIONS = ("simulate", "native")
MAX_INT8_BITS = 8
# |code + offset| <= 255, so a K-long int32 dot product is exact up to K = (2^31 - 1) / 255^2
MAX_CONTRACTION = (2**31 - 1) // (255 * 255)
# FP8 e4m3 codes have |code| <= 16; a float32 sum of such products is exact while it stays below 2^24
MAX_FP8_CONTRACTION = 2**24 // (16 * 16)

# the op kinds the lower-native pass can lower. Opt-in:
# - "conv2d_int8" (conv2d's forward on oneDNN's int8 convolution, backward in float32): exact, but its
#   per-step weight prepack and layout changes made CIFAR ResNet steps slower than the bf16 path
#   (benchmarks/native_step.py);
# - "conv_transpose" (ConvTranspose1d/2d/3d on the bf16 path): exact to the bf16 bound, but its backward
#   measured 1.5-2.4x the simulation's time (NCHW ConvTranspose2d, 134-604M multiply-adds, AMD Zen 5 with
#   AVX512-BF16, 2 threads: issue 29), so it stays simulated unless asked for (CONV_TRANSPOSE_SIMULATED)
KINDS = ("linear", "matmul", "conv", "conv_transpose", "conv2d_int8")
DEFAULT_KINDS = ("linear", "matmul", "conv")
CONV_TRANSPOSE_SIMULATED = ("a transposed convolution: simulated by default, as its native backward measured 1.5-2.4x "
                            "the simulation's time (AMD Zen 5, AVX512-BF16); add 'conv_transpose' to "
                            "NativeOptions.kinds to run it on bf16")


@dataclass(frozen=True)
class NativeOptions:
    """How ``execution="native"`` lowers and runs a model. Every field has the measured default.

    ``kinds``: which op kinds are lowered (``KINDS``): "conv" lowers convolutions (1/2/3-D, grouped,
    depthwise) to the bf16 path; opt-in, "conv_transpose" lowers transposed ones too (their native backward
    measured slower than the simulation's: CONV_TRANSPOSE_SIMULATED), and "conv2d_int8" replaces conv2d's
    bf16 path by oneDNN's int8 forward. ``fuse_bn``: fold a bf16 convolution with the BatchNorm (residual add, ReLU)
    after it into one op (the fuse-native-bn pass).

    Thresholds below which a product stays simulated, as its fixed costs (codes, scaling, offset
    corrections) outweigh what the low-precision product saves (``benchmarks/native_crossover.py``):

    * ``min_intensity``: an (M, K) x (K, N) linear/matmul takes int8 with at least this many multiply-adds
      per element of its operands and output, MKN / (MK + KN + MN) (Zen 5, 1 thread, 8/8/8: int8 took
      1.07-1.58x the simulation's time up to 32, 0.47-0.79x from 85 on);
    * ``min_bmm_intensity``: the same per batch entry for batched products on bf16 (intensity 5 1.71x,
      13-16 0.84-1.14x, 21 0.85x, 27-32 0.42-0.82x, 43-171 0.29-0.61x);
    * ``min_conv_macs``: forward multiply-adds per convolution call for the bf16 path (3x3 conv at 8/8/8,
      2 threads: 4.7-19M 1.30-1.53x, 75M 0.71-1.18x by shape, 151M 0.65-1.04x, 302M 0.43-0.93x).

    A bf16 convolution's products on int8 units where they apply (each the same values: the tests
    check them bit for bit): ``int8_forward`` (the forward on oneDNN's int8 convolution),
    ``int8_input_grad`` (a stride-1 convolution's input gradient the same way), ``int8_weight_grad``
    (the weight gradient on the CPU kernels' AVX512-VNNI loop). ``split_channels``: 8-bit weight codes
    outside int8 split onto copies of their input channels while those are at most this fraction of the
    input channels (at least 4), else the shift per output channel (0: always the shift).

    The fused conv-BatchNorm: ``fast_bn`` runs its BatchNorm on the CPU kernels straight from the
    bf16 product where they apply (else aten's BatchNorm, bit for bit the unfused ops);
    ``hand_gradient`` hands a sole-reader convolution's int8 input-gradient product to the fused
    BatchNorm's backward unscaled (the same values, one float32 pass fewer).

    ``channels_last``: a native 2-D convolution (not transposed) runs channels_last whatever the layout of
    the user's model and input: an NCHW input (or fused residual) is converted at the op, the activations
    after it stay channels_last, gradients and the graph's 4-D outputs go back in the layout they came in
    (fracpass.native.layout). False keeps the model's layout, as before.
    """

    kinds: Tuple[str, ...] = DEFAULT_KINDS
    fuse_bn: bool = True
    min_intensity: float = 50.0
    min_bmm_intensity: float = 20.0
    min_conv_macs: float = 100e6
    int8_forward: bool = True
    int8_input_grad: bool = True
    int8_weight_grad: bool = True
    split_channels: float = 0.25
    fast_bn: bool = True
    hand_gradient: bool = True
    channels_last: bool = True

    def __post_init__(self):
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        kinds = tuple("conv2d_int8" if k == "conv2d" else k for k in kinds)  # its name before the bf16 path
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise FracpassError(f"NativeOptions(kinds={self.kinds!r}): no native path for {unknown}; choose from {KINDS}")
        object.__setattr__(self, "kinds", kinds)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise FracpassError(f"NativeOptions({f.name}={value!r}): a bool (True or False)")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise FracpassError(f"NativeOptions({f.name}={value!r}): a number >= 0 (the default is {f.default!r})")
        if self.split_channels > 1:
            raise FracpassError(f"NativeOptions(split_channels={self.split_channels!r}): a fraction of the input "
                                "channels, in [0, 1] (0: always the shift; the default 0.25)")

    def replace(self, **changes) -> "NativeOptions":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def check_execution(execution: str) -> str:
    if execution not in EXECUTIONS:
        raise FracpassError(f"transform: execution={execution!r} is not one of {EXECUTIONS}; use 'simulate' (float32 "
                            "fake quantization, the default) or 'native' (int8 or bf16 products where the bits allow)")
    return execution


def check_options(native, execution: str) -> "NativeOptions":
    """``transform``'s ``native`` argument: NativeOptions (None: the defaults), only with execution="native"."""
    if native is None:
        return NativeOptions()
    if not isinstance(native, NativeOptions):
        raise FracpassError(f"transform: native={native!r} is not a fracpass.NativeOptions; pass "
                            "native=fracpass.NativeOptions(min_conv_macs=..., kinds=(...), ...)")
    if execution != "native":
        raise FracpassError(f"transform: native={native!r} given with execution={execution!r}; the options apply to "
                            "execution='native' only")
    return native
