// ReLU with its mask as bits (relu_bits_) and its backward from those bits (relu_grad_bits).
#include "native_common.h"

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
