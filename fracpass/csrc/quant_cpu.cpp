// Fused CPU kernels for fracpass's quantizers: one pass over the tensor after torch.aminmax.
//
// Semantics are those of the torch-op fallback in fracpass/quant.py, computed in float32:
//   fake_quant:  out = clamp(nearbyint(x / s), lo, hi) * s   (round half to even, as ONNX QuantizeLinear)
//   grad_sr:     out = min(floor((g - mn) / s + u), levels) * s + mn,  u = (k + 0.5) / 2^24 from a
//                counter-based hash of (seed, element index), so results do not depend on threading
//                (dither.h: shared with the native kernels, whose gradient codes are these levels).
// The *_rows variants take a range and a level count per row of x.view(R, -1) (per sample, for gated
// units); a row with levels <= 0 is copied unchanged. option_scores gives, per row and per option k,
// sum_j g_j * fake_quant(x_j; row range, levels_k): the straight-through gradient of a per-sample
// mixture over options, computed in one pass instead of K.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "dither.h"

namespace {

using fracpass::dither::chunk_key;
using fracpass::dither::grad_step;
using fracpass::dither::kChunk;
using fracpass::dither::sr_level;

constexpr int64_t kGrain = 1 << 15;

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

// Fake-quantize src[i, stop) into dst with one affine grid.
inline void fq_span(const float* src, float* dst, int64_t i, int64_t stop, const Affine& a) {
  for (int64_t j = i; j < stop; ++j) {
    float q = std::nearbyint(src[j] / a.scale);
    q = q < a.lo ? a.lo : q;
    q = q > a.hi ? a.hi : q;
    dst[j] = q * a.scale;
  }
}

// Dense, with dim 0 outermost in memory (contiguous, or channels_last, ...): the kernels run over memory
// order, each row of dim 0 one block, and write outputs with the input's strides (empty_like), so a
// channels_last tensor stays channels_last. The dither is keyed by the memory index.
bool rows_outer_dense(const torch::Tensor& t) {
  return t.is_non_overlapping_and_dense() &&
         (t.dim() == 0 || t.size(0) <= 1 || t.stride(0) == t.numel() / t.size(0));
}

void check(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && rows_outer_dense(t),
              what, ": the fused kernel takes dense float32 CPU tensors with dim 0 outermost in memory");
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
      fq_span(src, dst, i, stop, affine(pmn[c], pmx[c], lv));
      i = stop;
    }
  });
  return out;
}

namespace {

// Stochastic rounding of src[i, stop) with the dither of global indices i..stop (one kChunk at most).
inline void sr_span(const float* src, float* dst, int64_t i, int64_t stop, int64_t seed, float mn, float s, float lv) {
  const int64_t chunk = i / kChunk;
  const uint32_t key = chunk_key(seed, chunk);
  const uint32_t first = static_cast<uint32_t>(i - chunk * kChunk);
  const int32_t count = static_cast<int32_t>(stop - i);
  for (int32_t j = 0; j < count; ++j)
    dst[i + j] = sr_level(key, first + static_cast<uint32_t>(j), src[i + j], mn, s, lv) * s + mn;
}

void check_rows(const torch::Tensor& x, const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous() && x.dim() > 0 &&
                  t.numel() == x.size(0),
              what, ": expected one contiguous float32 value per row of x");
}

// A per-row kernel's operands, checked: x viewed as (rows, per), one range and level count per row.
struct RowOperands {
  const float *src, *mn, *mx, *lv;
  float* dst;
  int64_t n, per;
  RowOperands(const torch::Tensor& x, const torch::Tensor& mn_t, const torch::Tensor& mx_t,
              const torch::Tensor& levels, const torch::Tensor& out, const char* what) {
    check(x, what);
    check_rows(x, mn_t, what);
    check_rows(x, mx_t, what);
    check_rows(x, levels, what);
    src = x.data_ptr<float>();
    dst = out.data_ptr<float>();
    mn = mn_t.data_ptr<float>(), mx = mx_t.data_ptr<float>(), lv = levels.data_ptr<float>();
    n = x.numel();
    per = x.size(0) > 0 ? n / x.size(0) : 0;
  }
};

}  // namespace

