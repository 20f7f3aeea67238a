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
//                convolution's channels-last bf16 product (the section before them says how).
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

std::vector<torch::Tensor> encode(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& lo,
                                  const torch::Tensor& hi, const torch::Tensor& shift) {
  check2d(x, torch::kFloat, "encode");
  const int64_t R = x.size(0), C = x.size(1);
  auto t = torch::empty({R, C}, torch::kChar);
  auto rows = torch::empty({R}, torch::kInt);
  const float* src = x.data_ptr<float>();
  int8_t* dst = t.data_ptr<int8_t>();
  int32_t* prow = rows.data_ptr<int32_t>();
  const float *ps = values<float>(scale, R, "encode scale"), *pl = values<float>(lo, R, "encode lo"),
              *ph = values<float>(hi, R, "encode hi"), *psh = values<float>(shift, R, "encode shift");
  const int64_t ds = per(scale), dl = per(lo), dh = per(hi), dsh = per(shift);
  auto cols = by_row_chunks(R, C, [&](int64_t r0, int64_t r1, int32_t* col) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s = ps[r * ds], l = pl[r * dl], h = ph[r * dh], sh = psh[r * dsh];
      const float* __restrict in = src + r * C;
      int8_t* __restrict out = dst + r * C;
      const int64_t n = C;  // a local count: through the lambda's reference, int8 stores (char) may alias it
      for (int64_t c = 0; c < n; ++c) {  // the codes alone: this loop vectorizes
        float q = std::nearbyint(in[c] / s);
        q = q < l ? l : q;
        q = q > h ? h : q;
        out[c] = static_cast<int8_t>(static_cast<int32_t>(q - sh));
      }
      prow[r] = add_row(out, C, col);
    }
  });
  return {t, rows, cols};
}

std::vector<torch::Tensor> grad_codes(const torch::Tensor& g, const torch::Tensor& mn_t, const torch::Tensor& mx_t,
                                      double levels, int64_t seed, bool values) {
  check2d(g, torch::kFloat, "grad_codes");
  const int64_t R = g.size(0), C = g.size(1);
  auto ghat = values ? torch::empty({R, C}, torch::kFloat) : torch::empty({0}, torch::kFloat);
  auto t = torch::empty({R, C}, torch::kChar);
  auto rows = torch::empty({R}, torch::kInt);
  const float* src = g.data_ptr<float>();
  float* out = values ? ghat.data_ptr<float>() : nullptr;
  int8_t* codes = t.data_ptr<int8_t>();
  int32_t* prow = rows.data_ptr<int32_t>();
  const float lv = static_cast<float>(levels), mn = mn_t.item<float>(), s = grad_step(mn, mx_t.item<float>(), lv);
  const float half_levels = std::floor((lv + 1.0f) / 2.0f);
  auto cols = by_row_chunks(R, C, [&](int64_t r0, int64_t r1, int32_t* col) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t c = 0;
      while (c < C) {  // spans that stay inside one dither chunk
        const int64_t i = r * C + c, chunk = i / kChunk;
        const int64_t stop = std::min(C, (chunk + 1) * kChunk - r * C);
        const uint32_t key = chunk_key(seed, chunk), first = static_cast<uint32_t>(i - chunk * kChunk);
        const float* __restrict in = src + r * C;
        float* __restrict o = out != nullptr ? out + r * C : nullptr;
        int8_t* __restrict q8 = codes + r * C;
        // locals, not the lambda's references: int8 stores (char) may alias those, which kept the loop scalar
        const float k_mn = mn, k_s = s, k_lv = lv, k_hl = half_levels;
        const int64_t j0 = c, j1 = stop;
        auto span = [&](auto with_values) {  // values and codes alone: this loop vectorizes
          for (int64_t j = j0; j < j1; ++j) {
            const float q = sr_level(key, first + static_cast<uint32_t>(j - j0), in[j], k_mn, k_s, k_lv);
            if constexpr (decltype(with_values)::value) o[j] = q * k_s + k_mn;
            q8[j] = static_cast<int8_t>(static_cast<int32_t>(q - k_hl));
          }
        };
        if (out != nullptr) span(std::true_type{});
        else span(std::false_type{});
        c = stop;
      }
      prow[r] = add_row(codes + r * C, C, col);
    }
  });
  return {ghat, t, rows, cols};
}

torch::Tensor epilogue(torch::Tensor acc, const torch::Tensor& sa, const torch::Tensor& sb, const torch::Tensor& row_a,
                       const torch::Tensor& kb, const torch::Tensor& ka, const torch::Tensor& col_b,
                       const torch::Tensor& ca, const torch::Tensor& cb, const torch::Tensor& bias, int64_t K) {
  check2d(acc, torch::kInt, "epilogue");
  const int64_t M = acc.size(0), N = acc.size(1);
  const float *psa = values<float>(sa, M, "epilogue sa"), *psb = values<float>(sb, N, "epilogue sb");
  const int32_t *pra = values<int32_t>(row_a, M, "epilogue row_a"), *pkb = values<int32_t>(kb, N, "epilogue kb"),
                *pka = values<int32_t>(ka, M, "epilogue ka"), *pcb = values<int32_t>(col_b, N, "epilogue col_b");
  const float* pbias = values<float>(bias, N, "epilogue bias");
  const float fca = ca.numel() ? ca.item<float>() : 0.0f, fcb = cb.numel() ? cb.item<float>() : 0.0f;
  const int64_t dsa = per(sa), dsb = per(sb), dkb = per(kb), dka = per(ka);
  // per column: scale, offset k, corrected column sum, and the float terms that depend on the column only
  std::vector<float> col_s(N), col_add(N);
  std::vector<int32_t> col_k(N), col_sum(N);
  for (int64_t n = 0; n < N; ++n) {
    col_s[n] = psb[n * dsb];
    col_k[n] = pkb ? pkb[n * dkb] : 0;
    col_sum[n] = (pcb ? pcb[n] : 0) + static_cast<int32_t>(K) * col_k[n];
    col_add[n] = (ca.numel() ? fca * col_s[n] * static_cast<float>(col_sum[n]) : 0.0f) + (pbias ? pbias[n] : 0.0f) +
                 (ca.numel() && cb.numel() ? static_cast<float>(K) * fca * fcb : 0.0f);
  }
  int32_t* pacc = acc.data_ptr<int32_t>();
  float* py = reinterpret_cast<float*>(pacc);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float s_i = psa[i * dsa];
      const int32_t ka_i = pka ? pka[i * dka] : 0, ra_i = pra ? pra[i] : 0;
      const float row_add = cb.numel() ? fcb * s_i * static_cast<float>(ra_i + static_cast<int32_t>(K) * ka_i) : 0.0f;
      int32_t* a = pacc + i * N;
      float* y = py + i * N;
      for (int64_t n = 0; n < N; ++n) {
        const int32_t v = a[n] + ra_i * col_k[n] + ka_i * col_sum[n];
        y[n] = static_cast<float>(v) * (s_i * col_s[n]) + col_add[n] + row_add;
      }
    }
  });
  return acc.view(torch::kFloat);
}

// x = s * (t + k) per tensor or per row of t (R, C): the float operand the simulation multiplies.
torch::Tensor decode(const torch::Tensor& t, const torch::Tensor& k, const torch::Tensor& scale) {
  check2d(t, torch::kChar, "decode");
  const int64_t R = t.size(0), C = t.size(1);
  auto x = torch::empty({R, C}, torch::kFloat);
  const int8_t* src = t.data_ptr<int8_t>();
  float* dst = x.data_ptr<float>();
  const int32_t* pk = values<int32_t>(k, R, "decode k");
  const float* ps = values<float>(scale, R, "decode scale");
  const int64_t dk = per(k), ds = per(scale);
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int32_t kr = pk ? pk[r * dk] : 0;
      const float sr = ps[r * ds];
      for (int64_t c = 0; c < C; ++c) dst[r * C + c] = static_cast<float>(src[r * C + c] + kr) * sr;
    }
  });
  return x;
}

// x = s * (u - zp) for uint8 codes u with a per-tensor zero point, in u's memory layout (any dense one).
torch::Tensor decode_u8(const torch::Tensor& u, const torch::Tensor& zp, const torch::Tensor& scale) {
  check_dense(u, torch::kByte, "decode_u8");
  auto x = torch::empty_strided(u.sizes(), u.strides(), u.options().dtype(torch::kFloat));
  const uint8_t* src = u.data_ptr<uint8_t>();
  float* dst = x.data_ptr<float>();
  const float z = zp.item<float>(), s = scale.item<float>();
  at::parallel_for(0, u.numel(), 1 << 15, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = (static_cast<float>(src[i]) - z) * s;
  });
  return x;
}

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

}  // namespace

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

std::vector<torch::Tensor> encode_bf16(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& lo,
                                       const torch::Tensor& hi, bool bytes, bool codes) {
  check_dense(x, torch::kFloat, "encode_bf16");
  check_row_params(x, {&scale, &lo, &hi}, "encode_bf16");
  TORCH_CHECK(codes || bytes, "encode_bf16: nothing asked for (neither codes nor bytes)");
  auto t = torch::empty_strided(codes ? x.sizes() : at::IntArrayRef{0}, codes ? x.strides() : at::IntArrayRef{1},
                                x.options().dtype(torch::kBFloat16));
  const float* src = x.data_ptr<float>();
  uint16_t* dst = codes ? reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()) : nullptr;
  const float *ps = scale.data_ptr<float>(), *pl = lo.data_ptr<float>(), *ph = hi.data_ptr<float>();
  const int64_t n = x.numel(), rows = x.dim() > 0 && x.size(0) > 0 ? x.size(0) : 1, per = n / rows;
  const int64_t ns = scale.numel(), nl = lo.numel(), nh = hi.numel();
  TORCH_CHECK(!bytes || (ns == 1 && nl == 1 && nh == 1 && ph[0] - pl[0] <= 255.0f),
              "encode_bf16: bytes q - lo need one range for the tensor spanning at most 256 codes");
  auto u = torch::empty_strided(bytes ? x.sizes() : at::IntArrayRef{0}, bytes ? x.strides() : at::IntArrayRef{1},
                                x.options().dtype(torch::kByte));
  uint8_t* bdst = bytes ? u.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    int64_t i = b;
    while (i < e) {  // spans inside one row
      const int64_t r = per > 0 ? i / per : 0, stop = std::min(e, (r + 1) * per);
      const float ks = row_value(ps, ns, r), kl = row_value(pl, nl, r), kh = row_value(ph, nh, r);
      const float* __restrict in = src;
      uint16_t* __restrict out = dst;
      int64_t j = i;
#ifdef __AVX512F__
      if (bdst != nullptr) {  // the codes and their bytes in one loop
        const __m512 vs = _mm512_set1_ps(ks), vl = _mm512_set1_ps(kl), vh = _mm512_set1_ps(kh);
        for (; j + 16 <= stop; j += 16) {
          __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(in + j), vs),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q = _mm512_min_ps(vh, _mm512_max_ps(vl, q));  // (a, q): q where equal or NaN, as the scalar loop
          if (out != nullptr)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                                _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(q), 16)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(bdst + j),
                           _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_sub_ps(q, vl))));
        }
      }
#endif
      for (; j < stop; ++j) {
        float q = std::nearbyint(in[j] / ks);
        q = q < kl ? kl : q;
        q = q > kh ? kh : q;
        if (out != nullptr) out[j] = bf16_top(q);
        if (bdst != nullptr) bdst[j] = static_cast<uint8_t>(static_cast<int32_t>(q - kl));  // codes_to_bytes's
      }
      i = stop;
    }
  });
  return {t, u};
}

