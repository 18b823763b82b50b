// Windowed attention on the CPU: one (window, head) at a time, exact softmax per query row.
// Accumulates in float (double for float64 inputs); same addressing as the CUDA kernels.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/cpu_dtype.h"
#include "../common/cpu_math.h"
#include "window_attention.h"

namespace vitfast {
namespace {

// exp(x) for x <= 0: the vectorised polynomial for float, std::exp for double.
inline float exp_np(float x) { return exp_nonpositive(x); }
inline double exp_np(double x) { return std::exp(x); }

// The table part of the bias, bias[h][i*N + j] = table[h, index[i, j]], gathered once per call
// (it does not depend on the window).
template <typename Acc>
std::vector<Acc> table_bias(const WindowAttentionParams& p) {
  const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens;
  std::vector<Acc> out;
  if (p.table == nullptr) return out;
  out.resize(static_cast<size_t>(p.heads * nn));
  for (int32_t h = 0; h < p.heads; ++h) {
    for (int64_t e = 0; e < nn; ++e) {
      const int64_t l = p.index_int64 ? static_cast<const int64_t*>(p.index)[e] : static_cast<const int32_t*>(p.index)[e];
      out[h * nn + e] = host_load<Acc>(p.table, p.table_dtype, h * p.table_stride_h + l * p.table_stride_l);
    }
  }
  return out;
}

// One head of one window as contiguous Acc arrays: rows (N x dim) or transposed (dim x N).
template <typename Acc>
struct HeadTiles {
  std::vector<Acc> q, kt, k, vt, v, o, dout, bias;

  static void gather(const WindowAttentionParams& p, const void* src, const Strides3& s, int64_t w, int32_t off,
                     int32_t dim, std::vector<Acc>& rows, std::vector<Acc>* cols) {
    const int32_t n = p.tokens;
    rows.resize(static_cast<size_t>(n) * dim);
    for (int32_t t = 0; t < n; ++t) {
      const int64_t row = token_offset(p.grid, s.img, s.y, s.x, w, t) + off;
      for (int32_t c = 0; c < dim; ++c) rows[static_cast<size_t>(t) * dim + c] = host_load<Acc>(src, p.dtype, row + c);
    }
    if (cols != nullptr) {
      cols->resize(rows.size());
      for (int32_t t = 0; t < n; ++t)
        for (int32_t c = 0; c < dim; ++c) (*cols)[static_cast<size_t>(c) * n + t] = rows[static_cast<size_t>(t) * dim + c];
    }
  }

