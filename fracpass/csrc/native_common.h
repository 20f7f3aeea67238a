// The native CPU kernels' shared internal header (fracpass.kernels.NATIVE builds native_*.cpp into one
// extension): the helpers their files share, and the kernels' declarations for native_module.cpp.
// The kernels, in the files named after what they do:
//
// Fused CPU kernels around fracpass's int8 products (fracpass/native.py): one pass each for the codes
// going in and for the scaled output coming out of torch._int_mm.
//
//   encode:      t = int8(clamp(nearbyint(x / s), lo, hi) - shift), per tensor or per row of x (R, C),
//                plus the row and column sums of t (the zero-point corrections need them);
//                the same float32 arithmetic as fracpass.quant.fake_quantize.
//   grad_codes:  the stochastic rounding of fracpass_quant_cpu's grad_sr, bit for bit (dither.h: the same
//                dither for the same seed): q = min(floor((g - mn) / s + u), levels); returns ghat = q * s + mn (if
//                asked for: a product that runs on int8 reads the codes alone), t = int8(q - half) and the row
//                and column sums of t.
//   epilogue:    y = sa sb (acc + row_a kb + ka col_b') + ca sb col_b' + cb sa row_a' + K ca cb + bias, with
//                col_b' = col_b + K kb and row_a' = row_a + K ka, written over acc (int32 -> float32 in place).
//   decode:      x = s * (t + k), per tensor or per row: the float operand of a product that cannot run on int8;
//   decode_u8:   the same for uint8 activation codes with a per-tensor zero point (the conv path), any dense layout.
//   encode_bf16: q = clamp(nearbyint(x / s), lo, hi) per tensor or per row of dim 0 (a gated op's samples),
//                as bfloat16 (exact: |q| <= 255), in x's memory layout (contiguous or channels_last): the
//                operands of the bf16 convolution path; with one range, also as bytes q - lo if asked (what
//                codes_to_u8 makes, in the same pass: the codes a convolution keeps for backward, and the
//                int8 forward's input), or only those bytes.
//   grad_codes_bf16: grad_codes over a dense tensor in memory order (the simulation's order, same dither), per
//                tensor or with one range and level count per row of dim 0 (grad_sr_rows, gated ops),
//                codes t = q - shift as bfloat16 in the same layout (|t| <= 255: exact), ghat only if asked for,
//                and q itself as bytes if asked (the int8 input gradient's operand, zero point the shift).
//   scale_bf16:  y = v * s (+ bias) from a bf16 product v, with s and bias per channel (dim 1), and s
//                times a per-row (per-sample, dim 0) factor if given, plus an addend repeated in every row
//                if given (an input gradient's offset correction, the same for each sample), float32 out
//                in v's layout: the bf16 path's epilogue.
//   batch_sum_bf16: the sum over dim 0 of bf16 codes into float32 (the window sums of the weight
//                gradient's offset correction).
//   codes_to_u8 / u8_to_codes: bfloat16 codes spanning at most 256 values as bytes q - offset and back,
//                layout kept (a convolution's input codes, saved for backward in 1 byte instead of 2); back
//                with their batch sum if asked (what batch_sum_bf16 would compute from them).
//   relu_bits_:  ReLU in place over a dense float32 tensor (torch.relu_'s values: NaN and -0.0 kept) with
//                the mask out <= 0 packed 8 elements to a byte in memory order, in one pass (the fused
//                conv-BN-ReLU keeps it for backward: 1 bit per element instead of relu's 32; relu_ then
//                `out <= 0` took two passes, the comparison 10x the ReLU's time).
//   relu_grad_bits: threshold_backward(grad, out, 0) from those bits, grad in out's layout: 0 where dead,
//                grad elsewhere (torch.where and masked_fill over a bool mask took 4-5 ms for 2M elements
//                here, 30x a copy).
//   ones_input_grad / window_sums: the offset corrections' window sums of a 2-D convolution (groups 1, not
//                transposed): conv^T(ones, q_w) over one sample and conv_w(ones, batch sum of q_a) for one
//                output channel, from the taps each input position feeds (oneDNN's calls for these took
//                ~100 us each, for a few thousand additions).
//   int8_weight_codes / append_channels / shifted_product_bf16: the bf16 path's forward product on oneDNN's
//                int8 convolution: the weight's bfloat16 codes as int8 (8-bit codes outside int8 split onto
//                copies of their input channels, or else shifted per output channel), and the shifted
//                channels' product corrected with the input codes' window sums and rounded once to
//                bfloat16 (the product the bf16 convolution computes).
//   weight_grad_u8: dw's window products of a stride-1 2-D convolution from the gradient's and the input's
//                bytes on AVX512-VNNI (vpdpbusd), exact in int64, with the windows' sums of the input codes.
//   bn_forward_bf16 / bn_backward_bf16: the fused conv-BN(-add)(-ReLU) op's BatchNorm straight from the
//                convolution's channels-last bf16 product (native_batchnorm.cpp's opening comment says how).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "dither.h"