// grad_sr (or grad_sr_rows, one range and level count per row of dim 0) as bfloat16 codes t = q - zero.
std::vector<torch::Tensor> grad_codes_bf16(const torch::Tensor& g, const torch::Tensor& mn_t, const torch::Tensor& mx_t,
                                           const torch::Tensor& levels_t, const torch::Tensor& zero_t, int64_t seed,
                                           bool values, bool bytes) {
  check_dense(g, torch::kFloat, "grad_codes_bf16");
  check_row_params(g, {&mn_t, &mx_t, &levels_t, &zero_t}, "grad_codes_bf16");
  TORCH_CHECK(!bytes || (levels_t.numel() == 1 && levels_t.data_ptr<float>()[0] <= 255.0f),
              "grad_codes_bf16: bytes q need one level count for the tensor, at most 255");
  const int64_t n = g.numel(), rows = g.dim() > 0 && g.size(0) > 0 ? g.size(0) : 1, per = n / rows;
  auto t = torch::empty_strided(g.sizes(), g.strides(), g.options().dtype(torch::kBFloat16));
  auto u = torch::empty_strided(bytes ? g.sizes() : at::IntArrayRef{0}, bytes ? g.strides() : at::IntArrayRef{1},
                                g.options().dtype(torch::kByte));
  uint8_t* qbytes = bytes ? u.data_ptr<uint8_t>() : nullptr;
  auto ghat = values ? torch::empty_strided(g.sizes(), g.strides(), g.options()) : torch::empty({0}, g.options());
  const float* src = g.data_ptr<float>();
  float* out = values ? ghat.data_ptr<float>() : nullptr;
  uint16_t* codes = reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
  const float *pmn = mn_t.data_ptr<float>(), *pmx = mx_t.data_ptr<float>(), *plv = levels_t.data_ptr<float>(),
              *pz = zero_t.data_ptr<float>();
  const int64_t nmn = mn_t.numel(), nmx = mx_t.numel(), nlv = levels_t.numel(), nz = zero_t.numel();
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    int64_t i = b;
    while (i < e) {  // spans that stay inside one row and one dither chunk
      const int64_t r = per > 0 ? i / per : 0, chunk = i / kChunk;
      const int64_t stop = std::min({e, (chunk + 1) * kChunk, (r + 1) * per});
      const uint32_t key = chunk_key(seed, chunk), first = static_cast<uint32_t>(i - chunk * kChunk);
      const float lv = row_value(plv, nlv, r), mn = row_value(pmn, nmn, r);
      const float k_mn = mn, k_s = grad_step(mn, row_value(pmx, nmx, r), lv), k_lv = lv, k_hl = row_value(pz, nz, r);
      const int64_t j0 = i, j1 = stop;
      // in blocks, each block's codes read back as the bytes q = t + shift while in cache (a byte store in
      // this loop stopped GCC vectorizing it: 8x slower); one loop, compiled with and without the values
      constexpr int64_t kBlock = 4096;
      auto blocks = [&](auto with_values) {
        for (int64_t b0 = j0; b0 < j1; b0 += kBlock) {
          const int64_t b1 = std::min(j1, b0 + kBlock);
          for (int64_t j = b0; j < b1; ++j) {
            const float q = sr_level(key, first + static_cast<uint32_t>(j - j0), src[j], k_mn, k_s, k_lv);
            if constexpr (decltype(with_values)::value) out[j] = q * k_s + k_mn;
            codes[j] = bf16_top(q - k_hl);
          }
          if (qbytes != nullptr) codes_to_bytes(codes, qbytes, b0, b1, -k_hl);
        }
      };
      if (out != nullptr) blocks(std::true_type{});
      else blocks(std::false_type{});
      i = stop;
    }
  });
  return {ghat, t, u};
}

torch::Tensor scale_bf16(const torch::Tensor& v, const torch::Tensor& scale, const torch::Tensor& bias,
                         const torch::Tensor& row_scale, const torch::Tensor& addend) {
  check_dense(v, torch::kBFloat16, "scale_bf16");
  TORCH_CHECK(v.dim() < 2 || v.stride(1) == 1 || v.is_contiguous(), "scale_bf16: expected a contiguous or channels-last tensor");
  auto y = torch::empty_strided(v.sizes(), v.strides(), v.options().dtype(torch::kFloat));
  const ChannelOf channel(v);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  float* dst = y.data_ptr<float>();
  const int64_t n = v.numel(), C = channel.count;
  const float* ps = values<float>(scale, C, "scale_bf16 scale");
  const float* pb = values<float>(bias, C, "scale_bf16 bias");
  const int64_t N = v.dim() > 0 && v.size(0) > 0 ? v.size(0) : 1, per_row = n / N;
  const float* pr = values<float>(row_scale, N, "scale_bf16 row_scale");
  TORCH_CHECK(pr == nullptr || N <= 1 || v.stride(0) * N == n, "scale_bf16: a per-row scale needs dim 0 outermost");
  const float* pa = values<float>(addend, per_row, "scale_bf16 addend");  // one row's worth, in memory order
  TORCH_CHECK(pa == nullptr || (addend.numel() == per_row && (N <= 1 || v.stride(0) * N == n)),
              "scale_bf16: an addend holds one row of dim 0 (", per_row, " values), with dim 0 outermost");
  if (n == 0) return y;
  if (scale.numel() == 1 && pb == nullptr && pr == nullptr) {  // one scale: a flat loop
    const float sc = ps[0];
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      if (pa == nullptr) {
        for (int64_t i = b; i < e; ++i) dst[i] = bf16_value(src[i]) * sc;
        return;
      }
      for (int64_t i = b; i < e;) {  // spans inside one row: the addend's elements in step
        const int64_t at_ = i % per_row, len = std::min(e - i, per_row - at_);
        const uint16_t* __restrict in = src + i;
        const float* __restrict a = pa + at_;
        float* __restrict out = dst + i;
        // rounded twice, as v * s then + a (GCC contracts a plain loop, and the intrinsics, into an FMA)
        int64_t j = 0;
#ifdef __AVX512F__
        const __m512 vs = _mm512_set1_ps(sc);
        for (; j + 16 <= len; j += 16)
          _mm512_storeu_ps(out + j, scaled16(in + j, vs, a + j));
#endif
        for (int64_t k = j; k < len; ++k) out[k] = bf16_value(in[k]) * sc;
        for (; j < len; ++j) out[j] += a[j];
        i += len;
      }
    });
    return y;
  }
  std::vector<float> sv(C), bv(C, 0.0f);  // per channel
  for (int64_t c = 0; c < C; ++c) {
    sv[c] = ps[scale.numel() == 1 ? 0 : c];
    if (pb != nullptr) bv[c] = pb[bias.numel() == 1 ? 0 : c];
  }
  const float *s_c = sv.data(), *b_c = bv.data();
  if (channel.stride == 1) {
    // channels innermost: the channel scales tiled to a span of L elements (a multiple of C), so the
    // loop runs over flat spans with contiguous scales (a loop over C channels per pixel did not
    // vectorize for small C: 0.27 ms vs 0.09 ms for 2M elements at C = 16); spans stay inside one row
    const int64_t L = C * std::max<int64_t>(1, 1024 / C), spans = (per_row + L - 1) / L;
    const std::vector<float> st = tiled(sv, L), bt = tiled(bv, L);
    const float *s_t = st.data(), *b_t = bt.data();
    at::parallel_for(0, N * spans, std::max<int64_t>(1, (1 << 14) / L), [&](int64_t b, int64_t e) {
      std::vector<float> scaled(pr != nullptr ? L : 0);  // the row's scales: s_t times the row's factor
      int64_t scaled_row = -1;
      for (int64_t u = b; u < e; ++u) {
        const int64_t row = u / spans, first = row * per_row + (u % spans) * L;
        const int64_t len = std::min(L, (row + 1) * per_row - first);
        const float* __restrict sc = s_t;
        if (pr != nullptr) {
          if (row != scaled_row) {
            const float f = pr[row_scale.numel() == 1 ? 0 : row];
            for (int64_t j = 0; j < L; ++j) scaled[j] = s_t[j] * f;
            scaled_row = row;
          }
          sc = scaled.data();
        }
        const uint16_t* __restrict in = src + first;
        float* __restrict out = dst + first;
        for (int64_t j = 0; j < len; ++j) out[j] = bf16_value(in[j]) * sc[j] + b_t[j];
        if (pa != nullptr) {
          const float* __restrict a = pa + (first - row * per_row);
          for (int64_t j = 0; j < len; ++j) out[j] += a[j];
        }
      }
    });
  } else {  // contiguous: runs of `stride` elements share a channel
    const int64_t S = channel.stride;
    at::parallel_for(0, n / S, std::max<int64_t>(1, (1 << 14) / S), [&](int64_t b, int64_t e) {
      for (int64_t run = b; run < e; ++run) {
        const int64_t c = run % C;
        const float sc = pr != nullptr ? s_c[c] * pr[row_scale.numel() == 1 ? 0 : (run * S) / per_row] : s_c[c];
        const float bi = b_c[c];
        const uint16_t* __restrict in = src + run * S;
        float* __restrict out = dst + run * S;
        for (int64_t j = 0; j < S; ++j) out[j] = bf16_value(in[j]) * sc + bi;
        if (pa != nullptr) {
          const float* __restrict a = pa + (run * S) % per_row;
          for (int64_t j = 0; j < S; ++j) out[j] += a[j];
        }
      }
    });
  }
  return y;
}

// The sum over dim 0 of bfloat16 codes laid out as (rows, rest) in memory, into float32 (exact for
// integer codes while the sums stay under 2^24): the columns split across threads, rows added in order.
torch::Tensor batch_sum_bf16(const torch::Tensor& q) {
  check_dense(q, torch::kBFloat16, "batch_sum_bf16");
  TORCH_CHECK(q.dim() >= 1 && (q.dim() == 1 || q.stride(0) * q.size(0) == q.numel()),
              "batch_sum_bf16: dim 0 must be outermost in memory");
  const int64_t rows = q.size(0), rest = rows ? q.numel() / rows : 0;
  auto out = torch::zeros({rest}, q.options().dtype(torch::kFloat));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  float* dst = out.data_ptr<float>();
  // a small grain: a row of 4096 elements (ResNet's last stage, 64 x 8 x 8) would leave one thread idle
  at::parallel_for(0, rest, 1 << 8, [&](int64_t b, int64_t e) {
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t* __restrict in = src + r * rest;
      float* __restrict acc = dst;
      for (int64_t c = b; c < e; ++c) acc[c] += bf16_value(in[c]);
    }
  });
  return out;
}

torch::Tensor relu_bits_(torch::Tensor out) {
  check_dense(out, torch::kFloat, "relu_bits_");
  const int64_t n = out.numel(), bytes = (n + 7) / 8;
  auto bits = torch::empty({bytes}, out.options().dtype(torch::kByte));
  float* base = out.data_ptr<float>();
  uint8_t* packed = bits.data_ptr<uint8_t>();
  at::parallel_for(0, bytes, 1 << 12, [&](int64_t b, int64_t e) {
    float* __restrict p = base;
    uint8_t* __restrict d = packed;
    const int64_t full = std::min(e, n / 8);
    for (int64_t j = b; j < full; ++j) {
      uint8_t byte = 0;
      for (int k = 0; k < 8; ++k) {
        const float r = p[8 * j + k] < 0.0f ? 0.0f : p[8 * j + k];  // NaN and -0.0 pass, as clamp_min(0)
        p[8 * j + k] = r;
        byte |= static_cast<uint8_t>(r <= 0.0f) << k;
      }
      d[j] = byte;
    }
    for (int64_t j = std::max(b, full); j < e; ++j) {  // the last, partial byte
      uint8_t byte = 0;
      for (int64_t i = 8 * j; i < n; ++i) {
        const float r = p[i] < 0.0f ? 0.0f : p[i];
        p[i] = r;
        byte |= static_cast<uint8_t>(r <= 0.0f) << (i - 8 * j);
      }
      d[j] = byte;
    }
  });
  return bits;
}