  // bias = table part (precomputed) + mask[w % mask_windows] (0 where absent)
  void gather_bias(const WindowAttentionParams& p, const std::vector<Acc>& tbias, int64_t w, int32_t h) {
    const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens;
    if (tbias.empty()) {
      bias.assign(static_cast<size_t>(nn), Acc(0));
    } else {
      bias.assign(tbias.begin() + h * nn, tbias.begin() + (h + 1) * nn);
    }
    if (p.mask != nullptr) {
      const int64_t base = (w % p.mask_windows) * nn;
      for (int64_t e = 0; e < nn; ++e) bias[e] += host_load<Acc>(p.mask, p.mask_dtype, base + e);
    }
  }
};

template <typename Acc>
Acc dot(const Acc* a, const Acc* b, int32_t n) {
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int32_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

// out[j] = init[j] + alpha * sum_c x[c] * colsT[c*N + j], vectorised over j; returns max_j out[j].
template <typename Acc>
Acc row_times_cols(const Acc* x, const Acc* cols_t, int32_t dim, int32_t n, Acc alpha, const Acc* init, Acc* out) {
  for (int32_t j = 0; j < n; ++j) out[j] = 0;
  for (int32_t c = 0; c < dim; ++c) {
    const Acc xc = x[c];
    const Acc* col = cols_t + static_cast<size_t>(c) * n;
#pragma omp simd
    for (int32_t j = 0; j < n; ++j) out[j] += xc * col[j];
  }
  Acc mx = -std::numeric_limits<Acc>::infinity();
  for (int32_t j = 0; j < n; ++j) {
    out[j] = alpha * out[j] + (init != nullptr ? init[j] : Acc(0));
    mx = out[j] > mx ? out[j] : mx;
  }
  return mx;
}

template <typename Acc>
void forward_range(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end) {
  const int32_t n = p.tokens, dk = p.dim_k, dv = p.dim_v;
  const Acc scale = static_cast<Acc>(p.scale);
  const std::vector<Acc> tbias = table_bias<Acc>(p);
  HeadTiles<Acc> t;
  std::vector<Acc> s(n), o(dv);
  for (int64_t w = w_begin; w < w_end; ++w) {
    for (int32_t h = 0; h < p.heads; ++h) {
      t.gather(p, p.qkv, p.qkv_strides, w, p.q_off + h * p.head_stride, dk, t.q, nullptr);
      t.gather(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, dk, t.k, &t.kt);
      t.gather(p, p.qkv, p.qkv_strides, w, p.v_off + h * p.head_stride, dv, t.v, nullptr);
      t.gather_bias(p, tbias, w, h);
      for (int32_t i = 0; i < n; ++i) {
        const Acc mx = row_times_cols(&t.q[static_cast<size_t>(i) * dk], t.kt.data(), dk, n, scale,
                                      &t.bias[static_cast<size_t>(i) * n], s.data());
        Acc l = 0;
#pragma omp simd reduction(+ : l)
        for (int32_t j = 0; j < n; ++j) {
          s[j] = exp_np(s[j] - mx);  // NaN for an all -inf row, like softmax
          l += s[j];
        }
        std::fill(o.begin(), o.end(), Acc(0));
        for (int32_t j = 0; j < n; ++j) {
          const Acc e = s[j];
          const Acc* vj = &t.v[static_cast<size_t>(j) * dv];
#pragma omp simd
          for (int32_t c = 0; c < dv; ++c) o[c] += e * vj[c];
        }
        const int64_t row = token_offset(p.grid, p.out_strides.img, p.out_strides.y, p.out_strides.x, w, i) +
                            static_cast<int64_t>(h) * dv;
        for (int32_t c = 0; c < dv; ++c) host_store<Acc>(p.out, p.dtype, row + c, o[c] / l);
        static_cast<Acc*>(p.lse)[(w * p.heads + h) * n + i] = mx + std::log(l);
      }
    }
  }
}

template <typename Acc>
void backward_range(const WindowAttentionBackwardParams& b, int64_t w_begin, int64_t w_end) {
  const WindowAttentionParams& p = b.fwd;
  const int32_t n = p.tokens, dk = p.dim_k, dv = p.dim_v;
  const Acc scale = static_cast<Acc>(p.scale);
  const std::vector<Acc> tbias = table_bias<Acc>(p);
  HeadTiles<Acc> t;
  std::vector<Acc> s(n), dp(n), dq(dk), dk_acc, dv_acc;
  Acc* dbias = static_cast<Acc*>(b.dbias);
  const Strides3& gs = b.grad_qkv_strides;
  for (int64_t w = w_begin; w < w_end; ++w) {
    for (int32_t h = 0; h < p.heads; ++h) {
      t.gather(p, p.qkv, p.qkv_strides, w, p.q_off + h * p.head_stride, dk, t.q, nullptr);
      t.gather(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, dk, t.k, &t.kt);
      t.gather(p, p.qkv, p.qkv_strides, w, p.v_off + h * p.head_stride, dv, t.v, &t.vt);
      t.gather(p, p.out, p.out_strides, w, h * dv, dv, t.o, nullptr);
      t.gather(p, b.grad_out, p.out_strides, w, h * dv, dv, t.dout, nullptr);
      t.gather_bias(p, tbias, w, h);
      dk_acc.assign(static_cast<size_t>(n) * dk, Acc(0));
      dv_acc.assign(static_cast<size_t>(n) * dv, Acc(0));
      const Acc* lse = static_cast<const Acc*>(p.lse) + (w * p.heads + h) * n;
      for (int32_t i = 0; i < n; ++i) {
        const Acc* doi = &t.dout[static_cast<size_t>(i) * dv];
        const Acc* qi = &t.q[static_cast<size_t>(i) * dk];
        row_times_cols(qi, t.kt.data(), dk, n, scale, &t.bias[static_cast<size_t>(i) * n], s.data());
        row_times_cols(doi, t.vt.data(), dv, n, Acc(1), static_cast<const Acc*>(nullptr), dp.data());
        const Acc d_i = dot(doi, &t.o[static_cast<size_t>(i) * dv], dv);  // rowsum(dO * O)
        const Acc lse_i = lse[i];
#pragma omp simd
        for (int32_t j = 0; j < n; ++j) {
          s[j] = exp_np(s[j] - lse_i);   // P
          dp[j] = s[j] * (dp[j] - d_i);  // dS
        }
        std::fill(dq.begin(), dq.end(), Acc(0));
        for (int32_t j = 0; j < n; ++j) {
          const Acc ds = dp[j], pij = s[j];
          const Acc* kj = &t.k[static_cast<size_t>(j) * dk];
          Acc* dkj = &dk_acc[static_cast<size_t>(j) * dk];
          Acc* dvj = &dv_acc[static_cast<size_t>(j) * dv];
#pragma omp simd
          for (int32_t c = 0; c < dk; ++c) {
            dq[c] += ds * kj[c];
            dkj[c] += ds * qi[c];
          }
#pragma omp simd
          for (int32_t c = 0; c < dv; ++c) dvj[c] += pij * doi[c];
        }
        if (dbias != nullptr) {
          Acc* db = dbias + (static_cast<int64_t>(h) * n + i) * n;
#pragma omp simd
          for (int32_t j = 0; j < n; ++j) db[j] += dp[j];
        }
        const int64_t row = token_offset(p.grid, gs.img, gs.y, gs.x, w, i) + p.q_off + h * p.head_stride;
        for (int32_t c = 0; c < dk; ++c) host_store<Acc>(b.grad_qkv, p.dtype, row + c, scale * dq[c]);
      }
      for (int32_t j = 0; j < n; ++j) {
        const int64_t row = token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + h * p.head_stride;
        for (int32_t c = 0; c < dk; ++c)
          host_store<Acc>(b.grad_qkv, p.dtype, row + p.k_off + c, scale * dk_acc[static_cast<size_t>(j) * dk + c]);
        for (int32_t c = 0; c < dv; ++c)
          host_store<Acc>(b.grad_qkv, p.dtype, row + p.v_off + c, dv_acc[static_cast<size_t>(j) * dv + c]);
      }
    }
  }
}

template <typename Acc>
void segment_sum(const Acc* dbias, const int64_t* order, const int64_t* bounds, int64_t heads, int64_t L, int64_t nn,
                 Acc* out) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t l = 0; l < L; ++l) {
      Acc sum = 0;
      for (int64_t e = bounds[l]; e < bounds[l + 1]; ++e) sum += dbias[h * nn + order[e]];
      out[h * L + l] = sum;
    }
}

}  // namespace

void window_attention_segment_sum_cpu(const void* dbias, bool f64, const int64_t* order, const int64_t* bounds,
                                      int64_t heads, int64_t L, int64_t nn, void* out) {
  if (f64) {
    segment_sum(static_cast<const double*>(dbias), order, bounds, heads, L, nn, static_cast<double*>(out));
  } else {
    segment_sum(static_cast<const float*>(dbias), order, bounds, heads, L, nn, static_cast<float*>(out));
  }
}

void window_attention_forward_cpu(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end) {
  if (p.dtype == DType::kFloat64) {
    forward_range<double>(p, w_begin, w_end);
  } else {
    forward_range<float>(p, w_begin, w_end);
  }
}

void window_attention_backward_cpu(const WindowAttentionBackwardParams& p, int64_t w_begin, int64_t w_end) {
  if (p.fwd.dtype == DType::kFloat64) {
    backward_range<double>(p, w_begin, w_end);
  } else {
    backward_range<float>(p, w_begin, w_end);
  }
}

}  // namespace vitfast