torch::Tensor grad_sr(const torch::Tensor& g, const torch::Tensor& mn_t, const torch::Tensor& mx_t, double levels,
                      int64_t seed) {
  check(g, "grad_sr");
  auto out = torch::empty_like(g);
  const float* src = g.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float lv = static_cast<float>(levels);
  const float mn = mn_t.item<float>(), mx = mx_t.item<float>();  // CPU tensors: a memory read, no sync
  const float s = grad_step(mn, mx, lv);
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t stop = std::min(end, (i / kChunk + 1) * kChunk);
      sr_span(src, dst, i, stop, seed, mn, s, lv);
      i = stop;
    }
  });
  return out;
}

torch::Tensor fake_quant_rows(const torch::Tensor& x, const torch::Tensor& mn, const torch::Tensor& mx,
                              const torch::Tensor& levels) {
  auto out = torch::empty_like(x);
  const RowOperands o(x, mn, mx, levels, out, "fake_quant_rows");
  at::parallel_for(0, o.n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t r = i / o.per;
      const int64_t stop = std::min(end, (r + 1) * o.per);
      if (!(o.lv[r] > 0.0f)) {
        std::copy(o.src + i, o.src + stop, o.dst + i);
      } else {
        fq_span(o.src, o.dst, i, stop, affine(o.mn[r], o.mx[r], o.lv[r]));
      }
      i = stop;
    }
  });
  return out;
}

torch::Tensor grad_sr_rows(const torch::Tensor& g, const torch::Tensor& mn, const torch::Tensor& mx,
                           const torch::Tensor& levels, int64_t seed) {
  auto out = torch::empty_like(g);
  const RowOperands o(g, mn, mx, levels, out, "grad_sr_rows");
  at::parallel_for(0, o.n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t r = i / o.per;
      const int64_t stop = std::min({end, (r + 1) * o.per, (i / kChunk + 1) * kChunk});
      if (!(o.lv[r] > 0.0f)) {
        std::copy(o.src + i, o.src + stop, o.dst + i);
      } else {
        sr_span(o.src, o.dst, i, stop, seed, o.mn[r], grad_step(o.mn[r], o.mx[r], o.lv[r]), o.lv[r]);
      }
      i = stop;
    }
  });
  return out;
}

torch::Tensor option_scores(const torch::Tensor& x, const torch::Tensor& g, const torch::Tensor& mn,
                            const torch::Tensor& mx, const torch::Tensor& levels) {
  check(x, "option_scores(x)");
  check(g, "option_scores(g)");
  TORCH_CHECK(x.sizes() == g.sizes() && x.strides() == g.strides(), "option_scores: x and g differ in shape or layout");
  check_rows(x, mn, "option_scores(mn)");
  check_rows(x, mx, "option_scores(mx)");
  TORCH_CHECK(levels.device().is_cpu() && levels.scalar_type() == torch::kFloat && levels.dim() == 1 &&
                  levels.numel() <= 16,
              "option_scores: levels must be a float32 CPU vector of at most 16 options");
  const int64_t rows = x.size(0), n = x.numel(), per = rows > 0 ? n / rows : 0, k_opts = levels.numel();
  auto out = torch::zeros({rows, k_opts}, x.options());
  const float *px = x.data_ptr<float>(), *pg = g.data_ptr<float>();
  const float *pmn = mn.data_ptr<float>(), *pmx = mx.data_ptr<float>();
  auto lv_c = levels.contiguous();
  const float* plv = lv_c.data_ptr<float>();
  float* po = out.data_ptr<float>();
  // Options sharing a level count (a = 3,4,4,6,6) share one sum.
  int64_t first_of[16];
  for (int64_t k = 0; k < k_opts; ++k) {
    first_of[k] = k;
    for (int64_t j = 0; j < k; ++j)
      if (plv[j] == plv[k]) { first_of[k] = j; break; }
  }
  constexpr int64_t kBlock = 1024;  // x and g blocks stay in L1 across the options
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double total[16] = {0};
      Affine a[16];
      float inv[16];
      for (int64_t k = 0; k < k_opts; ++k) {
        if (plv[k] > 0.0f && first_of[k] == k) {
          a[k] = affine(pmn[r], pmx[r], plv[k]);
          inv[k] = 1.0f / a[k].scale;  // a gradient estimate: x * (1/s) is close enough here
        }
      }
      const float* xr = px + r * per;
      const float* gr = pg + r * per;
      for (int64_t b = 0; b < per; b += kBlock) {
        const int64_t stop = std::min(per, b + kBlock);
        for (int64_t k = 0; k < k_opts; ++k) {
          if (!(plv[k] > 0.0f) || first_of[k] != k) continue;
          const float iv = inv[k], lo = a[k].lo, hi = a[k].hi;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = b; j < stop; ++j) {
            float q = std::nearbyint(xr[j] * iv);
            q = q < lo ? lo : q;
            q = q > hi ? hi : q;
            acc += gr[j] * q;
          }
          total[k] += static_cast<double>(acc) * a[k].scale;
        }
      }
      for (int64_t k = 0; k < k_opts; ++k)
        po[r * k_opts + k] = plv[k] > 0.0f ? static_cast<float>(total[first_of[k]]) : 0.0f;
    }
  });
  return out;
}