torch::Tensor relu_grad_bits(const torch::Tensor& grad, const torch::Tensor& bits) {
  check_dense(grad, torch::kFloat, "relu_grad_bits grad");
  check_dense(bits, torch::kByte, "relu_grad_bits mask");
  const int64_t n = grad.numel(), bytes = (n + 7) / 8;
  TORCH_CHECK(bits.numel() == bytes, "relu_grad_bits: expected ", bytes, " mask bytes, got ", bits.numel());
  auto out = torch::empty_strided(grad.sizes(), grad.strides(), grad.options());
  const float* src = grad.data_ptr<float>();
  const uint8_t* packed = bits.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, bytes, 1 << 12, [&](int64_t b, int64_t e) {
    const float* __restrict g = src;
    const uint8_t* __restrict d = packed;
    float* __restrict o = dst;
    const int64_t full = std::min(e, n / 8);
    int64_t j = b;
#ifdef __AVX512F__
    for (; j + 1 < full; j += 2) {  // 16 elements: their two mask bytes pick zero or the gradient (a scalar
      // bit loop took 25x a copy)
      const __mmask16 alive = static_cast<__mmask16>(~(d[j] | (d[j + 1] << 8)));
      _mm512_storeu_ps(o + 8 * j, _mm512_maskz_loadu_ps(alive, g + 8 * j));
    }
#endif
    for (; j < full; ++j) {
      const uint8_t byte = d[j];
      for (int k = 0; k < 8; ++k) o[8 * j + k] = (byte >> k) & 1 ? 0.0f : g[8 * j + k];
    }
    for (j = std::max(b, full); j < e; ++j)
      for (int64_t i = 8 * j; i < n; ++i) o[i] = (d[j] >> (i - 8 * j)) & 1 ? 0.0f : g[i];
  });
  return out;
}

// bfloat16 codes spanning at most 256 values as bytes q - offset, and back: a convolution's input codes,
// kept for its backward in half the memory.
torch::Tensor codes_to_u8(const torch::Tensor& q, double offset) {
  check_dense(q, torch::kBFloat16, "codes_to_u8");
  auto out = torch::empty_strided(q.sizes(), q.strides(), q.options().dtype(torch::kByte));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float off = static_cast<float>(offset);
  at::parallel_for(0, q.numel(), 1 << 14, [&](int64_t b, int64_t e) { codes_to_bytes(src, dst, b, e, off); });
  return out;
}

// With batch_sum, also the codes' sum over dim 0 as batch_sum_bf16 gives it (exact: integer sums under
// 2^24), from the same pass: the columns split across threads, rows added in order.
std::vector<torch::Tensor> u8_to_codes(const torch::Tensor& u, double offset, bool batch_sum) {
  check_dense(u, torch::kByte, "u8_to_codes");
  auto out = torch::empty_strided(u.sizes(), u.strides(), u.options().dtype(torch::kBFloat16));
  const uint8_t* src = u.data_ptr<uint8_t>();
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float off = static_cast<float>(offset);
  if (!batch_sum) {
    at::parallel_for(0, u.numel(), 1 << 14, [&](int64_t b, int64_t e) {
      const uint8_t* __restrict in = src;
      uint16_t* __restrict o = dst;
      for (int64_t i = b; i < e; ++i) o[i] = bf16_top(static_cast<float>(in[i]) + off);
    });
    return {out, torch::Tensor()};
  }
  TORCH_CHECK(u.dim() >= 1 && (u.dim() == 1 || u.stride(0) * u.size(0) == u.numel()),
              "u8_to_codes: a batch sum needs dim 0 outermost in memory");
  const int64_t rows = u.size(0), rest = rows ? u.numel() / rows : 0;
  auto sum = torch::zeros({rest}, u.options().dtype(torch::kFloat));
  float* acc_all = sum.data_ptr<float>();
  constexpr int64_t R = 8;  // rows per sweep: the sums stay in a register across them
  at::parallel_for(0, rest, 1 << 8, [&](int64_t b, int64_t e) {  // as batch_sum_bf16's grain
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
      const int64_t nr = std::min(R, rows - r0);
      float* __restrict acc = acc_all;
      int64_t c = b;
#ifdef __AVX512F__
      const __m512 vo = _mm512_set1_ps(off);
      for (; c + 16 <= e; c += 16) {  // GCC's vectorization of the scalar loop ran at a third of this speed
        __m512 sum16 = _mm512_loadu_ps(acc + c);
        for (int64_t k = 0; k < nr; ++k) {  // rows in order, as the scalar loop adds them
          const int64_t at = (r0 + k) * rest + c;
          const __m512 q = _mm512_add_ps(
              _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + at)))), vo);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + at),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(q), 16)));
          sum16 = _mm512_add_ps(sum16, q);
        }
        _mm512_storeu_ps(acc + c, sum16);
      }
#endif
      for (; c < e; ++c) {
        for (int64_t k = 0; k < nr; ++k) {
          const int64_t at = (r0 + k) * rest + c;
          const float q = static_cast<float>(src[at]) + off;
          dst[at] = bf16_top(q);
          acc[c] += q;
        }
      }
    }
  });
  return {out, sum};
}

// ---- the offset corrections' window sums of a 2-D convolution (groups 1, not transposed) -----------------
// Which input index i each kernel tap k reads for some output index o: i = o * stride - pad + k * dilation,
// 0 <= o < out. taps[i] lists those k (at most one o per (i, k)).
namespace {

std::vector<std::vector<int64_t>> taps_of(int64_t in, int64_t out, int64_t K, int64_t stride, int64_t pad,
                                          int64_t dilation) {
  std::vector<std::vector<int64_t>> taps(in);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = o * stride - pad + k * dilation;
      if (i >= 0 && i < in) taps[i].push_back(k);
    }
  return taps;
}

}  // namespace

// conv^T(ones, q_w) over one sample: corr[c, h, w] = sum over output channels and the taps (kh, kw) that
// read (h, w) of q_w[o, c, kh, kw], float32 (exact: integer sums under 2^24), channels-last (1, C_in, H, W).
torch::Tensor ones_input_grad(const torch::Tensor& qw, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                              std::vector<int64_t> stride, std::vector<int64_t> pad, std::vector<int64_t> dilation) {
  TORCH_CHECK(qw.dim() == 4 && stride.size() == 2 && pad.size() == 2 && dilation.size() == 2,
              "ones_input_grad: a 2-D convolution's weight and geometry");
  TORCH_CHECK(qw.scalar_type() == torch::kBFloat16 && qw.device().is_cpu(), "ones_input_grad: bfloat16 weight codes");
  const int64_t Co = qw.size(0), C = qw.size(1), KH = qw.size(2), KW = qw.size(3);
  const int64_t s0 = qw.stride(0), s1 = qw.stride(1), s2 = qw.stride(2), s3 = qw.stride(3);
  const uint16_t* pw = reinterpret_cast<const uint16_t*>(qw.data_ptr<at::BFloat16>());  // read where it lies
  std::vector<float> S(KH * KW * C, 0.0f);  // [kh][kw][c]: summed over output channels
  for (int64_t o = 0; o < Co; ++o)
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw) {
        float* __restrict dst = S.data() + (kh * KW + kw) * C;
        const uint16_t* src = pw + o * s0 + kh * s2 + kw * s3;
        for (int64_t c = 0; c < C; ++c) dst[c] += bf16_value(src[c * s1]);
      }
  const auto th = taps_of(H, Ho, KH, stride[0], pad[0], dilation[0]);
  const auto tw = taps_of(W, Wo, KW, stride[1], pad[1], dilation[1]);
  // separably: T[kh][x][c] = sum over the kw that read column x of S[kh][kw][c], then over the kh of row h
  std::vector<float> T(KH * W * C, 0.0f);
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t x = 0; x < W; ++x) {
      float* __restrict dst = T.data() + (kh * W + x) * C;
      for (int64_t kw : tw[x]) {
        const float* __restrict src = S.data() + (kh * KW + kw) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
      }
    }
  auto out = torch::zeros({1, H, W, C}, qw.options().dtype(torch::kFloat));  // memory (h, w, c)
  float* po = out.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t kh : th[h]) {
      float* __restrict dst = po + h * W * C;
      const float* __restrict src = T.data() + kh * W * C;
      for (int64_t j = 0; j < W * C; ++j) dst[j] += src[j];
    }
  return out.permute({0, 3, 1, 2});  // (1, C, H, W), channels-last strides
}

// conv_w(ones, total) for one output channel: sums[c, kh, kw] = sum over the (h, w) that tap (kh, kw) reads
// of total[c, h, w] (the input codes' batch sum), in float64 rounded once to float32; (1, C_in, KH, KW).
torch::Tensor window_sums(const torch::Tensor& total, int64_t KH, int64_t KW, int64_t Ho, int64_t Wo,
                          std::vector<int64_t> stride, std::vector<int64_t> pad, std::vector<int64_t> dilation) {
  TORCH_CHECK(total.dim() == 4 && total.size(0) == 1 && total.scalar_type() == torch::kFloat &&
                  stride.size() == 2 && pad.size() == 2 && dilation.size() == 2,
              "window_sums: one float32 sample of a 2-D convolution's input and its geometry");
  const int64_t C = total.size(1), H = total.size(2), W = total.size(3);
  auto t = total.contiguous(at::MemoryFormat::ChannelsLast);  // memory (h, w, c); a view when it already is
  const float* pt = t.data_ptr<float>();
  const auto th = taps_of(H, Ho, KH, stride[0], pad[0], dilation[0]);
  const auto tw = taps_of(W, Wo, KW, stride[1], pad[1], dilation[1]);
  // separably: R[h][kw][c] = sum over the columns kw reads of row h, then over the rows kh reads
  std::vector<double> R(H * KW * C, 0.0), acc(KH * KW * C, 0.0);  // acc: [kh][kw][c]
  for (int64_t h = 0; h < H; ++h)
    for (int64_t x = 0; x < W; ++x) {
      const float* __restrict src = pt + (h * W + x) * C;
      for (int64_t kw : tw[x]) {
        double* __restrict dst = R.data() + (h * KW + kw) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
      }
    }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t kh : th[h]) {
      double* __restrict dst = acc.data() + kh * KW * C;
      const double* __restrict src = R.data() + h * KW * C;
      for (int64_t j = 0; j < KW * C; ++j) dst[j] += src[j];
    }
  auto out = torch::empty({1, C, KH, KW}, total.options());
  float* po = out.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < KH * KW; ++k) po[c * KH * KW + k] = static_cast<float>(acc[k * C + c]);
  return out;
}

// ---- BatchNorm over a bf16 convolution product, channels innermost (channels_last) -----------------------
// The fused conv-BN(-add)(-ReLU) op's BatchNorm straight from the convolution's bfloat16 product v, whose
// float32 output is y = s_c v + bias_c: the statistics as sums of d = v - ref_c (ref_c: one value of the
// channel, so that the variance does not come from the difference of two large sums), the output as one
// affine map per channel a_c d + b_c (+ residual) (ReLU, with its mask as bits), the backward as the two
// sums of the masked gradient g it needs (of g and of g d) and then dy = k1_c g + k2_c d + k3_c with dy's
// range. Every loop runs over the
// tensor in memory order, over spans of L elements (a multiple of C and of 16) with the per-channel
// constants and accumulators tiled to the span, so that it vectorizes for any C (a loop over C channels
// per pixel does not for small C).
namespace {

inline int64_t span_of(int64_t C) {  // a multiple of C and 16 near 1024
  const int64_t base = std::lcm<int64_t>(C, 16);
  return base * std::max<int64_t>(1, 1024 / base);
}

void check_channels_last(const torch::Tensor& x, int64_t C, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 3 && x.size(1) == C && x.stride(1) == 1 &&
                  x.is_non_overlapping_and_dense(), what, ": expected a dense channels-last CPU tensor with ", C,
              " channels");
}

// body(thread, first, len) for each span of L elements (the last one shorter), the spans split across threads.
template <typename Body>
void over_spans(int64_t n, int64_t L, Body body) {
  at::parallel_for(0, (n + L - 1) / L, 8, [&](int64_t ub, int64_t ue) {
    const int t = at::get_thread_num();
    for (int64_t u = ub; u < ue; ++u) body(t, u * L, std::min(L, n - u * L));
  });
}

