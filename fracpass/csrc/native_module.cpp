// The native kernels (native_*.cpp) as torch ops, fracpass::<name>: one schema and one CPU implementation
// each. fracpass/kernel_ops.py registers their fake implementations, fracpass.native.units.ext() calls
// them. The Python module itself binds only the build's capability query.
#include "native_common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vnni_weight_grad", &vnni_weight_grad, "whether weight_grad_u8 was built (AVX512-VNNI)");
}

namespace {

torch::Tensor relu_bits_op(torch::Tensor& out) { return relu_bits_(out); }

// epilogue writes its float32 output over acc's int32 memory: as an op it returns nothing (the caller views
// acc as float32), since an op may not return an alias of its input
void epilogue_op(torch::Tensor& acc, const torch::Tensor& sa, const torch::Tensor& sb, const torch::Tensor& row_a,
                 const torch::Tensor& kb, const torch::Tensor& ka, const torch::Tensor& col_b, const torch::Tensor& ca,
                 const torch::Tensor& cb, const torch::Tensor& bias, int64_t K) {
  epilogue(acc, sa, sb, row_a, kb, ka, col_b, ca, cb, bias, K);
}

// bn_forward_bf16 updates the running statistics in place (mutable arguments of the op); its outputs as a
// tuple, as functionalization takes a mutating op's outputs only so
using Seven = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                         torch::Tensor>;
Seven bn_forward_op(const torch::Tensor& v, const torch::Tensor& scale, const torch::Tensor& bias,
                    const torch::Tensor& w, const torch::Tensor& b, torch::Tensor& running_mean,
                    torch::Tensor& running_var, bool training, double momentum, double eps,
                    const torch::Tensor& residual, bool relu) {
  auto o = bn_forward_bf16(v, scale, bias, w, b, running_mean, running_var, training, momentum, eps, residual, relu);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fracpass, m) {
  // bytes q - offset of bfloat16 codes spanning <= 256 values, layout kept
  m.def("codes_to_u8(Tensor q, float offset) -> Tensor");
  // bfloat16 codes u + offset of codes_to_u8's bytes, layout kept, and their float32 sum over dim 0 if asked
  // (else an empty tensor)
  m.def("u8_to_codes(Tensor u, float offset, bool batch_sum) -> Tensor[]");
  // ReLU in place over a dense float32 tensor, returning out <= 0 as bits in memory order
  m.def("relu_bits_(Tensor(a!) out) -> Tensor");
  // threshold_backward(grad, out, 0) from relu_bits_'s bits, grad in out's layout
  m.def("relu_grad_bits(Tensor grad, Tensor bits) -> Tensor");
  // float32 values s * (u - zp) of uint8 codes, per tensor, layout kept
  m.def("decode_u8(Tensor u, Tensor zp, Tensor scale) -> Tensor");
  // float32 values s * (t + k) of int8 codes, per tensor or per row
  m.def("decode(Tensor t, Tensor k, Tensor scale) -> Tensor");
  // int8 codes of a 2-D float tensor (per tensor or per row) with row and column sums
  m.def("encode(Tensor x, Tensor scale, Tensor lo, Tensor hi, Tensor shift) -> Tensor[]");
  // grad_sr's stochastic rounding as int8 codes with row and column sums, and as values if asked
  m.def("grad_codes(Tensor g, Tensor mn, Tensor mx, float levels, int seed, bool values) -> Tensor[]");
  // bfloat16 codes clamp(round(x / s), lo, hi) of a dense float tensor, layout kept, if asked, and if asked the same
  // codes as bytes q - lo
  m.def("encode_bf16(Tensor x, Tensor scale, Tensor lo, Tensor hi, bool bytes, bool codes) -> Tensor[]");
  // dw's exact integer product of a stride-1 2-D convolution from the gradient's and input's bytes, and the
  // windows' sums of the input codes
  m.def("weight_grad_u8(Tensor ug, float kg, Tensor ua, float lo, int KH, int KW, int[] pad, int[] dilation) -> Tensor[]");
  // int8 weight codes of bfloat16 codes: as they are where they fit, else split onto copies of their input
  // channels (how many: known from the values only), else t = q - k_c per output channel
  m.def("int8_weight_codes(Tensor qw, int max_extra) -> Tensor[]");
  // a channels-last uint8 tensor with some of its channels copied after its own
  m.def("append_channels(Tensor u, Tensor dup) -> Tensor");
  // bfloat16(y + k_c * window sums of the input codes): the codes' product from an int8 convolution with shifted
  // weights; with a scale, float32 v * scale (+ an addend per sample) instead
  m.def("shifted_product_bf16(Tensor y, Tensor u, float offset, Tensor k, int KH, int KW, int[] stride, int[] pad, "
        "int[] dilation, Tensor scale, Tensor addend) -> Tensor");
  // grad_sr's stochastic rounding over a dense tensor: codes as bfloat16, values if asked, q as bytes if asked
  m.def("grad_codes_bf16(Tensor g, Tensor mn, Tensor mx, Tensor levels, Tensor zero, int seed, bool values, "
        "bool bytes) -> Tensor[]");
  // float32 sum over dim 0 of bf16 codes, dim 0 outermost in memory
  m.def("batch_sum_bf16(Tensor q) -> Tensor");
  // float32 v * s (* row_scale) + bias per channel (dim 1) (+ an addend per row) of a bf16 product, layout kept
  m.def("scale_bf16(Tensor v, Tensor scale, Tensor bias, Tensor row_scale, Tensor addend) -> Tensor");
  // the fused op's BatchNorm forward from a channels-last bf16 product (the running statistics updated in place)
  m.def("bn_forward_bf16(Tensor v, Tensor scale, Tensor bias, Tensor w, Tensor b, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, bool training, float momentum, float eps, Tensor residual, bool relu) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // the fused op's BatchNorm backward: dL/dy with its range, the gradient after the ReLU if kept (else an empty
  // tensor), the parameters' gradients
  m.def("bn_backward_bf16(Tensor grad, Tensor bits, Tensor v, Tensor ref, Tensor scale, Tensor bias, Tensor w, "
        "Tensor mean, Tensor invstd, bool training, bool keep_grad, Tensor grad_scale, Tensor grad_addend) -> Tensor[]");
  // conv^T(ones, q_w) over one sample of a 2-D convolution (groups 1): dx's offset correction
  m.def("ones_input_grad(Tensor qw, int H, int W, int Ho, int Wo, int[] stride, int[] pad, int[] dilation) -> Tensor");
  // conv_w(ones, total) for one output channel of a 2-D convolution (groups 1): dw's offset correction
  m.def("window_sums(Tensor total, int KH, int KW, int Ho, int Wo, int[] stride, int[] pad, int[] dilation) -> Tensor");
  // the scaled, zero-point-corrected float32 output of an int32 product, written over acc (view it as float32)
  m.def("epilogue(Tensor(a!) acc, Tensor sa, Tensor sb, Tensor row_a, Tensor kb, Tensor ka, Tensor col_b, Tensor ca, "
        "Tensor cb, Tensor bias, int K) -> ()");
}

TORCH_LIBRARY_IMPL(fracpass, CPU, m) {
  m.impl("codes_to_u8", &codes_to_u8);
  m.impl("u8_to_codes", &u8_to_codes);
  m.impl("relu_bits_", &relu_bits_op);
  m.impl("relu_grad_bits", &relu_grad_bits);
  m.impl("decode_u8", &decode_u8);
  m.impl("decode", &decode);
  m.impl("encode", &encode);
  m.impl("grad_codes", &grad_codes);
  m.impl("encode_bf16", &encode_bf16);
  m.impl("weight_grad_u8", &weight_grad_u8);
  m.impl("int8_weight_codes", &int8_weight_codes);
  m.impl("append_channels", &append_channels);
  m.impl("shifted_product_bf16", &shifted_product_bf16);
  m.impl("grad_codes_bf16", &grad_codes_bf16);
  m.impl("batch_sum_bf16", &batch_sum_bf16);
  m.impl("scale_bf16", &scale_bf16);
  m.impl("bn_forward_bf16", &bn_forward_op);
  m.impl("bn_backward_bf16", &bn_backward_bf16);
  m.impl("ones_input_grad", &ones_input_grad);
  m.impl("window_sums", &window_sums);
  m.impl("epilogue", &epilogue_op);
}
