// Stochastic rounding's dither, shared by fracpass's two CPU extensions: quant_cpu.cpp (grad_sr, grad_sr_rows:
// the simulation) and the native kernels (grad_codes, grad_codes_bf16). One definition, so that native
// execution's gradient codes stay bit for bit the simulation's for the same seed.
//
// Element i of a tensor (in memory order) gets u = (k + 0.5) / 2^24, with k the top 24 bits of
// mix32(chunk_key(seed, i / kChunk) + i % kChunk): a counter-based hash, so the noise does not depend on how
// the work is split between threads. Its level is q = min(floor((g - mn) / s + u), levels), s = grad_step.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace fracpass::dither {

constexpr int64_t kChunk = 1 << 20;  // dither keys restart every kChunk elements (aligned, thread-independent)

inline uint32_t mix32(uint32_t x) {  // "lowbias32" integer hash
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The key of the kChunk elements from chunk * kChunk on.
inline uint32_t chunk_key(int64_t seed, int64_t chunk) {
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  return mix32(lo ^ mix32(static_cast<uint32_t>(chunk) + hi * 0x9E3779B9U));
}

// The grid step of a gradient range [mn, mx] at ``lv`` levels (fracpass.quant's, in float32).
inline float grad_step(float mn, float mx, float lv) {
  float s = mx / lv - mn / lv;
  if (!(s >= FLT_MIN) && !std::isnan(s)) s = FLT_MIN;
  return s;
}

// The stochastic rounding of g: level q = min(floor((g - mn) / s + u), lv), u the dither of index ``index`` in
// the chunk keyed ``key``.
inline float sr_level(uint32_t key, uint32_t index, float g, float mn, float s, float lv) {
  const float u = static_cast<float>(mix32(key + index) >> 8) * (1.0f / 16777216.0f) + 0.5f / 16777216.0f;
  const float q = std::floor((g - mn) / s + u);
  return q > lv ? lv : q;
}

}  // namespace fracpass::dither