// Per-thread float accumulators over a span's lanes, added into double every kFlush spans (float sums of
// at most kFlush terms per lane, then exact-enough double sums), folded per channel at the end.
constexpr int64_t kFlush = 32;

template <int K, typename Body>
std::vector<torch::Tensor> channel_sums(int64_t n, int64_t C, const torch::TensorOptions& opt, Body body) {
  const int64_t L = span_of(C), spans = (n + L - 1) / L;
  const int threads = at::get_num_threads();
  std::vector<double> total(static_cast<size_t>(threads) * K * L, 0.0);
  std::vector<char> used(threads, 0);
  at::parallel_for(0, spans, 8, [&](int64_t b, int64_t e) {
    const int t = at::get_thread_num();
    used[t] = 1;
    double* mine = total.data() + static_cast<size_t>(t) * K * L;
    std::vector<float> acc(K * L, 0.0f);
    for (int64_t u = b; u < e; ++u) {
      const int64_t first = u * L, len = std::min(L, n - first);
      body(first, len, acc.data(), L);
      if ((u - b + 1) % kFlush == 0 || u + 1 == e) {
        for (int64_t j = 0; j < K * L; ++j) mine[j] += acc[j], acc[j] = 0.0f;
      }
    }
  });
  std::vector<torch::Tensor> out;
  for (int k = 0; k < K; ++k) {
    auto s = torch::zeros({C}, opt.dtype(torch::kDouble));
    double* ps = s.data_ptr<double>();
    for (int t = 0; t < threads; ++t) {
      if (!used[t]) continue;
      const double* mine = total.data() + (static_cast<size_t>(t) * K + k) * L;
      for (int64_t j = 0, c = 0; j < L; ++j, c = c + 1 == C ? 0 : c + 1) ps[c] += mine[j];  // (no division a lane)
    }
    out.push_back(s);
  }
  return out;
}

inline uint16_t mask16(const uint8_t* bits, int64_t i) {  // the 16 mask bits of elements i..i+15 (i % 8 == 0)
  return static_cast<uint16_t>(bits[i >> 3] | (bits[(i >> 3) + 1] << 8));
}

// The gradient the BatchNorm backward reads: float32 as given (g), or the next convolution's bfloat16
// input-gradient product y with its epilogue, fl(fl(y sc) + add) with ``add`` one sample's values in memory
// order, the same for every sample: scale_bf16's arithmetic, done where the gradient is read instead of in a
// pass that writes it (fracpass.native hands the product over where the gradient has no other reader).
struct GradIn {
  const float* g = nullptr;
  const uint16_t* y = nullptr;
  float sc = 1.0f;
  const float* add = nullptr;
  int64_t per_row = 1;
  inline float at(int64_t i) const {
    if (g != nullptr) return g[i];
    float p = bf16_value(y[i]) * sc;
    asm("" : "+x"(p));  // rounded here, not contracted with the add into an FMA
    return add != nullptr ? p + add[i % per_row] : p;
  }
#ifdef __AVX512F__
  // The vector loops keep element i's index into the addend, ai, beside i: addend_at(i) once a span, then
  // next16 for each 16 elements (no division per vector).
  inline int64_t addend_at(int64_t i) const { return add != nullptr ? i % per_row : 0; }
  inline int64_t next16(int64_t ai) const { return ai + 16 == per_row ? 0 : ai + 16; }
  // elements i..i+15 (i % 16 == 0; per_row % 16 == 0 with an addend, so they lie in one sample)
  inline __m512 at16(int64_t i, int64_t ai) const {
    if (g != nullptr) return _mm512_loadu_ps(g + i);
    return scaled16(y + i, _mm512_set1_ps(sc), add != nullptr ? add + ai : nullptr);
  }
#endif
};

// The checks the backward kernels share: a float32 gradient in v's layout (or a bfloat16 product there
// with its scale and addend: GradIn) and, if given, the ReLU's mask with a bit per element; returns the
// mask's bytes, or nullptr without one.
const uint8_t* check_grad_and_mask(const torch::Tensor& grad, const torch::Tensor& bits, const torch::Tensor& v,
                                   const char* what) {
  check_channels_last(v, v.size(1), what);
  TORCH_CHECK((grad.scalar_type() == torch::kFloat || grad.scalar_type() == torch::kBFloat16) &&
                  grad.sizes() == v.sizes() && grad.strides() == v.strides(),
              what, ": the gradient must be float32 (or a bfloat16 product) in v's layout");
  if (bits.numel() == 0) return nullptr;
  const int64_t bytes = (v.numel() + 7) / 8;
  TORCH_CHECK(bits.numel() == bytes, what, ": expected ", bytes, " mask bytes");
  return bits.data_ptr<uint8_t>();
}

// The min and max of float32 values written by several threads, as torch.aminmax gives them: NaN for
// both if any value is NaN. Each thread folds its spans' lanes in with add(); tensors() folds the threads.
struct Extremes {
  std::vector<float> lo, hi;
  std::vector<char> nan;
  Extremes() : lo(at::get_num_threads(), INFINITY), hi(at::get_num_threads(), -INFINITY), nan(at::get_num_threads(), 0) {}
#ifdef __AVX512F__
  struct Lanes {  // one span's running min and max over 16 lanes, and whether a NaN passed
    __m512 mn = _mm512_set1_ps(INFINITY), mx = _mm512_set1_ps(-INFINITY);
    __mmask16 bad = 0;
    inline void see(__m512 r) {
      bad |= _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
      mn = _mm512_min_ps(mn, r);
      mx = _mm512_max_ps(mx, r);
    }
  };
  inline void add(int t, const Lanes& l) {
    lo[t] = std::min(lo[t], _mm512_reduce_min_ps(l.mn));
    hi[t] = std::max(hi[t], _mm512_reduce_max_ps(l.mx));
    nan[t] |= l.bad != 0;
  }
#endif
  inline void add(int t, float r) {
    nan[t] |= r != r;
    lo[t] = std::min(lo[t], r);
    hi[t] = std::max(hi[t], r);
  }
  std::vector<torch::Tensor> tensors(const torch::TensorOptions& opt) const {
    float mn = INFINITY, mx = -INFINITY;
    bool any_nan = false;
    for (size_t t = 0; t < lo.size(); ++t) mn = std::min(mn, lo[t]), mx = std::max(mx, hi[t]), any_nan |= nan[t];
    if (any_nan) mn = mx = NAN;
    return {torch::full({}, mn, opt.dtype(torch::kFloat)), torch::full({}, mx, opt.dtype(torch::kFloat))};
  }
};

// sum_c d and sum_c d^2, d = v - ref_c, over a channels-last bf16 tensor (double).
std::vector<torch::Tensor> bn_stats_bf16(const torch::Tensor& v, const std::vector<float>& ref) {
  const int64_t C = v.size(1), L = span_of(C);
  const auto rt = tiled(ref, L);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  return channel_sums<2>(v.numel(), C, v.options(), [&](int64_t first, int64_t len, float* acc, int64_t) {
    const uint16_t* __restrict in = src + first;
    const float* __restrict r = rt.data();
    float* __restrict s1 = acc;
    float* __restrict s2 = acc + L;
    for (int64_t j = 0; j < len; ++j) {
      const float x = bf16_value(in[j]) - r[j];
      s1[j] += x;
      s2[j] += x * x;
    }
  });
}

// out = a_c (v - ref_c) + b_c (+ residual), then ReLU in place with the mask out <= 0 as bits (relu_bits_'s),
// in v's channels-last layout; with out's min and max (the next quantizer's range, without a pass of its own).
std::vector<torch::Tensor> bn_apply_bf16(const torch::Tensor& v, const std::vector<float>& ref,
                                         const std::vector<double>& a, const std::vector<double>& b,
                                         const torch::Tensor& residual, bool relu) {
  const int64_t n = v.numel(), L = span_of(v.size(1));
  const bool has_res = residual.numel() > 0;
  if (has_res) {
    TORCH_CHECK(residual.scalar_type() == torch::kFloat && residual.strides() == v.strides() &&
                residual.sizes() == v.sizes(), "bn_forward_bf16: the residual must be float32 in v's layout");
  }
  auto out = torch::empty_strided(v.sizes(), v.strides(), v.options().dtype(torch::kFloat));
  auto bits = torch::empty({relu ? (n + 7) / 8 : 0}, v.options().dtype(torch::kByte));
  const auto at_ = tiled(a, L), bt_ = tiled(b, L), rt = tiled(ref, L);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  const float* res = has_res ? residual.data_ptr<float>() : nullptr;
  float* dst = out.data_ptr<float>();
  uint8_t* packed = relu ? bits.data_ptr<uint8_t>() : nullptr;
  Extremes range;
  over_spans(n, L, [&](int t, int64_t first, int64_t len) {
    const float* __restrict ta = at_.data();
    const float* __restrict tb = bt_.data();
    const float* __restrict tr = rt.data();
    const uint16_t* __restrict in = src + first;
    const float* __restrict r = res != nullptr ? res + first : nullptr;
    float* __restrict o = dst + first;
    uint8_t* __restrict d = relu ? packed + first / 8 : nullptr;  // first % 16 == 0
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512 zero = _mm512_setzero_ps();
    Extremes::Lanes lanes;
    for (; j + 16 <= len; j += 16) {  // 16 elements, two mask bytes (a scalar bit loop took 10x the pass)
      const __m512 vv = _mm512_sub_ps(load_bf16x16(in + j), _mm512_loadu_ps(tr + j));
      __m512 x = _mm512_fmadd_ps(vv, _mm512_loadu_ps(ta + j), _mm512_loadu_ps(tb + j));
      if (r != nullptr) x = _mm512_add_ps(x, _mm512_loadu_ps(r + j));
      if (relu) {
        x = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), zero);  // NaN, -0.0 pass
        const __mmask16 dead = _mm512_cmp_ps_mask(x, zero, _CMP_LE_OQ);
        d[j / 8] = static_cast<uint8_t>(dead);
        d[j / 8 + 1] = static_cast<uint8_t>(dead >> 8);
      }
      _mm512_storeu_ps(o + j, x);
      lanes.see(x);
    }
    range.add(t, lanes);
#endif
    for (; j < len; ++j) {
      float x = std::fma(bf16_value(in[j]) - tr[j], ta[j], tb[j]);
      if (r != nullptr) x += r[j];
      if (relu) {
        x = x < 0.0f ? 0.0f : x;  // NaN and -0.0 pass, as torch.relu_
        if (j % 8 == 0) d[j / 8] = 0;
        d[j / 8] |= static_cast<uint8_t>(x <= 0.0f) << (j % 8);
      }
      o[j] = x;
      range.add(t, x);
    }
  });
  auto extremes = range.tensors(v.options());
  return {out, bits, extremes[0], extremes[1]};
}

