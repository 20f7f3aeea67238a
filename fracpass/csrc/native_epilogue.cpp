// From a product back to float32: the int8 product's zero-point-corrected epilogue (epilogue), the bf16
// product's scaling (scale_bf16), and the batch sums of bf16 codes (batch_sum_bf16).
#include "native_common.h"

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