namespace {

using fracpass::dither::chunk_key;
using fracpass::dither::grad_step;
using fracpass::dither::kChunk;
using fracpass::dither::sr_level;

template <typename T>
std::vector<float> tiled(const std::vector<T>& per_channel, int64_t L) {  // channel j % C at lane j
  const int64_t C = static_cast<int64_t>(per_channel.size());
  std::vector<float> t(L);
  for (int64_t j = 0, c = 0; j < L; ++j, c = c + 1 == C ? 0 : c + 1) t[j] = static_cast<float>(per_channel[c]);
  return t;
}

void check2d(const torch::Tensor& x, c10::ScalarType type, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == type && x.dim() == 2 && x.is_contiguous(), what,
              ": expected a contiguous 2-D CPU tensor of ", type);
}

void check_dense(const torch::Tensor& x, c10::ScalarType type, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == type && x.is_non_overlapping_and_dense(), what,
              ": expected a dense CPU tensor of ", type);
}

template <typename T>
const T* values(const torch::Tensor& t, int64_t n, const char* what) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.is_contiguous() && (t.numel() == 1 || t.numel() == n), what, ": expected 1 or ", n, " values, got ",
              t.numel());
  return t.data_ptr<T>();
}

inline int64_t per(const torch::Tensor& t) { return t.numel() > 1 ? 1 : 0; }

// Rows split in one chunk per thread; each chunk sums its own columns, then the chunks are added.
template <typename F>
torch::Tensor by_row_chunks(int64_t rows, int64_t cols, F body) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  auto partial = torch::zeros({chunks, cols}, torch::kInt);
  int32_t* pc = partial.data_ptr<int32_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) body(rows * ch / chunks, rows * (ch + 1) / chunks, pc + ch * cols);
  });
  return partial.sum(0, false, torch::kInt);
}

// Adds a row of codes to the column sums and returns its sum: a separate pass over the codes just
// written (in L1), as fusing the sums into the loop that computes the codes kept it from vectorizing
// (measured 18x slower on a 2048 x 512 encode).
inline int32_t add_row(const int8_t* __restrict t, int64_t C, int32_t* __restrict col) {
  int32_t sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int32_t v = t[c];
    sum += v;
    col[c] += v;
  }
  return sum;
}

}  // namespace