// fracpass.quant._affine_params for one float32 range on the CPU: (scale, -zero_point, levels - zero_point)
// shaped like mn, the torch ops' arithmetic (affine) in one call instead of about ten.
std::vector<torch::Tensor> affine_params(const torch::Tensor& mn, const torch::Tensor& mx, double levels) {
  TORCH_CHECK(mn.device().is_cpu() && mx.device().is_cpu() && mn.scalar_type() == torch::kFloat &&
                  mx.scalar_type() == torch::kFloat && mn.numel() == 1 && mx.numel() == 1,
              "affine_params: one float32 CPU range");
  const Affine a = affine(*mn.data_ptr<float>(), *mx.data_ptr<float>(), static_cast<float>(levels));
  auto s = torch::empty_like(mn, torch::MemoryFormat::Contiguous), lo = torch::empty_like(s), hi = torch::empty_like(s);
  *s.data_ptr<float>() = a.scale, *lo.data_ptr<float>() = a.lo, *hi.data_ptr<float>() = a.hi;
  return {s, lo, hi};
}

// fracpass.quant.ActQuant._track for one float32 range on the CPU, in place on the quantizer's buffers: a
// finite batch moves the running range by lerp (torch's: an FMA for a weight under 0.5, which the caller
// checks against torch once) at ``momentum``, or sets it if none was tracked; a non-finite one is counted.
void track_range_(torch::Tensor rmin, torch::Tensor rmax, torch::Tensor ready, torch::Tensor nonfinite,
                  const torch::Tensor& mn, const torch::Tensor& mx, double momentum) {
  const torch::Tensor* scalars[] = {&rmin, &rmax, &mn, &mx};
  for (const torch::Tensor* t : scalars)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat && t->numel() == 1,
                "track_range_: float32 CPU scalars");
  TORCH_CHECK(ready.device().is_cpu() && ready.scalar_type() == torch::kBool && ready.numel() == 1 &&
                  nonfinite.device().is_cpu() && nonfinite.scalar_type() == torch::kLong && nonfinite.numel() == 1 &&
                  momentum < 0.5,
              "track_range_: a bool and an int64 CPU scalar, and a momentum under 0.5");
  const float lo = *mn.data_ptr<float>(), hi = *mx.data_ptr<float>();
  const bool finite = std::isfinite(lo) && std::isfinite(hi), was = *ready.data_ptr<bool>();
  const float w = finite ? (was ? static_cast<float>(momentum) : 1.0f) : 0.0f;
  const auto lerp = [w](float self, float end) {  // at::native::lerp at w in {0, momentum, 1}
    return w < 0.5f ? std::fma(w, end - self, self) : end - (end - self) * (1.0f - w);
  };
  float* pmin = rmin.data_ptr<float>();
  float* pmax = rmax.data_ptr<float>();
  *pmin = lerp(*pmin, finite ? lo : *pmin);
  *pmax = lerp(*pmax, finite ? hi : *pmax);
  *ready.data_ptr<bool>() = was || finite;
  *nonfinite.data_ptr<int64_t>() += finite ? 0 : 1;
  torch::Tensor* changed[] = {&rmin, &rmax, &ready, &nonfinite};
  for (torch::Tensor* t : changed) torch::autograd::impl::bump_version(*t);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affine_params", &affine_params, "fracpass.quant._affine_params for one float32 range");
  m.def("track_range_", &track_range_, "fracpass.quant.ActQuant._track for one float32 range, in place");
  m.def("fake_quant", &fake_quant, "fused fake quantization (per tensor or per dim-0 channel)");
  m.def("grad_sr", &grad_sr, "fused stochastic-rounding gradient quantization");
  m.def("fake_quant_rows", &fake_quant_rows, "fused fake quantization, one range and level count per row");
  m.def("grad_sr_rows", &grad_sr_rows, "fused stochastic rounding, one range and level count per row");
  m.def("option_scores", &option_scores, "per row and option: sum of g * fake_quant(x) at that option's levels");
}

