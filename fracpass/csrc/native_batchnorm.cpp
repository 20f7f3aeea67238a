// The fused conv-BN(-add)(-ReLU) op's BatchNorm on a channels-last bf16 product (bn_forward_bf16,
// bn_backward_bf16).
#include "native_common.h"

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
  // the gradient after the ReLU where it was asked for and differs from grad, else an empty tensor (the caller
  // reads grad itself: an op may not return its input)
  sums.push_back(kp != nullptr ? kept : torch::empty({0}, grad.options()));
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