namespace {

// A float holding an integer of magnitude <= 256 has its low 16 bits zero: its bfloat16 is its top half, exactly.
inline uint16_t bf16_top(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

#ifdef __AVX512F__
inline __m512 load_bf16x16(const uint16_t* p) {  // 16 bfloat16 values as float32 (the high half of each)
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// x itself, hidden from the compiler's contraction of a * b + c into an FMA (one rounding instead of two).
inline __m512 rounded(__m512 x) {
  asm("" : "+v"(x));
  return x;
}

// 16 bfloat16 values v times s, then plus a (if given), rounded twice: scale_bf16's epilogue (and GradIn's)
inline __m512 scaled16(const uint16_t* v, __m512 s, const float* a) {
  const __m512 p = rounded(_mm512_mul_ps(load_bf16x16(v), s));
  return a != nullptr ? _mm512_add_ps(p, _mm512_loadu_ps(a)) : p;
}
#endif

// Elements b..e of bfloat16 codes as bytes q - off (the codes span at most 256 values from off).
inline void codes_to_bytes(const uint16_t* __restrict in, uint8_t* __restrict o, int64_t b, int64_t e, float off) {
  int64_t i = b;
#ifdef __AVX512F__
  const __m512 vo = _mm512_set1_ps(off);
  for (; i + 16 <= e; i += 16) {  // GCC left the scalar loop unvectorized (10x a copy)
    const __m512i k = _mm512_cvttps_epi32(_mm512_sub_ps(load_bf16x16(in + i), vo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm512_cvtepi32_epi8(k));
  }
#endif
  for (; i < e; ++i) o[i] = static_cast<uint8_t>(static_cast<int32_t>(bf16_value(in[i]) - off));
}

// The channel (dim 1) of each memory index of a dense tensor that keeps dim 0 outermost: contiguous
// (channels at stride inner) or channels-last (channels at stride 1).
struct ChannelOf {
  int64_t stride, count;
  explicit ChannelOf(const torch::Tensor& t) : stride(t.dim() > 1 ? t.stride(1) : 1), count(t.dim() > 1 ? t.size(1) : 1) {}
  inline int64_t operator()(int64_t i) const { return (i / stride) % count; }
};

// The per-row parameter of row r: one value for every row, or one per row.
inline float row_value(const float* p, int64_t numel, int64_t r) { return p[numel == 1 ? 0 : r]; }

void check_row_params(const torch::Tensor& x, std::initializer_list<const torch::Tensor*> params, const char* what) {
  const int64_t rows = x.dim() > 0 ? x.size(0) : 1;
  for (const torch::Tensor* p : params)
    TORCH_CHECK(p->device().is_cpu() && p->scalar_type() == torch::kFloat && p->is_contiguous() &&
                    (p->numel() == 1 || p->numel() == rows),
                what, ": expected float32 parameters with one value, or one per row of dim 0 (", rows, ")");
  TORCH_CHECK(x.dim() == 0 || x.size(0) <= 1 || x.stride(0) * x.size(0) == x.numel() ||
                  std::all_of(params.begin(), params.end(), [](const torch::Tensor* p) { return p->numel() == 1; }),
              what, ": per-row parameters need dim 0 outermost in memory");
}

void check_channels_last(const torch::Tensor& x, int64_t C, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 3 && x.size(1) == C && x.stride(1) == 1 &&
                  x.is_non_overlapping_and_dense(), what, ": expected a dense channels-last CPU tensor with ", C,
              " channels");
}

}  // namespace

// The kernels (native_*.cpp), bound by native_module.cpp.
torch::Tensor codes_to_u8(const torch::Tensor& q, double offset);
std::vector<torch::Tensor> u8_to_codes(const torch::Tensor& u, double offset, bool batch_sum);
torch::Tensor relu_bits_(torch::Tensor out);
torch::Tensor relu_grad_bits(const torch::Tensor& grad, const torch::Tensor& bits);
torch::Tensor decode_u8(const torch::Tensor& u, const torch::Tensor& zp, const torch::Tensor& scale);
torch::Tensor decode(const torch::Tensor& t, const torch::Tensor& k, const torch::Tensor& scale);
std::vector<torch::Tensor> encode(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& lo,
                                  const torch::Tensor& hi, const torch::Tensor& shift);
std::vector<torch::Tensor> grad_codes(const torch::Tensor& g, const torch::Tensor& mn_t, const torch::Tensor& mx_t,
                                      double levels, int64_t seed, bool values);
std::vector<torch::Tensor> encode_bf16(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& lo,
                                       const torch::Tensor& hi, bool bytes, bool codes);
bool vnni_weight_grad();
std::vector<torch::Tensor> weight_grad_u8(const torch::Tensor& ug, double kg, const torch::Tensor& ua, double lo,
                                          int64_t KH, int64_t KW, std::vector<int64_t> pad,
                                          std::vector<int64_t> dilation);
std::vector<torch::Tensor> int8_weight_codes(const torch::Tensor& qw, int64_t max_extra);
torch::Tensor append_channels(const torch::Tensor& u, const torch::Tensor& dup);
torch::Tensor shifted_product_bf16(const torch::Tensor& y, const torch::Tensor& u, double offset, const torch::Tensor& k,
                                   int64_t KH, int64_t KW, std::vector<int64_t> stride, std::vector<int64_t> pad,
                                   std::vector<int64_t> dilation, const torch::Tensor& scale, const torch::Tensor& addend);
std::vector<torch::Tensor> grad_codes_bf16(const torch::Tensor& g, const torch::Tensor& mn_t, const torch::Tensor& mx_t,
                                           const torch::Tensor& levels_t, const torch::Tensor& zero_t, int64_t seed,
                                           bool values, bool bytes);
torch::Tensor batch_sum_bf16(const torch::Tensor& q);
torch::Tensor scale_bf16(const torch::Tensor& v, const torch::Tensor& scale, const torch::Tensor& bias,
                         const torch::Tensor& row_scale, const torch::Tensor& addend);
std::vector<torch::Tensor> bn_forward_bf16(const torch::Tensor& v, const torch::Tensor& scale, const torch::Tensor& bias,
                                           const torch::Tensor& w, const torch::Tensor& b, torch::Tensor running_mean,
                                           torch::Tensor running_var, bool training, double momentum, double eps,
                                           const torch::Tensor& residual, bool relu);
std::vector<torch::Tensor> bn_backward_bf16(const torch::Tensor& grad, const torch::Tensor& bits, const torch::Tensor& v,
                                            const torch::Tensor& ref, const torch::Tensor& scale,
                                            const torch::Tensor& bias, const torch::Tensor& w,
                                            const torch::Tensor& mean_t, const torch::Tensor& invstd_t, bool training,
                                            bool keep_grad, const torch::Tensor& grad_scale,
                                            const torch::Tensor& grad_addend);
torch::Tensor ones_input_grad(const torch::Tensor& qw, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                              std::vector<int64_t> stride, std::vector<int64_t> pad, std::vector<int64_t> dilation);
torch::Tensor window_sums(const torch::Tensor& total, int64_t KH, int64_t KW, int64_t Ho, int64_t Wo,
                          std::vector<int64_t> stride, std::vector<int64_t> pad, std::vector<int64_t> dilation);
torch::Tensor epilogue(torch::Tensor acc, const torch::Tensor& sa, const torch::Tensor& sb, const torch::Tensor& row_a,
                       const torch::Tensor& kb, const torch::Tensor& ka, const torch::Tensor& col_b,
                       const torch::Tensor& ca, const torch::Tensor& cb, const torch::Tensor& bias, int64_t K);