// sum_c g and sum_c g d (d = v - ref_c) of the gradient g masked by the ReLU's bits (m, if any), and g
// itself if asked for (else the gradient as given).
std::vector<torch::Tensor> bn_grad_sums_bf16(const torch::Tensor& grad, const GradIn& g, const uint8_t* m,
                                             const torch::Tensor& v, const std::vector<float>& ref, bool keep_masked) {
  const int64_t C = v.size(1), n = v.numel(), L = span_of(C);
  TORCH_CHECK(!keep_masked || g.g != nullptr, "bn_backward_bf16: a handed-over product cannot be kept");
  auto kept = keep_masked && m != nullptr ? torch::empty_strided(grad.sizes(), grad.strides(), grad.options())
                                          : torch::Tensor();
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  float* kp = kept.defined() ? kept.data_ptr<float>() : nullptr;
  const auto rt = tiled(ref, L);
  auto sums = channel_sums<2>(n, C, v.options(), [&](int64_t first, int64_t len, float* acc, int64_t) {
    const float* __restrict gi = g.g != nullptr ? g.g + first : nullptr;
    const uint16_t* __restrict in = src + first;
    const float* __restrict r = rt.data();
    float* __restrict s1 = acc;
    float* __restrict s2 = acc + L;
    int64_t j = 0;
    if (gi == nullptr) {  // a handed-over product: the gradient computed as it is read
#ifdef __AVX512F__
      for (int64_t ai = g.addend_at(first); j + 16 <= len; j += 16, ai = g.next16(ai)) {
        const __m512 x0 = g.at16(first + j, ai);
        const __m512 x = m != nullptr ? _mm512_maskz_mov_ps(static_cast<__mmask16>(~mask16(m, first + j)), x0) : x0;
        const __m512 vv = _mm512_sub_ps(load_bf16x16(in + j), _mm512_loadu_ps(r + j));
        _mm512_storeu_ps(s1 + j, _mm512_add_ps(_mm512_loadu_ps(s1 + j), x));
        _mm512_storeu_ps(s2 + j, _mm512_fmadd_ps(x, vv, _mm512_loadu_ps(s2 + j)));
      }
#endif
      for (; j < len; ++j) {
        const int64_t i = first + j;
        const float x = m != nullptr && ((m[i >> 3] >> (i & 7)) & 1) ? 0.0f : g.at(i);
        s1[j] += x;
        s2[j] += x * (bf16_value(in[j]) - r[j]);
      }
    } else if (m != nullptr) {
#ifdef __AVX512F__
      for (; j + 16 <= len; j += 16) {
        const __m512 x = _mm512_maskz_loadu_ps(static_cast<__mmask16>(~mask16(m, first + j)), gi + j);
        const __m512 vv = _mm512_sub_ps(load_bf16x16(in + j), _mm512_loadu_ps(r + j));
        _mm512_storeu_ps(s1 + j, _mm512_add_ps(_mm512_loadu_ps(s1 + j), x));
        _mm512_storeu_ps(s2 + j, _mm512_fmadd_ps(x, vv, _mm512_loadu_ps(s2 + j)));
        if (kp != nullptr) _mm512_storeu_ps(kp + first + j, x);
      }
#endif
      for (; j < len; ++j) {
        const int64_t i = first + j;
        const float x = (m[i >> 3] >> (i & 7)) & 1 ? 0.0f : gi[j];
        s1[j] += x;
        s2[j] += x * (bf16_value(in[j]) - r[j]);
        if (kp != nullptr) kp[i] = x;
      }
    } else {
      for (; j < len; ++j) {
        const float x = gi[j];
        s1[j] += x;
        s2[j] += x * (bf16_value(in[j]) - r[j]);
      }
    }
  });
  sums.push_back(kp != nullptr ? kept : grad);
  return sums;
}

// dy = k1_c g + k2_c (v - ref_c) + k3_c with g masked by the ReLU's bits (m, if any), in v's layout, and dy's
// min and max (NaN if dy holds one, as torch.aminmax).
std::vector<torch::Tensor> bn_grad_apply_bf16(const torch::Tensor& grad, const GradIn& g, const uint8_t* m,
                                              const torch::Tensor& v, const std::vector<float>& ref,
                                              const std::vector<double>& k1, const std::vector<double>& k2,
                                              const std::vector<double>& k3) {
  const int64_t n = v.numel(), L = span_of(v.size(1));
  auto dy = torch::empty_strided(grad.sizes(), grad.strides(), grad.options().dtype(torch::kFloat));
  const auto t1 = tiled(k1, L), t2 = tiled(k2, L), t3 = tiled(k3, L), rt = tiled(ref, L);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  float* dst = dy.data_ptr<float>();
  Extremes range;
  over_spans(n, L, [&](int t, int64_t first, int64_t len) {
    const float* __restrict a1 = t1.data();
    const float* __restrict a2 = t2.data();
    const float* __restrict a3 = t3.data();
    const float* __restrict tr = rt.data();
    const uint16_t* __restrict in = src + first;
    float* __restrict o = dst + first;
    int64_t j = 0;
#ifdef __AVX512F__
    Extremes::Lanes lanes;
    for (int64_t ai = g.addend_at(first); j + 16 <= len; j += 16, ai = g.next16(ai)) {
      const __m512 x0 = g.at16(first + j, ai);
      const __m512 x = m != nullptr ? _mm512_maskz_mov_ps(static_cast<__mmask16>(~mask16(m, first + j)), x0) : x0;
      const __m512 vv = _mm512_sub_ps(load_bf16x16(in + j), _mm512_loadu_ps(tr + j));
      const __m512 r = _mm512_add_ps(_mm512_fmadd_ps(_mm512_loadu_ps(a2 + j), vv, _mm512_loadu_ps(a3 + j)),
                                     _mm512_mul_ps(_mm512_loadu_ps(a1 + j), x));
      _mm512_storeu_ps(o + j, r);
      lanes.see(r);
    }
    range.add(t, lanes);
#endif
    for (; j < len; ++j) {
      const int64_t i = first + j;
      const float x = m != nullptr && ((m[i >> 3] >> (i & 7)) & 1) ? 0.0f : g.at(i);
      const float r = std::fma(a2[j], bf16_value(in[j]) - tr[j], a3[j]) + a1[j] * x;
      o[j] = r;
      range.add(t, r);
    }
  });
  auto extremes = range.tensors(grad.options());
  return {dy, extremes[0], extremes[1]};
}

// The per-channel parameters of the two entry points below: one value for every channel, or one per
// channel; none at all stands for ``fill``.
std::vector<double> per_channel(const torch::Tensor& t, int64_t C, double fill, const char* what) {
  std::vector<double> out(C, fill);
  if (t.numel() == 0) return out;
  TORCH_CHECK(t.numel() == 1 || t.numel() == C, what, ": expected 1 or ", C, " values, got ", t.numel());
  const int64_t step = t.numel() == 1 ? 0 : 1;
  if (t.is_contiguous() && t.scalar_type() == torch::kFloat) {  // read in place: a conversion is ~4 aten ops
    const float* p = t.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) out[c] = p[c * step];
  } else if (t.is_contiguous() && t.scalar_type() == torch::kDouble) {
    const double* p = t.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) out[c] = p[c * step];
  } else {
    auto d = t.detach().to(torch::kDouble).contiguous();
    const double* p = d.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) out[c] = p[c * step];
  }
  return out;
}

torch::Tensor as_tensor(const std::vector<double>& v, torch::ScalarType type) {
  TORCH_CHECK(type == torch::kFloat || type == torch::kDouble, "as_tensor: float32 or float64");
  auto t = torch::empty({static_cast<int64_t>(v.size())}, torch::TensorOptions().dtype(type));
  if (type == torch::kDouble) {
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
  } else {
    float* p = t.data_ptr<float>();
    for (size_t c = 0; c < v.size(); ++c) p[c] = static_cast<float>(v[c]);
  }
  return t;
}

}  // namespace

// The fused op's whole BatchNorm forward and backward around the kernels above, the per-channel
// coefficients in double (one call from Python each: the ~15 small tensor ops they took cost ~0.2 ms a
// call). scale, bias, w, b: per channel (scale may hold one value; the others none, for 1 and 0).
std::vector<torch::Tensor> bn_forward_bf16(const torch::Tensor& v, const torch::Tensor& scale, const torch::Tensor& bias,
                                           const torch::Tensor& w, const torch::Tensor& b, torch::Tensor running_mean,
                                           torch::Tensor running_var, bool training, double momentum, double eps,
                                           const torch::Tensor& residual, bool relu) {
  TORCH_CHECK(v.scalar_type() == torch::kBFloat16, "bn_forward_bf16: expected a bfloat16 product");
  const int64_t C = v.size(1), n = v.numel() / C;
  check_channels_last(v, C, "bn_forward_bf16");
  const auto s = per_channel(scale, C, 1.0, "bn_forward_bf16 scale"), shift = per_channel(bias, C, 0.0, "bias");
  const auto wd = per_channel(w, C, 1.0, "weight"), bd = per_channel(b, C, 0.0, "bias");
  // the first pixel's values (channels innermost): the reference the sums are taken from
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  std::vector<float> r(C);
  for (int64_t c = 0; c < C; ++c) r[c] = bf16_value(src[c]);
  std::vector<double> mean(C), var(C);
  if (training) {
    auto sums = bn_stats_bf16(v, r);
    const double* s1 = sums[0].data_ptr<double>();
    const double* s2 = sums[1].data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      const double m = s1[c] / n;
      var[c] = std::max(s2[c] / n - m * m, 0.0) * s[c] * s[c];
      mean[c] = s[c] * (r[c] + m) + shift[c];
    }
    if (running_mean.numel() > 0) {
      TORCH_CHECK(running_mean.scalar_type() == torch::kFloat && running_var.scalar_type() == torch::kFloat &&
                      running_mean.numel() == C && running_var.numel() == C,
                  "bn_forward_bf16: expected float32 running statistics of ", C, " values");
      float* rm = running_mean.data_ptr<float>();
      float* rv = running_var.data_ptr<float>();
      const double unbiased = static_cast<double>(n) / (n - 1);
      for (int64_t c = 0; c < C; ++c) {  // aten's update: (1 - momentum) * running + momentum * batch
        rm[c] = static_cast<float>((1.0 - momentum) * rm[c] + momentum * mean[c]);
        rv[c] = static_cast<float>((1.0 - momentum) * rv[c] + momentum * var[c] * unbiased);
      }
    }
  } else {
    mean = per_channel(running_mean, C, 0.0, "running_mean"), var = per_channel(running_var, C, 1.0, "running_var");
  }
  std::vector<double> invstd(C), a(C), c0(C);
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    a[c] = s[c] * invstd[c] * wd[c];
    c0[c] = (s[c] * r[c] + shift[c] - mean[c]) * invstd[c] * wd[c] + bd[c];
  }
  auto applied = bn_apply_bf16(v, r, a, c0, residual, relu);
  auto ref = torch::empty({C}, v.options().dtype(torch::kFloat));
  std::copy(r.begin(), r.end(), ref.data_ptr<float>());
  return {applied[0], applied[1], ref, as_tensor(mean, torch::kDouble), as_tensor(invstd, torch::kDouble), applied[2],
          applied[3]};
}

std::vector<torch::Tensor> bn_backward_bf16(const torch::Tensor& grad, const torch::Tensor& bits, const torch::Tensor& v,
                                            const torch::Tensor& ref, const torch::Tensor& scale,
                                            const torch::Tensor& bias, const torch::Tensor& w,
                                            const torch::Tensor& mean_t, const torch::Tensor& invstd_t, bool training,
                                            bool keep_grad, const torch::Tensor& grad_scale,
                                            const torch::Tensor& grad_addend) {
  const uint8_t* m = check_grad_and_mask(grad, bits, v, "bn_backward_bf16");
  const int64_t C = v.size(1), n = v.numel() / C;
  GradIn gin;
  if (grad.scalar_type() == torch::kFloat) {
    gin.g = grad.data_ptr<float>();
  } else {  // the next convolution's product: its epilogue's one scale and addend (one sample, memory order)
    TORCH_CHECK(grad_scale.scalar_type() == torch::kFloat && grad_scale.numel() == 1,
                "bn_backward_bf16: a bfloat16 product comes with its float32 scale");
    gin.y = reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>());
    gin.sc = grad_scale.item<float>();
    if (grad_addend.numel() > 0) {
      gin.per_row = v.numel() / v.size(0);
      TORCH_CHECK(grad_addend.scalar_type() == torch::kFloat && grad_addend.is_contiguous() &&
                      grad_addend.numel() == gin.per_row && gin.per_row % 16 == 0 && v.stride(0) == gin.per_row,
                  "bn_backward_bf16: the product's addend holds one sample (", gin.per_row,
                  " float32 values, a multiple of 16) in memory order");
      gin.add = grad_addend.data_ptr<float>();
    }
  }
  const auto s = per_channel(scale, C, 1.0, "bn_backward_bf16 scale"), shift = per_channel(bias, C, 0.0, "bias");
  const auto wd = per_channel(w, C, 1.0, "weight"), mean = per_channel(mean_t, C, 0.0, "mean");
  const auto invstd = per_channel(invstd_t, C, 1.0, "invstd");
  TORCH_CHECK(ref.scalar_type() == torch::kFloat && ref.is_contiguous() && ref.numel() == C,
              "bn_backward_bf16: expected ", C, " float32 reference values");
  const std::vector<float> r(ref.data_ptr<float>(), ref.data_ptr<float>() + C);
  auto sums = bn_grad_sums_bf16(grad, gin, m, v, r, keep_grad);
  const double* sum_g = sums[0].data_ptr<double>();
  const double* sum_gd = sums[1].data_ptr<double>();
  std::vector<double> k1(C), k2(C, 0.0), k3(C, 0.0), d_w(C), d_b(C);
  for (int64_t c = 0; c < C; ++c) {
    const double offset = s[c] * r[c] + shift[c] - mean[c];  // y - mean = s d + offset
    const double sum_gxh = invstd[c] * (s[c] * sum_gd[c] + offset * sum_g[c]);
    k1[c] = wd[c] * invstd[c];
    if (training) {
      k2[c] = -wd[c] * invstd[c] * invstd[c] * s[c] * sum_gxh / n;
      k3[c] = -wd[c] * invstd[c] * sum_g[c] / n - wd[c] * invstd[c] * invstd[c] * offset * sum_gxh / n;
    }
    d_w[c] = sum_gxh;
    d_b[c] = sum_g[c];
  }
  auto applied = bn_grad_apply_bf16(grad, gin, m, v, r, k1, k2, k3);
  return {applied[0], applied[1], applied[2], sums[2], as_tensor(d_w, torch::kFloat), as_tensor(d_b, torch::kFloat)};
}

