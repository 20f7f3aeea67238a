// Gradient codes: grad_sr's stochastic rounding (dither.h, bit for bit the simulation's) as int8 codes
// of a 2-D gradient (grad_codes) or bfloat16 codes of a dense one (grad_codes_bf16).
#include "native_common.h"

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
