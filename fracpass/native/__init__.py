"""Native low-precision execution: quantized products on int8 or bfloat16 codes (docs/native.md).

``fracpass.transform(model, plan, execution="native", native=NativeOptions(...))`` runs the
``lower-native`` pass (passes/lower_native.py) at the end of the pipeline: each quantized compute op
and its quantizers become one native call that picks its path per call from the quantizers' current
bits, and ``fuse-native-bn`` (passes/fuse_native_bn.py) folds bf16 convolutions with the BatchNorm
after them. The simulated graph stays the source of truth for graph text, golden files and export.

One file per responsibility:

=================  ===============================================================================
options.py         NativeOptions (thresholds, kinds, int8 sub-products, fused BatchNorm) and limits
site.py            the per-op NativeSite: the options a call runs with and the record of its last call
units.py           which units a device has (int8, bf16, FP8), and the fused CPU kernels
decide.py          the path choice and the reason an op stays simulated
codes.py           int8 and bf16 codes of operands and gradients, and the scaling epilogue
int8_mm.py         linear / 2-D matmul on int8 codes (torch._int_mm; FP8 on GPUs that have it)
bf16_mm.py         batched products (attention) on bf16 codes, static and gated
gated.py           gated (DFQ) ops' per-sample state, gated linear layers on bf16 codes
bf16_conv.py       every convolution kind on bf16 codes, forward and both gradients (fracpass::bf16_conv)
conv_state.py      a convolution's state between its call and its ops (ConvState, its flat op arguments)
int8_conv.py       a bf16 convolution's products on int8 units (oneDNN's int8 conv, the VNNI kernel)
conv_offsets.py    the offset corrections (window sums of the codes)
conv_bn.py         convolution + BatchNorm (+ residual, ReLU) as one op (fracpass::bf16_conv_bn)
int8_conv2d.py     conv2d's forward on oneDNN's int8 convolution (opt-in kind "conv2d_int8")
calls.py           the graph's native calls and their rule table (CALLS)
breaks.py          where torch.compile breaks a native call's graph: its few host reads, and their messages
report.py          op_paths / product_paths: what runs where
=================  ===============================================================================
"""
from fracpass.native.options import DEFAULT_KINDS, EXECUTIONS, KINDS, NativeOptions, check_execution
from fracpass.native.report import op_paths, product_paths
from fracpass.native.site import NATIVE, NativeInfo, NativeSite
from fracpass.native.units import bf16_support, fp8_support, int8_support

__all__ = ["NativeOptions", "KINDS", "DEFAULT_KINDS", "EXECUTIONS", "check_execution", "op_paths", "product_paths",
           "int8_support", "bf16_support", "fp8_support", "NATIVE", "NativeInfo", "NativeSite", "configure"]


def configure(qmodel, options: NativeOptions):
    """Give a transformed native model other NativeOptions: its graphs are lowered again with them (the
    quantizers, their state and the stage are kept). Returns ``qmodel``."""
    from fracpass.state import reconfigure_native

    return reconfigure_native(qmodel, options)
