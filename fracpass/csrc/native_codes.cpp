// The codes a product takes and gives back: int8 codes of 2-D operands with their row and column sums
// (encode) and back (decode, decode_u8), bfloat16 codes of dense tensors (encode_bf16) and their bytes
// (codes_to_u8, u8_to_codes).
#include "native_common.h"

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
    return {out, torch::empty({0}, u.options().dtype(torch::kFloat))};  // no sum asked: empty (an op's output)
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
