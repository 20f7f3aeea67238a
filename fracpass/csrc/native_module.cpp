// The native kernels' Python module: every kernel of native_*.cpp, bound by name.
#include "native_common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("codes_to_u8", &codes_to_u8, "bytes q - offset of bfloat16 codes spanning <= 256 values, layout kept");
  m.def("u8_to_codes", &u8_to_codes, "bfloat16 codes u + offset of codes_to_u8's bytes, layout kept, and their sum over dim 0 if asked");
  m.def("relu_bits_", &relu_bits_, "ReLU in place over a dense float32 tensor, returning out <= 0 as bits in memory order");
  m.def("relu_grad_bits", &relu_grad_bits, "threshold_backward(grad, out, 0) from relu_bits_'s bits, grad in out's layout");
  m.def("decode_u8", &decode_u8, "float32 values s * (u - zp) of uint8 codes, per tensor, layout kept");
  m.def("decode", &decode, "float32 values s * (t + k) of int8 codes, per tensor or per row");
  m.def("encode", &encode, "int8 codes of a 2-D float tensor (per tensor or per row) with row and column sums");
  m.def("grad_codes", &grad_codes, "grad_sr's stochastic rounding as int8 codes with row and column sums, and as values if asked");
  m.def("encode_bf16", &encode_bf16, "bfloat16 codes clamp(round(x / s), lo, hi) of a dense float tensor, layout kept, if asked, and if asked the same codes as bytes q - lo");
  m.def("vnni_weight_grad", &vnni_weight_grad, "whether weight_grad_u8 was built (AVX512-VNNI)");
  m.def("weight_grad_u8", &weight_grad_u8, "dw's exact integer product of a stride-1 2-D convolution from the gradient's and input's bytes, and the windows' sums of the input codes");
  m.def("int8_weight_codes", &int8_weight_codes, "int8 weight codes of bfloat16 codes: as they are where they fit, else split onto copies of their input channels, else t = q - k_c per output channel");
  m.def("append_channels", &append_channels, "a channels-last uint8 tensor with some of its channels copied after its own");
  m.def("shifted_product_bf16", &shifted_product_bf16, "bfloat16(y + k_c * window sums of the input codes): the codes' product from an int8 convolution with shifted weights; with a scale, float32 v * scale (+ an addend per sample) instead");
  m.def("grad_codes_bf16", &grad_codes_bf16, "grad_sr's stochastic rounding over a dense tensor: codes as bfloat16, values if asked, q as bytes if asked");
  m.def("batch_sum_bf16", &batch_sum_bf16, "float32 sum over dim 0 of bf16 codes, dim 0 outermost in memory");
  m.def("scale_bf16", &scale_bf16, "float32 v * s (* row_scale) + bias per channel (dim 1) (+ an addend per row) of a bf16 product, layout kept");
  m.def("bn_forward_bf16", &bn_forward_bf16, "the fused op's BatchNorm forward from a channels-last bf16 product");
  m.def("bn_backward_bf16", &bn_backward_bf16, "the fused op's BatchNorm backward: dL/dy with its range, the parameters' gradients");
  m.def("ones_input_grad", &ones_input_grad, "conv^T(ones, q_w) over one sample of a 2-D convolution (groups 1): dx's offset correction");
  m.def("window_sums", &window_sums, "conv_w(ones, total) for one output channel of a 2-D convolution (groups 1): dw's offset correction");
  m.def("epilogue", &epilogue, "scaled, zero-point-corrected float32 output of an int32 product, in place");
}

// ---- the same kernels as torch ops, fracpass::<name> (see quant_cpu.cpp's): so far relu_bits_ and
// relu_grad_bits; fracpass/kernel_ops.py registers their fake implementations.
namespace {

torch::Tensor relu_bits_op(torch::Tensor& out) { return relu_bits_(out); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fracpass, m) {
  m.def("relu_bits_(Tensor(a!) out) -> Tensor");
  m.def("relu_grad_bits(Tensor grad, Tensor bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(fracpass, CPU, m) {
  m.impl("relu_bits_", &relu_bits_op);
  m.impl("relu_grad_bits", &relu_grad_bits);
}
