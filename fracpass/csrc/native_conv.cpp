// 2-D convolutions' kernels: the offset corrections' window sums (ones_input_grad, window_sums), the int8
// forward product on oneDNN's int8 convolution (int8_weight_codes, append_channels, shifted_product_bf16)
// and dw's product on AVX512-VNNI (weight_grad_u8).
#include "native_common.h"

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
