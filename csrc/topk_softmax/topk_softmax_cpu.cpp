// CPU top-k softmax: one row at a time, the same rules as the CUDA kernel.
#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>
#include <vector>

#include "topk_softmax.h"

namespace vitfast {
namespace {

float load_logit(const void* row, DType dt, int64_t j) {
  switch (dt) {
    case DType::kFloat16:
      return half_bits_to_float(static_cast<const uint16_t*>(row)[j]);
    case DType::kBFloat16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(row)[j]);
    default:
      return static_cast<const float*>(row)[j];
  }
}

void store_value(void* out, DType dt, int64_t j, float v) {
  if (dt == DType::kFloat16) {
    static_cast<uint16_t*>(out)[j] = float_to_half_bits(v);
  } else {
    static_cast<float*>(out)[j] = v;
  }
}

void store_index(void* out, DType dt, int64_t j, int64_t idx) {
  if (dt == DType::kInt16) {
    static_cast<int16_t*>(out)[j] = static_cast<int16_t>(idx);
  } else {
    static_cast<int32_t*>(out)[j] = static_cast<int32_t>(idx);
  }
}

size_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

}  // namespace

void topk_softmax_cpu_rows(const TopkSoftmaxParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t C = p.cols;
  const int k = p.k;
  std::vector<float> x(static_cast<size_t>(C));
  std::vector<int32_t> order(static_cast<size_t>(k));
  std::vector<float> vals;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const void* row = static_cast<const char*>(p.logits) +
                      r * p.row_stride * static_cast<int64_t>(elem_size(p.logits_dtype));
    float m = -std::numeric_limits<float>::infinity();
    bool bad = false;
    for (int64_t j = 0; j < C; ++j) {
      const float v = load_logit(row, p.logits_dtype, j);
      x[j] = v;
      if (std::isnan(v) || v == std::numeric_limits<float>::infinity()) bad = true;
      m = std::max(m, v);
    }
    if (m == -std::numeric_limits<float>::infinity()) bad = true;  // all -inf
    const int64_t out = r * k;
    if (bad) {
      for (int i = 0; i < k; ++i) {
        store_value(p.values, p.values_dtype, out + i, std::numeric_limits<float>::quiet_NaN());
        store_index(p.indices, p.indices_dtype, out + i, i);
      }
      continue;
    }
    double sum = 0.0;  // double: a serial float sum over ~20k classes drifts visibly
    for (int64_t j = 0; j < C; ++j) sum += std::exp((x[j] - m) * p.inv_temperature);
    // Threshold = the k-th largest logit (nth_element on a plain copy), then every logit above it
    // plus the lowest-index ones equal to it: exactly the tie rule, in O(C).
    vals.assign(x.begin(), x.end());
    std::nth_element(vals.begin(), vals.begin() + (k - 1), vals.end(), std::greater<float>());
    const float thr = vals[k - 1];
    int64_t n_above = 0;
    for (int64_t j = 0; j < C; ++j) n_above += x[j] > thr;
    int64_t ties_left = k - n_above, n = 0;
    for (int64_t j = 0; j < C && n < k; ++j) {
      if (x[j] > thr || (x[j] == thr && ties_left-- > 0)) order[n++] = static_cast<int32_t>(j);
    }
    std::sort(order.begin(), order.begin() + k,
              [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
    const float inv_sum = static_cast<float>(1.0 / sum);
    for (int i = 0; i < k; ++i) {
      const int32_t j = order[i];
      store_value(p.values, p.values_dtype, out + i, std::exp((x[j] - m) * p.inv_temperature) * inv_sum);
      store_index(p.indices, p.indices_dtype, out + i, j);
    }
  }
}

}  // namespace vitfast