// ---- the same kernels as torch ops, fracpass::<name> (torch.compile and torch.export trace through these,
// not through the pybind functions above, which stay for fracpass.quant). The schemas name what each kernel
// mutates; fracpass/kernel_ops.py registers their fake implementations (shapes and layouts, for tracing).
namespace {

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> affine_params_op(const torch::Tensor& mn, const torch::Tensor& mx,
                                                                         double levels) {
  auto p = affine_params(mn, mx, levels);
  return {p[0], p[1], p[2]};
}

// The seed as a 0-d int64 tensor drawn from torch's default generator (fracpass.quant.draw_seed): a compiled
// graph draws it in place, where an int argument would need int(tensor) on the host.
int64_t seed_of(const torch::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == torch::kInt64 && seed.device().is_cpu(), op,
              ": seed must be one int64 value on the CPU, got ", seed.scalar_type(), " of ", seed.numel(), " elements");
  return seed.item<int64_t>();
}

torch::Tensor grad_sr_op(const torch::Tensor& g, const torch::Tensor& mn, const torch::Tensor& mx, double levels,
                         const torch::Tensor& seed) {
  return grad_sr(g, mn, mx, levels, seed_of(seed, "grad_sr"));
}

torch::Tensor grad_sr_rows_op(const torch::Tensor& g, const torch::Tensor& mn, const torch::Tensor& mx,
                              const torch::Tensor& levels, const torch::Tensor& seed) {
  return grad_sr_rows(g, mn, mx, levels, seed_of(seed, "grad_sr_rows"));
}

void track_range_op(torch::Tensor& rmin, torch::Tensor& rmax, torch::Tensor& ready, torch::Tensor& nonfinite,
                    const torch::Tensor& mn, const torch::Tensor& mx, double momentum) {
  track_range_(rmin, rmax, ready, nonfinite, mn, mx, momentum);
}

}  // namespace

// A fragment: the native kernels' extension may add its own ops to the namespace.
TORCH_LIBRARY_FRAGMENT(fracpass, m) {
  m.def("fake_quant(Tensor x, Tensor mn, Tensor mx, float levels) -> Tensor");
  m.def("grad_sr(Tensor g, Tensor mn, Tensor mx, float levels, Tensor seed) -> Tensor");
  m.def("fake_quant_rows(Tensor x, Tensor mn, Tensor mx, Tensor levels) -> Tensor");
  m.def("grad_sr_rows(Tensor g, Tensor mn, Tensor mx, Tensor levels, Tensor seed) -> Tensor");
  m.def("option_scores(Tensor x, Tensor g, Tensor mn, Tensor mx, Tensor levels) -> Tensor");
  m.def("affine_params(Tensor mn, Tensor mx, float levels) -> (Tensor, Tensor, Tensor)");
  m.def("track_range_(Tensor(a!) rmin, Tensor(b!) rmax, Tensor(c!) ready, Tensor(d!) nonfinite, Tensor mn, Tensor mx, "
        "float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(fracpass, CPU, m) {
  m.impl("fake_quant", &fake_quant);
  m.impl("grad_sr", &grad_sr_op);
  m.impl("fake_quant_rows", &fake_quant_rows);
  m.impl("grad_sr_rows", &grad_sr_rows_op);
  m.impl("option_scores", &option_scores);
  m.impl("affine_params", &affine_params_op);
  m.impl("track_range_", &track_range_op);
}