// ---- the int8 forward product of a 2-D convolution (oneDNN's int8 convolution; fracpass/native.py) ------
// int8_weight_codes: bfloat16 weight codes q (C_out, C_in, ...) as int8 for the int8 convolution. Codes that
// fit int8 stay as they are. 8-bit codes span up to 256 values, [lo, lo + 255]: the few outside int8 (the
// tensor's or channel's extremes) split, where the input channels they lie on are at most max_extra once
// rounded up to 4, as q = a + r1 + r2: a = clamp(q, -128, 127) in place, r1 = clamp(q - a, -128, 127) and
// r2 = q - a - r1 (not 0 only at q = 255) on extra input channels, each a copy of the input channel it
// belongs to (``dup`` names them; append_channels makes the copies), padded with zero weights to a multiple
// of 4 channels (oneDNN's int8 convolution took 20 % longer at odd counts here). The product is then the
// exact one in int32, as for codes that fit. Else the shift: t = q - k_c per output channel, k_c = 0 where
// channel c's codes fit and min_c + 128 where they do not (shifted_product_bf16 corrects the product).
// Returns t (contiguous, q's shape with C_in + extra input channels), k (float32, C_out), whether any k_c
// is not 0, and dup (int64, the extra channels' sources).
std::vector<torch::Tensor> int8_weight_codes(const torch::Tensor& qw, int64_t max_extra) {
  TORCH_CHECK(qw.scalar_type() == torch::kBFloat16 && qw.device().is_cpu() && qw.dim() >= 2,
              "int8_weight_codes: bfloat16 weight codes (C_out, C_in, ...) on the CPU");
  const auto q = qw.contiguous();
  const int64_t Co = q.size(0), C = q.size(1), per = Co ? q.numel() / Co : 0, taps = C ? per / C : 0;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto int8_part = [](float v) { return std::min(std::max(v, -128.0f), 127.0f); };
  // the parts beyond a that each input channel's weights need: 0, 1 or 2 (3: more than a split takes),
  // per element in one loop the compiler vectorizes, then per input channel
  std::vector<uint8_t> need(per, 0);  // the most over the output channels, per (input channel, tap)
  for (int64_t o = 0; o < Co; ++o) {
    const uint16_t* __restrict in = src + o * per;
    uint8_t* __restrict most = need.data();
    for (int64_t i = 0; i < per; ++i) {
      const float v = bf16_value(in[i]);
      const uint8_t n = static_cast<uint8_t>((v > 127.0f) + (v > 254.0f) + (v > 255.0f) + (v < -128.0f) +
                                             2 * (v < -256.0f));
      most[i] = std::max(most[i], n);
    }
  }
  std::vector<int> parts(C, 0);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < taps; ++j) parts[c] = std::max<int>(parts[c], need[c * taps + j]);
  int64_t extra = 0;
  bool splits = true;
  for (int64_t c = 0; c < C; ++c) extra += parts[c], splits &= parts[c] < 3;
  extra = (extra + 3) / 4 * 4;
  auto k = torch::zeros({Co}, q.options().dtype(torch::kFloat));
  std::vector<int64_t> sizes = q.sizes().vec();
  if (extra == 0 || (splits && extra <= max_extra)) {
    std::vector<int64_t> first(C, -1), dup(extra, 0);  // an input channel's first extra channel; the sources
    int64_t slot = C;
    for (int64_t c = 0; c < C; ++c)
      if (parts[c] > 0) {
        first[c] = slot;
        for (int p = 0; p < parts[c]; ++p) dup[slot++ - C] = c;
      }
    sizes[1] = C + extra;
    auto t = torch::zeros(sizes, q.options().dtype(torch::kChar));
    int8_t* pt = t.data_ptr<int8_t>();
    for (int64_t o = 0; o < Co; ++o) {  // a = clamp(q, -128, 127) over the row (vectorized), then the parts
      const uint16_t* __restrict in = src + o * per;
      int8_t* __restrict row = pt + o * (C + extra) * taps;
      for (int64_t i = 0; i < per; ++i) row[i] = static_cast<int8_t>(static_cast<int32_t>(int8_part(bf16_value(in[i]))));
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; parts[c] > 0 && j < taps; ++j) {
          const float v = bf16_value(in[c * taps + j]), a = int8_part(v), r1 = int8_part(v - a);
          row[first[c] * taps + j] = static_cast<int8_t>(r1);
          if (parts[c] > 1) row[(first[c] + 1) * taps + j] = static_cast<int8_t>(v - a - r1);
        }
    }
    auto d = torch::empty({extra}, q.options().dtype(torch::kLong));
    std::copy(dup.begin(), dup.end(), d.data_ptr<int64_t>());
    return {t, k, torch::full({}, false, q.options().dtype(torch::kBool)), d};
  }
  auto t = torch::empty(sizes, q.options().dtype(torch::kChar));
  int8_t* pt = t.data_ptr<int8_t>();
  float* pk = k.data_ptr<float>();
  bool shifted = false;
  for (int64_t o = 0; o < Co; ++o) {
    const uint16_t* row = src + o * per;
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t j = 0; j < per; ++j) mn = std::min(mn, bf16_value(row[j])), mx = std::max(mx, bf16_value(row[j]));
    TORCH_CHECK(per == 0 || mx - mn <= 255.0f, "int8_weight_codes: output channel ", o, "'s codes span ", mx - mn + 1,
                " values (at most 256 fit a byte)");
    const float shift = (per == 0 || (mn >= -128.0f && mx <= 127.0f)) ? 0.0f : mn + 128.0f;
    pk[o] = shift;
    shifted |= shift != 0.0f;
    for (int64_t j = 0; j < per; ++j) pt[o * per + j] = static_cast<int8_t>(static_cast<int32_t>(bf16_value(row[j]) - shift));
  }
  return {t, k, torch::full({}, shifted, q.options().dtype(torch::kBool)), torch::empty({0}, q.options().dtype(torch::kLong))};
}

// append_channels: a channels-last uint8 tensor (N, C, H, W) with the channels ``dup`` names copied after
// its own (N, C + len(dup), H, W): the input of int8_weight_codes's split weights.
torch::Tensor append_channels(const torch::Tensor& u, const torch::Tensor& dup) {
  TORCH_CHECK(u.scalar_type() == torch::kByte && u.dim() == 4, "append_channels: uint8 codes (N, C, H, W)");
  const int64_t C = u.size(1), D = dup.numel();
  check_channels_last(u, C, "append_channels");
  TORCH_CHECK(dup.scalar_type() == torch::kLong && dup.dim() == 1 && dup.is_contiguous(),
              "append_channels: the channels to copy as a 1-D int64 tensor");
  const int64_t* idx = dup.data_ptr<int64_t>();
  for (int64_t j = 0; j < D; ++j)
    TORCH_CHECK(idx[j] >= 0 && idx[j] < C, "append_channels: channel ", idx[j], " of ", C);
  std::vector<int64_t> sizes = u.sizes().vec();
  sizes[1] = C + D;
  auto out = torch::empty(sizes, u.options().memory_format(torch::MemoryFormat::ChannelsLast));
  const int64_t P = C ? u.numel() / C : 0;
  const uint8_t* src = u.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, P, 4096, [&](int64_t b, int64_t e) {
    int64_t p = b;
#if defined(__AVX512BW__) && defined(__AVX512VBMI__)
    if (C + D <= 64) {  // a pixel's bytes in one vector: one masked load, one byte permutation, one masked store
      alignas(64) uint8_t order[64] = {};
      for (int64_t c = 0; c < C; ++c) order[c] = static_cast<uint8_t>(c);
      for (int64_t j = 0; j < D; ++j) order[C + j] = static_cast<uint8_t>(idx[j]);
      const __m512i perm = _mm512_load_si512(order);
      const __mmask64 in = C == 64 ? ~0ULL : (1ULL << C) - 1, all = C + D == 64 ? ~0ULL : (1ULL << (C + D)) - 1;
      for (; p < e; ++p)
        _mm512_mask_storeu_epi8(dst + p * (C + D), all,
                                _mm512_permutexvar_epi8(perm, _mm512_maskz_loadu_epi8(in, src + p * C)));
    }
#endif
    for (; p < e; ++p) {
      std::memcpy(dst + p * (C + D), src + p * C, C);
      for (int64_t j = 0; j < D; ++j) dst[p * (C + D) + C + j] = src[p * C + idx[j]];
    }
  });
  return out;
}

