// Fused CPU kernels for fracpass's quantizers: one pass over the tensor after torch.aminmax.
//
// Semantics are those of the torch-op fallback in fracpass/quant.py, computed in float32:
//   fake_quant:  out = clamp(nearbyint(x / s), lo, hi) * s   (round half to even, as ONNX QuantizeLinear)
//   grad_sr:     out = min(floor((g - mn) / s + u), levels) * s + mn,  u = (k + 0.5) / 2^24 from a
//                counter-based hash of (seed, element index), so results do not depend on threading.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kChunk = 1 << 20;  // dither keys restart every kChunk elements (aligned, thread-independent)

inline uint32_t mix32(uint32_t x) {  // "lowbias32" integer hash
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct Affine {
  float scale, lo, hi;
};

// Same float32 arithmetic as fracpass.quant._affine_params.
inline Affine affine(float mn, float mx, float levels) {
  mn = std::min(mn, 0.0f);
  mx = std::max(mx, 0.0f);
  float s = mx / levels - mn / levels;
  if (!(s >= FLT_MIN) && !std::isnan(s)) s = FLT_MIN;
  float zp = std::nearbyint(-mn / s);
  return {s, -zp, levels - zp};
}

void check(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
              what, ": the fused kernel takes contiguous float32 CPU tensors");
}

}  // namespace

// Per-tensor (mn, mx 0-dim) or per-channel along dim 0 (mn, mx with one value per row of x.view(C, -1)).
torch::Tensor fake_quant(const torch::Tensor& x, const torch::Tensor& mn, const torch::Tensor& mx, double levels) {
  check(x, "fake_quant");
  auto out = torch::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t channels = mn.numel();
  const int64_t n = x.numel();
  const int64_t per = channels > 0 ? n / channels : 0;
  auto mn_c = mn.contiguous(), mx_c = mx.contiguous();
  const float* pmn = mn_c.data_ptr<float>();
  const float* pmx = mx_c.data_ptr<float>();
  const float lv = static_cast<float>(levels);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t c = channels == 1 ? 0 : i / per;
      const int64_t stop = channels == 1 ? end : std::min(end, (c + 1) * per);
      const Affine a = affine(pmn[c], pmx[c], lv);
      for (int64_t j = i; j < stop; ++j) {
        float q = std::nearbyint(src[j] / a.scale);
        q = q < a.lo ? a.lo : q;
        q = q > a.hi ? a.hi : q;
        dst[j] = q * a.scale;
      }
      i = stop;
    }
  });
  return out;
}

torch::Tensor grad_sr(const torch::Tensor& g, const torch::Tensor& mn_t, const torch::Tensor& mx_t, double levels,
                      int64_t seed) {
  check(g, "grad_sr");
  auto out = torch::empty_like(g);
  const float* src = g.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float lv = static_cast<float>(levels);
  const float mn = mn_t.item<float>(), mx = mx_t.item<float>();  // CPU tensors: a memory read, no sync
  float s = mx / lv - mn / lv;
  if (!(s >= FLT_MIN) && !std::isnan(s)) s = FLT_MIN;
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const float unit = 1.0f / 16777216.0f, half = 0.5f / 16777216.0f;
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t chunk = i / kChunk;
      const int64_t stop = std::min(end, (chunk + 1) * kChunk);
      const uint32_t key = mix32(seed_lo ^ mix32(static_cast<uint32_t>(chunk) + seed_hi * 0x9E3779B9U));
      const uint32_t first = static_cast<uint32_t>(i - chunk * kChunk);
      const int32_t count = static_cast<int32_t>(stop - i);
      const float* s_src = src + i;
      float* s_dst = dst + i;
      for (int32_t j = 0; j < count; ++j) {
        const uint32_t h = mix32(key + first + static_cast<uint32_t>(j));
        const float u = static_cast<float>(h >> 8) * unit + half;
        float q = std::floor((s_src[j] - mn) / s + u);
        q = q > lv ? lv : q;
        s_dst[j] = q * s + mn;
      }
      i = stop;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fake_quant", &fake_quant, "fused fake quantization (per tensor or per dim-0 channel)");
  m.def("grad_sr", &grad_sr, "fused stochastic-rounding gradient quantization");
}
