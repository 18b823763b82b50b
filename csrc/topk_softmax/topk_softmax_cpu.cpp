// CPU top-k softmax: one row at a time, with the same radix selection as the CUDA kernel
// (radix_select.h), so the CPU tests exercise the selection logic the GPU runs.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "../common/cpu_math.h"
#include "radix_select.h"
#include "topk_softmax.h"

namespace vitfast {
namespace {

size_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// Row j -> (float value, order key). Returns the key width in bits.
int load_row(const void* row, DType dt, int64_t C, std::vector<float>& x, std::vector<uint32_t>& key) {
  if (dt == DType::kFloat32) {
    const float* r = static_cast<const float*>(row);
    for (int64_t j = 0; j < C; ++j) {
      x[j] = r[j];
      key[j] = float_order_key(r[j]);
    }
    return 32;
  }
  const uint16_t* r = static_cast<const uint16_t*>(row);
  const bool half = dt == DType::kFloat16;
  for (int64_t j = 0; j < C; ++j) {
    x[j] = half ? half_bits_to_float(r[j]) : bf16_bits_to_float(r[j]);
    key[j] = half ? half_order_key(r[j]) : bf16_order_key(r[j]);
  }
  return 16;
}

void store(const TopkSoftmaxParams& p, int64_t at, float v, int64_t idx) {
  if (p.values_dtype == DType::kFloat16) {
    static_cast<uint16_t*>(p.values)[at] = float_to_half_bits(v);
  } else {
    static_cast<float*>(p.values)[at] = v;
  }
  if (p.indices_dtype == DType::kInt16) {
    static_cast<int16_t*>(p.indices)[at] = static_cast<int16_t>(idx);
  } else {
    static_cast<int32_t*>(p.indices)[at] = static_cast<int32_t>(idx);
  }
}

}  // namespace

void topk_softmax_cpu_rows(const TopkSoftmaxParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t C = p.cols;
  const int k = p.k;
  const uint32_t cmax = static_cast<uint32_t>(C - 1);
  const int idx_bits = radix::index_bits(cmax);
  std::vector<float> x(static_cast<size_t>(C));
  std::vector<uint32_t> key(static_cast<size_t>(C));
  std::vector<uint64_t> cand(static_cast<size_t>(k));
  std::vector<uint64_t> boundary;
  uint32_t hist[radix::kBins];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const void* row = static_cast<const char*>(p.logits) + r * p.row_stride * static_cast<int64_t>(elem_size(p.logits_dtype));
    const int key_bits = load_row(row, p.logits_dtype, C, x, key);
    float m = -std::numeric_limits<float>::infinity();
    bool bad = false;
    for (int64_t j = 0; j < C; ++j) {
      if (std::isnan(x[j]) || x[j] == std::numeric_limits<float>::infinity()) bad = true;
      m = std::max(m, x[j]);
    }
    if (m == -std::numeric_limits<float>::infinity()) bad = true;  // all -inf
    const int64_t out = r * k;
    if (bad) {
      for (int i = 0; i < k; ++i) store(p, out + i, std::numeric_limits<float>::quiet_NaN(), i);
      continue;
    }
    double sum = 0.0;  // double: a float sum over ~20k classes drifts visibly
    const float* xr = x.data();
    const float inv_t = p.inv_temperature;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < C; ++j) sum += exp_nonpositive((xr[j] - m) * inv_t);

    // Same decisions as the GPU (radix_select.h). After the first digit only the elements of the
    // boundary bucket can matter, so later passes run over that (small) set instead of the row.
    radix::State st;
    st.need = k;
    int shift = radix::first_shift(key_bits);
    std::fill(hist, hist + radix::kBins, 0u);
    for (int64_t j = 0; j < C; ++j) ++hist[(key[j] >> (key_bits - 8)) & 0xFF];
    while (true) {
      int bucket;
      uint32_t above;
      radix::find_bucket(hist, st.need, &bucket, &above);
      const radix::State before = st;
      radix::advance(st, shift, bucket, above, hist[bucket]);
      if (st.done) break;
      if (before.mask == 0) {  // first digit decided: gather the boundary bucket once
        boundary.clear();
        for (int64_t j = 0; j < C; ++j) {
          const uint64_t c = radix::composite(key[j], static_cast<uint32_t>(j), cmax);
          if (radix::matches(st, c)) boundary.push_back(c);
        }
      }
      shift = radix::next_shift(shift, idx_bits);
      std::fill(hist, hist + radix::kBins, 0u);
      for (const uint64_t c : boundary) {
        if (radix::matches(st, c)) ++hist[(c >> shift) & 0xFF];
      }
    }
    int n = 0;
    for (int64_t j = 0; j < C && n < k; ++j) {
      const uint64_t c = radix::composite(key[j], static_cast<uint32_t>(j), cmax);
      if (radix::selected(st, c)) cand[n++] = c;
    }
    std::sort(cand.begin(), cand.begin() + n, std::greater<uint64_t>());
    const float inv_sum = static_cast<float>(1.0 / sum);
    for (int i = 0; i < n; ++i) {
      const uint32_t j = radix::index_of(cand[i], cmax);
      store(p, out + i, std::exp((x[j] - m) * p.inv_temperature) * inv_sum, j);
    }
  }
}

}  // namespace vitfast