namespace {

inline uint16_t bf16_nearest(float f) {  // round to nearest even (f finite)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef __AVX512F__
// bf16_nearest of 16 floats, in each lane's top 16 bits (the low 16 bits are left over)
inline __m512i bf16_nearest_hi(__m512 f) {
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
}
#endif

}  // namespace

// The product of the codes when int8_weight_codes shifted some channels: v = bfloat16(y + k_c S), y the
// int8 convolution of the input codes with t (float32), S[n, oh, ow] the window sum over every input
// channel and tap of the input codes u + offset (code 0 in the padding: the real zero). One rounding to
// nearest even, from a float32 value that is exact while under 2^24, as the bf16 convolution's float32
// accumulation is: then v equals the bf16 convolution's product bit for bit. y and u channels-last. With a
// scale (and an addend, one channels-last sample), v * scale (+ addend) in float32 instead, as scale_bf16
// computes it from v: the input gradient's epilogue in the same pass.
torch::Tensor shifted_product_bf16(const torch::Tensor& y, const torch::Tensor& u, double offset, const torch::Tensor& k,
                                   int64_t KH, int64_t KW, std::vector<int64_t> stride, std::vector<int64_t> pad,
                                   std::vector<int64_t> dilation, const torch::Tensor& scale, const torch::Tensor& addend) {
  TORCH_CHECK(y.scalar_type() == torch::kFloat && y.dim() == 4 && u.scalar_type() == torch::kByte && u.dim() == 4 &&
                  stride.size() == 2 && pad.size() == 2 && dilation.size() == 2 && u.size(0) == y.size(0),
              "shifted_product_bf16: a 2-D convolution's float32 output, its uint8 input codes and its geometry");
  const int64_t N = y.size(0), Co = y.size(1), Ho = y.size(2), Wo = y.size(3);
  const int64_t C = u.size(1), H = u.size(2), W = u.size(3);
  check_channels_last(y, Co, "shifted_product_bf16 (output)");
  check_channels_last(u, C, "shifted_product_bf16 (input codes)");
  TORCH_CHECK(k.scalar_type() == torch::kFloat && k.is_contiguous() && k.numel() == Co,
              "shifted_product_bf16: one float32 shift per output channel");
  const bool epilogue = scale.numel() > 0;
  TORCH_CHECK(!epilogue || (scale.scalar_type() == torch::kFloat && scale.numel() == 1),
              "shifted_product_bf16: one float32 scale");
  TORCH_CHECK(addend.numel() == 0 || (epilogue && addend.scalar_type() == torch::kFloat && addend.dim() == 4 &&
                                      addend.size(0) == 1 && addend.size(1) == Co && addend.size(2) == Ho &&
                                      addend.size(3) == Wo && addend.stride(1) == 1 && addend.is_non_overlapping_and_dense()),
              "shifted_product_bf16: an addend is one channels-last float32 sample of the output, with a scale");
  // P: each input pixel's sum over channels of u + offset, in a zero border of the padding (code 0)
  const int64_t pt = pad[0], pl = pad[1], Hp = H + 2 * pt, Wp = W + 2 * pl;
  std::vector<float> P(N * Hp * Wp, 0.0f);
  const uint8_t* pu = u.data_ptr<uint8_t>();
  const float base = static_cast<float>(C * offset);
  at::parallel_for(0, N * H, 8, [&](int64_t b, int64_t e) {
    std::vector<int32_t> group;  // sums of 8 consecutive bytes (a row of pixels, C % 8 == 0)
    for (int64_t nh = b; nh < e; ++nh) {
      const uint8_t* row = pu + nh * W * C;
      float* dst = P.data() + ((nh / H) * Hp + nh % H + pt) * Wp + pl;
      int64_t x = 0;
#ifdef __AVX512F__
      if (C % 8 == 0) {
        const int64_t G = W * C / 8, per = C / 8;
        group.resize(G);
        int64_t g = 0;
        for (; g + 8 <= G; g += 8) {  // psadbw: 8 sums of 8 bytes from 64 bytes
          const __m512i sums = _mm512_sad_epu8(_mm512_loadu_si512(row + g * 8), _mm512_setzero_si512());
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(group.data() + g), _mm512_cvtepi64_epi32(sums));
        }
        for (; g < G; ++g) {
          int32_t t = 0;
          for (int64_t j = 0; j < 8; ++j) t += row[g * 8 + j];
          group[g] = t;
        }
        for (; x < W; ++x) {
          int32_t t = 0;
          for (int64_t j = 0; j < per; ++j) t += group[x * per + j];
          dst[x] = static_cast<float>(t) + base;
        }
      }
#endif
      for (; x < W; ++x) {
        int32_t t = 0;
        for (int64_t c = 0; c < C; ++c) t += row[x * C + c];
        dst[x] = static_cast<float>(t) + base;
      }
    }
  });
  // S: the window sums of P, separably (along columns, then rows), per sample
  const int64_t s0 = stride[0], s1 = stride[1], d0 = dilation[0], d1 = dilation[1];
  TORCH_CHECK((Ho - 1) * s0 + (KH - 1) * d0 < Hp && (Wo - 1) * s1 + (KW - 1) * d1 < Wp,
              "shifted_product_bf16: the output's size does not match the input's and the geometry");
  std::vector<float> S(N * Ho * Wo);
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<float> R(Hp * Wo);
    for (int64_t n = b; n < e; ++n) {
      const float* pn = P.data() + n * Hp * Wp;
      std::fill(R.begin(), R.end(), 0.0f);
      for (int64_t h = 0; h < Hp; ++h)
        for (int64_t kw = 0; kw < KW; ++kw) {
          const float* __restrict src = pn + h * Wp + kw * d1;
          float* __restrict dst = R.data() + h * Wo;
          for (int64_t ow = 0; ow < Wo; ++ow) dst[ow] += src[ow * s1];
        }
      float* sn = S.data() + n * Ho * Wo;
      std::fill(sn, sn + Ho * Wo, 0.0f);
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t kh = 0; kh < KH; ++kh) {
          const float* __restrict src = R.data() + (oh * s0 + kh * d0) * Wo;
          float* __restrict dst = sn + oh * Wo;
          for (int64_t ow = 0; ow < Wo; ++ow) dst[ow] += src[ow];
        }
    }
  });
  if (epilogue) {  // scale_bf16's v * s + addend (rounded twice, no FMA) on v, in the same pass
    auto o = torch::empty_strided(y.sizes(), y.strides(), y.options());
    const float* py = y.data_ptr<float>();
    const float* pk = k.data_ptr<float>();
    const float* pa = addend.numel() > 0 ? addend.data_ptr<float>() : nullptr;
    const float sc = scale.data_ptr<float>()[0];
    float* po = o.data_ptr<float>();
    const int64_t per = Ho * Wo;
    at::parallel_for(0, N * per, 1 << 8, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const float* __restrict in = py + p * Co;
        const float* __restrict add = pa != nullptr ? pa + (p % per) * Co : nullptr;
        float* __restrict out = po + p * Co;
        const float s = S[p];
        int64_t c = 0;
#ifdef __AVX512F__
        const __m512 vs = _mm512_set1_ps(s), vsc = _mm512_set1_ps(sc);
        const __m512i top = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
        for (; c + 16 <= Co; c += 16) {
          const __m512i up = bf16_nearest_hi(_mm512_fmadd_ps(_mm512_loadu_ps(pk + c), vs, _mm512_loadu_ps(in + c)));
          __m512 r = rounded(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(up, top)), vsc));
          if (add != nullptr) r = _mm512_add_ps(r, _mm512_loadu_ps(add + c));
          _mm512_storeu_ps(out + c, r);
        }
#endif
        for (; c < Co; ++c) {
          volatile float r = bf16_value(bf16_nearest(std::fma(pk[c], s, in[c]))) * sc;  // rounded before the add
          out[c] = add != nullptr ? r + add[c] : r;
        }
      }
    });
    return o;
  }
  auto v = torch::empty_strided(y.sizes(), y.strides(), y.options().dtype(torch::kBFloat16));
  const float* py = y.data_ptr<float>();
  const float* pk = k.data_ptr<float>();
  uint16_t* pv = reinterpret_cast<uint16_t*>(v.data_ptr<at::BFloat16>());
  at::parallel_for(0, N * Ho * Wo, 1 << 8, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const float* __restrict in = py + p * Co;
      uint16_t* __restrict out = pv + p * Co;
      const float s = S[p];
      int64_t c = 0;
#ifdef __AVX512F__
      const __m512 vs = _mm512_set1_ps(s);
      for (; c + 16 <= Co; c += 16) {
        const __m512i up = bf16_nearest_hi(_mm512_fmadd_ps(_mm512_loadu_ps(pk + c), vs, _mm512_loadu_ps(in + c)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(up, 16)));
      }
#endif
      for (; c < Co; ++c) out[c] = bf16_nearest(std::fma(pk[c], s, in[c]));
    }
  });
  return v;
}

// ---- dw's product of a stride-1 2-D convolution (groups 1) on AVX512-VNNI ---------------------------------
// I[co, ci, kh, kw] = sum over n, oh, ow of t[n, co, oh, ow] q_a[n, ci, oh - p_h + kh d_h, ow - p_w + kw d_w]
// with t = u_g - k_g (the gradient's bytes less its zero point) and q_a = u_a + lo (code 0 in the padding),
// exact (int32 products summed into int64), and Q[ci, kh, kw], the same windows' sums of q_a (the
// gradient offset's correction). vpdpbusd multiplies 4 unsigned bytes by 4 signed ones: the input's
// bytes, laid out [n][h'][ci][w'] with the padding filled (4 neighbouring pixels of a channel in 4
// bytes, broadcast), by the gradient's, less 128, laid out per block of 16 output channels as
// [4 pixels][16 channels][4 bytes] (one 64-byte vector a 4-pixel group); the 128 and k_g come back
// through the window sums: sum t q_a = I' + (128 - k_g) sum u_a + lo sum t, I' the VNNI sums.
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
namespace {

// 4 pixels' 16 channel bytes as [channel][pixel] bytes less 128 (int8): vpdpbusd's signed operand.
inline __m512i channels_by_pixels(__m128i p0, __m128i p1, __m128i p2, __m128i p3) {
  const __m128i a = _mm_unpacklo_epi8(p0, p1), b = _mm_unpacklo_epi8(p2, p3);  // channels 0..7
  const __m128i c = _mm_unpackhi_epi8(p0, p1), d = _mm_unpackhi_epi8(p2, p3);  // channels 8..15
  __m512i r = _mm512_castsi128_si512(_mm_unpacklo_epi16(a, b));
  r = _mm512_inserti32x4(r, _mm_unpackhi_epi16(a, b), 1);
  r = _mm512_inserti32x4(r, _mm_unpacklo_epi16(c, d), 2);
  r = _mm512_inserti32x4(r, _mm_unpackhi_epi16(c, d), 3);
  return _mm512_xor_si512(r, _mm512_set1_epi8(static_cast<char>(0x80)));
}

// r[j] (16 bytes each) -> r[c][j] = old r[j][c]: a 16x16 byte transpose in four interleaving stages.
inline void transpose_16x16_u8(__m128i* r) {
  __m128i a[16], b[16], c[16];
  for (int i = 0; i < 8; ++i) a[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]), a[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  for (int q = 0; q < 4; ++q) {  // rows 4q..4q+3: channels 0-3, 4-7, 8-11, 12-15
    b[4 * q] = _mm_unpacklo_epi16(a[4 * q], a[4 * q + 2]);
    b[4 * q + 1] = _mm_unpackhi_epi16(a[4 * q], a[4 * q + 2]);
    b[4 * q + 2] = _mm_unpacklo_epi16(a[4 * q + 1], a[4 * q + 3]);
    b[4 * q + 3] = _mm_unpackhi_epi16(a[4 * q + 1], a[4 * q + 3]);
  }
  for (int h = 0; h < 2; ++h)  // rows 8h..8h+7: channel pairs
    for (int k = 0; k < 4; ++k) {
      c[8 * h + 2 * k] = _mm_unpacklo_epi32(b[8 * h + k], b[8 * h + 4 + k]);
      c[8 * h + 2 * k + 1] = _mm_unpackhi_epi32(b[8 * h + k], b[8 * h + 4 + k]);
    }
  for (int k = 0; k < 8; ++k) r[2 * k] = _mm_unpacklo_epi64(c[k], c[8 + k]), r[2 * k + 1] = _mm_unpackhi_epi64(c[k], c[8 + k]);
}

// One task: 16 output channels (block cb) x 8 input channels (from c0) x one kernel row kh, every kw.
// DW: the dilation along the width when it is 1 (the taps' offsets then constants), 0 for any (dw).
template <int KW, int DW>
void weight_grad_task(const int8_t* gb, const uint8_t* ap, int64_t N, int64_t Ho, int64_t Wo, int64_t Hp, int64_t Wp,
                      int64_t Ci, int64_t c0, int64_t kh, int64_t dh, int64_t dw, int64_t* total /* [KW][8][16] */) {
  const int64_t gpr = Wo / 4;  // 4-pixel groups per output row
  const int64_t step = DW ? DW : dw;
  // rows per flush: each lane gains at most 4 * 255 * 128 a group, so int32 holds 16384 groups
  const int64_t rows_per_flush = std::max<int64_t>(1, 16000 / gpr), rows = N * Ho;
  alignas(64) int32_t lanes[16];
  for (int64_t r0 = 0; r0 < rows; r0 += rows_per_flush) {
    __m512i acc[KW][8];
#pragma GCC unroll 8
    for (int kw = 0; kw < KW; ++kw)
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) acc[kw][c] = _mm512_setzero_si512();
    const int8_t* gv_at = gb + r0 * gpr * 64;
    int64_t n = r0 / Ho, oh = r0 % Ho;  // then stepped, not divided, per row
    for (int64_t r = r0; r < std::min(rows, r0 + rows_per_flush); ++r) {
      const uint8_t* a = ap + ((n * Hp + oh + kh * dh) * Ci + c0) * Wp;
      const uint8_t* at[8];  // each input channel's row: its own pointer, stepped 4 bytes a group
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) at[c] = a + c * Wp;
      for (int64_t g = 0; g < gpr; ++g, gv_at += 64) {
        const __m512i gv = _mm512_loadu_si512(gv_at);
#pragma GCC unroll 8
        for (int kw = 0; kw < KW; ++kw)
#pragma GCC unroll 8
          for (int c = 0; c < 8; ++c) {
            int32_t a4;
            std::memcpy(&a4, at[c] + g * 4 + kw * step, sizeof a4);
            acc[kw][c] = _mm512_dpbusd_epi32(acc[kw][c], _mm512_set1_epi32(a4), gv);
          }
      }
      if (++oh == Ho) oh = 0, ++n;
    }
#pragma GCC unroll 8
    for (int kw = 0; kw < KW; ++kw)
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        _mm512_store_si512(lanes, acc[kw][c]);
        int64_t* dst = total + (kw * 8 + c) * 16;
        for (int l = 0; l < 16; ++l) dst[l] += lanes[l];
      }
  }
}

}  // namespace

bool vnni_weight_grad() { return true; }

std::vector<torch::Tensor> weight_grad_u8(const torch::Tensor& ug, double kg, const torch::Tensor& ua, double lo,
                                          int64_t KH, int64_t KW, std::vector<int64_t> pad,
                                          std::vector<int64_t> dilation) {
  TORCH_CHECK(ug.scalar_type() == torch::kByte && ua.scalar_type() == torch::kByte && ug.dim() == 4 && ua.dim() == 4 &&
                  pad.size() == 2 && dilation.size() == 2 && ug.size(0) == ua.size(0),
              "weight_grad_u8: a 2-D convolution's gradient and input bytes and its geometry");
  const int64_t N = ug.size(0), Co = ug.size(1), Ho = ug.size(2), Wo = ug.size(3);
  const int64_t Ci = ua.size(1), H = ua.size(2), W = ua.size(3);
  check_channels_last(ug, Co, "weight_grad_u8 (gradient bytes)");
  check_channels_last(ua, Ci, "weight_grad_u8 (input bytes)");
  const int64_t ph = pad[0], pw = pad[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(Co % 16 == 0 && Ci % 8 == 0 && Wo % 4 == 0 && KW >= 1 && KW <= 3 && KH >= 1 && Wo / 4 <= 16000,
              "weight_grad_u8: needs C_out % 16 == 0, C_in % 8 == 0, W_out % 4 == 0 and a kernel 1..3 wide");
  TORCH_CHECK(Ho == H + 2 * ph - dh * (KH - 1) && Wo == W + 2 * pw - dw * (KW - 1),
              "weight_grad_u8: the output's size is not a stride-1 convolution's of the input");
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, gpr = Wo / 4, groups = N * Ho * gpr, CB = Co / 16;
  const uint8_t* pg = ug.data_ptr<uint8_t>();
  const uint8_t* pa = ua.data_ptr<uint8_t>();
  // the gradient: [cb][group][16 channels][4 pixels] int8 (u - 128), and each channel's sum of u
  // (64-byte aligned, as torch allocates: a std::vector's 16-byte alignment splits each vector load across two lines)
  auto gb_t = torch::empty({CB * groups * 64}, ug.options().dtype(torch::kChar));
  int8_t* const gbp = gb_t.data_ptr<int8_t>();
  const int threads = at::get_num_threads();
  std::vector<int64_t> gsum(static_cast<size_t>(threads) * Co, 0);
  at::parallel_for(0, N * Ho, 4, [&](int64_t b, int64_t e) {
    int64_t* mine = gsum.data() + static_cast<size_t>(at::get_thread_num()) * Co;
    alignas(64) int32_t lanes[16];
    for (int64_t r = b; r < e; ++r) {
      const uint8_t* src = pg + r * Wo * Co;
      for (int64_t cb = 0; cb < CB; ++cb) {
        __m512i sum = _mm512_setzero_si512();  // the row's sums of 16 channels (at most 255 W_out each)
        int8_t* dst = gbp + (cb * N * Ho + r) * gpr * 64;
        for (int64_t g = 0; g < gpr; ++g) {
          __m128i p[4];
          for (int j = 0; j < 4; ++j) {
            p[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (g * 4 + j) * Co + cb * 16));
            sum = _mm512_add_epi32(sum, _mm512_cvtepu8_epi32(p[j]));
          }
          _mm512_storeu_si512(dst + g * 64, channels_by_pixels(p[0], p[1], p[2], p[3]));
        }
        _mm512_store_si512(lanes, sum);
        for (int l = 0; l < 16; ++l) mine[cb * 16 + l] += lanes[l];
      }
    }
  });
  // the input: [n][h'][ci][w'] bytes, the padding filled with -lo (code 0)
  const uint8_t fill = static_cast<uint8_t>(static_cast<int32_t>(-lo));
  std::vector<uint8_t> ap(N * Hp * Ci * Wp);
  at::parallel_for(0, N * Hp, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      uint8_t* dst = ap.data() + r * Ci * Wp;
      const int64_t h = r % Hp - ph;
      if (h < 0 || h >= H) {
        std::memset(dst, fill, Ci * Wp);
        continue;
      }
      const uint8_t* src = pa + ((r / Hp) * H + h) * W * Ci;
      for (int64_t ci = 0; ci < Ci; ++ci) {
        uint8_t* d = dst + ci * Wp;
        std::memset(d, fill, pw);
        std::memset(d + pw + W, fill, Wp - pw - W);
      }
      int64_t x = 0;
      if (Ci % 16 == 0)  // 16 (or 8) pixels x 16 channels at a time
        for (; x + 8 <= W; x += (x + 16 <= W ? 16 : 8)) {
          const int64_t px = x + 16 <= W ? 16 : 8;
          for (int64_t cb = 0; cb < Ci; cb += 16) {
            __m128i rw[16];
            for (int j = 0; j < 16; ++j)
              rw[j] = j < px ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (x + j) * Ci + cb)) : _mm_setzero_si128();
            transpose_16x16_u8(rw);
            for (int c = 0; c < 16; ++c) {
              uint8_t* d = dst + (cb + c) * Wp + pw + x;
              if (px == 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(d), rw[c]);
              else _mm_storel_epi64(reinterpret_cast<__m128i*>(d), rw[c]);
            }
          }
        }
      for (; x < W; ++x)
        for (int64_t ci = 0; ci < Ci; ++ci) dst[ci * Wp + pw + x] = src[x * Ci + ci];
    }
  });
  // the VNNI sums, one task per (16 output channels, 8 input channels, kernel row)
  std::vector<int64_t> total(CB * (Ci / 8) * KH * KW * 8 * 16, 0);
  at::parallel_for(0, CB * (Ci / 8) * KH, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t cb = task / ((Ci / 8) * KH), c8 = (task / KH) % (Ci / 8), kh = task % KH;
      int64_t* out = total.data() + task * KW * 8 * 16;
      const int8_t* g = gbp + cb * groups * 64;
      const auto task_of = [&](auto kw_tag) {
        constexpr int K = decltype(kw_tag)::value;
        if (dw == 1) weight_grad_task<K, 1>(g, ap.data(), N, Ho, Wo, Hp, Wp, Ci, c8 * 8, kh, dh, dw, out);
        else weight_grad_task<K, 0>(g, ap.data(), N, Ho, Wo, Hp, Wp, Ci, c8 * 8, kh, dh, dw, out);
      };
      if (KW == 1) task_of(std::integral_constant<int, 1>{});
      else if (KW == 2) task_of(std::integral_constant<int, 2>{});
      else task_of(std::integral_constant<int, 3>{});
    }
  });
  // Q: the windows' sums of q_a = u_a + lo, from the input bytes summed over the batch (the padding: fill)
  const int64_t hwc = H * W * Ci;
  std::vector<int32_t> bsum(hwc, 0);  // [h][w][ci], at most N * 255 each
  at::parallel_for(0, hwc, 1 << 12, [&](int64_t b, int64_t e) {
    int32_t* __restrict dst = bsum.data();
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* __restrict src = pa + n * hwc;
      for (int64_t j = b; j < e; ++j) dst[j] += src[j];
    }
  });
  auto I = torch::empty({Co, Ci, KH, KW}, ug.options().dtype(torch::kDouble));
  auto Q = torch::empty({1, Ci, KH, KW}, ug.options().dtype(torch::kDouble));
  double* pi = I.data_ptr<double>();
  double* pq = Q.data_ptr<double>();
  const double count = static_cast<double>(N * Ho * Wo);
  // sum of u_a over each window (padding: the fill), from the batch sums' 2-D prefix sums [h + 1][w + 1][ci]
  std::vector<int64_t> pre((H + 1) * (W + 1) * Ci, 0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      int64_t* __restrict o = pre.data() + ((h + 1) * (W + 1) + w + 1) * Ci;
      const int64_t* __restrict up = pre.data() + (h * (W + 1) + w + 1) * Ci;
      const int64_t* __restrict left = pre.data() + ((h + 1) * (W + 1) + w) * Ci;
      const int64_t* __restrict diag = pre.data() + (h * (W + 1) + w) * Ci;
      const int32_t* __restrict s = bsum.data() + (h * W + w) * Ci;
      for (int64_t ci = 0; ci < Ci; ++ci) o[ci] = s[ci] + up[ci] + left[ci] - diag[ci];
    }
  std::vector<double> usum(Ci * KH * KW);
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw) {  // the window's rows h0..h1 and columns w0..w1 inside the input
      const int64_t h0 = std::clamp<int64_t>(kh * dh - ph, 0, H), h1 = std::clamp<int64_t>(kh * dh - ph + Ho, h0, H);
      const int64_t w0 = std::clamp<int64_t>(kw * dw - pw, 0, W), w1 = std::clamp<int64_t>(kw * dw - pw + Wo, w0, W);
      const int64_t outside = (Ho * Wo - (h1 - h0) * (w1 - w0)) * N * static_cast<int64_t>(fill);
      for (int64_t ci = 0; ci < Ci; ++ci) {
        const auto at = [&](int64_t h, int64_t w) { return pre[(h * (W + 1) + w) * Ci + ci]; };
        const int64_t s = at(h1, w1) - at(h0, w1) - at(h1, w0) + at(h0, w0) + outside;
        usum[(ci * KH + kh) * KW + kw] = static_cast<double>(s);
        pq[(ci * KH + kh) * KW + kw] = static_cast<double>(s) + lo * count;
      }
    }
  std::vector<double> tsum(Co, 0.0);  // sum of t = u_g - k_g per output channel
  for (int t = 0; t < threads; ++t)
    for (int64_t co = 0; co < Co; ++co) tsum[co] += static_cast<double>(gsum[static_cast<size_t>(t) * Co + co]);
  for (int64_t co = 0; co < Co; ++co) tsum[co] -= kg * count;
  for (int64_t cb = 0; cb < CB; ++cb)
    for (int64_t c8 = 0; c8 < Ci / 8; ++c8)
      for (int64_t kh = 0; kh < KH; ++kh) {
        const int64_t* t = total.data() + ((cb * (Ci / 8) + c8) * KH + kh) * KW * 8 * 16;
        for (int64_t kw = 0; kw < KW; ++kw)
          for (int64_t c = 0; c < 8; ++c)
            for (int64_t l = 0; l < 16; ++l) {
              const int64_t co = cb * 16 + l, ci = c8 * 8 + c, k = (ci * KH + kh) * KW + kw;
              pi[co * Ci * KH * KW + k] = static_cast<double>(t[(kw * 8 + c) * 16 + l]) + (128.0 - kg) * usum[k] +
                                          lo * tsum[co];
            }
      }
  return {I, Q};
}
#else
bool vnni_weight_grad() { return false; }

std::vector<torch::Tensor> weight_grad_u8(const torch::Tensor&, double, const torch::Tensor&, double, int64_t, int64_t,
                                          std::vector<int64_t>, std::vector<int64_t>) {
  TORCH_CHECK(false, "weight_grad_u8: built without AVX512-VNNI");
}
#endif

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
