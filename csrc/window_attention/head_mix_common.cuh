// Pieces shared by the head-mixing (talking-heads) attention kernels. Included by
// window_attention_cuda.cu only.
//
// Why these kernels differ from the plain ones: the softmax runs on mixed scores
// S'_g = sum_h pre[g, h] S_h, and the output on mixed probabilities P'_g = sum_h post[g, h] P_h.
// Every (row, key) entry therefore needs all heads at once (a block holds all heads of a window),
// and P' needs the *final* softmax statistics of every head before it can be formed: an online
// softmax cannot rescale a mix of heads with different running maxima. So the forward makes two
// passes over the keys (row statistics of S', then P' and P'V); the backward computes
// D_h = rowsum(P_h dP_h) in a first pass (dP_h = sum_g post[g, h] dO_g v_g^T, not dO . O) and the
// gradients in a second; dK and dV come from a key-major kernel so no block has to add into
// another block's rows.
//
// Element phases give each thread (row, key) entries of the tile, one at a time, with every
// head's value of the entry in a register array of kCap >= heads (kCap = 8, 16 or 32, a template
// parameter); see "Cross-head work" below.
#pragma once

#include <cstdlib>

#include "window_attention_device.cuh"

namespace vitfast {
namespace {

constexpr int kMixWarps = 8;
constexpr int kMixThreads = kMixWarps * 32;
constexpr size_t kMixSmemTarget = 113 * 1024;  // two blocks per SM when it fits
constexpr int kMixMaxTileElems = 1024;         // rows x keys of a backward tile (its GEMM operand buffers)
constexpr int kMixMaxFwdTileElems = 4096;      // rows x keys of a forward tile (16 entries per thread)

// The table part of the bias (the mask comes after the pre-softmax mix): a (heads, N, N) buffer
// when the glue gave one, else the index -> table gather.
template <typename Acc>
__device__ __forceinline__ Acc mix_table_bias(const WindowAttentionParams& p, int h, int i, int j) {
  if (p.table == nullptr) return Acc(0);
  if (p.bias_buffer != nullptr)
    return static_cast<const Acc*>(p.bias_buffer)[(static_cast<int64_t>(h) * p.tokens + i) * p.tokens + j];
  const int64_t e = static_cast<int64_t>(i) * p.tokens + j;
  const int64_t l = p.index_int64 ? static_cast<const int64_t*>(p.index)[e] : static_cast<const int32_t*>(p.index)[e];
  if (l < 0 || l >= p.table_len) {
    printf("vitfast.head_mix_attention: bias_index[%d, %d] = %lld outside the table's [0, %lld)\n", i, j,
           static_cast<long long>(l), static_cast<long long>(p.table_len));
    __trap();
  }
  return load_as<Acc>(p.table, p.table_dtype, h * p.table_stride_h + l * p.table_stride_l);
}

template <typename Acc>
__device__ __forceinline__ Acc mix_mask(const WindowAttentionParams& p, int64_t w, int i, int j) {
  if (p.mask == nullptr) return Acc(0);
  return load_as<Acc>(p.mask, p.mask_dtype, ((w % p.mask_windows) * p.tokens + i) * p.tokens + j);
}

// Fills the (heads, N, N) table-bias buffer.
template <typename Acc>
__global__ void head_mix_table_kernel(const WindowAttentionParams p) {
  const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens, total = nn * p.heads;
  WindowAttentionParams q = p;
  q.bias_buffer = nullptr;  // gather
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ij = e % nn;
    static_cast<Acc*>(p.bias_buffer)[e] =
        mix_table_bias<Acc>(q, static_cast<int>(e / nn), static_cast<int>(ij / p.tokens), static_cast<int>(ij % p.tokens));
  }
}

// The mixing parameters in shared memory: pre, post (H x H) and post_bias (H).
template <typename Acc>
struct MixWeights {
  Acc *pre, *post, *post_bias;
};

template <typename Acc>
__host__ __device__ MixWeights<Acc> carve_weights(SmemCarver& sc, int H) {
  MixWeights<Acc> m;
  m.pre = sc.take<Acc>(static_cast<size_t>(H) * H);
  m.post = sc.take<Acc>(static_cast<size_t>(H) * H);
  m.post_bias = sc.take<Acc>(H);
  return m;
}

template <typename Acc>
__device__ __forceinline__ void load_weights(const WindowAttentionParams& p, const MixWeights<Acc>& m) {
  const int H = p.heads;
  for (int e = threadIdx.x; e < H * H; e += blockDim.x) {
    m.pre[e] = static_cast<const Acc*>(p.pre_mix)[e];
    m.post[e] = static_cast<const Acc*>(p.post_mix)[e];
  }
  for (int e = threadIdx.x; e < H; e += blockDim.x) m.post_bias[e] = static_cast<const Acc*>(p.post_mix_bias)[e];
}

// s[h][rows][keys] = Q_h K_h^T for the block's query tiles and the staged key tile.
template <typename T, typename Acc>
__device__ __forceinline__ void mix_scores_mma(const T* q, int ldq, int q_pitch, const T* k, int ldk, int k_pitch,
                                               Acc* s, int lds, int s_pitch, int heads, int qtiles, int ktiles,
                                               int dkp) {
  const int warp = threadIdx.x >> 5;
  const int items = heads * qtiles * ktiles;
  for (int item = warp; item < items; item += kMixWarps) {
    const int h = item / (qtiles * ktiles), rem = item - h * qtiles * ktiles;
    const int qt = rem / ktiles, kt = rem - qt * ktiles;
    wa::warp_mma<true, false>(q + h * q_pitch + qt * 16 * ldq, ldq, k + h * k_pitch + kt * 16 * ldk, ldk,
                              s + h * s_pitch + qt * 16 * lds + kt * 16, lds, dkp, false);
  }
}

// Cross-head work on one (row, key) entry. A thread holds every head's value of the entry in a
// register array of kCap >= H (unrolled loops: constant indices keep it in registers) and writes
// each head's result back into the tile slot of the same entry, which only this thread touches;
// the loop over output heads stays a run-time loop, so code size grows with kCap, not kCap^2.

template <typename Acc, int kCap>
__device__ __forceinline__ void load_heads(int H, const Acc* entry, int64_t pitch, Acc (&v)[kCap]) {
#pragma unroll
  for (int h = 0; h < kCap; ++h) v[h] = h < H ? entry[h * pitch] : Acc(0);
}

// sum_h w[h * stride] v[h]: one output of a head mix (row g of pre/post: w = m + g*H, stride 1;
// column h, the transposed mix: w = m + h, stride H).
template <typename Acc, int kCap>
__device__ __forceinline__ Acc dot_heads(int H, const Acc* w, int stride, const Acc (&v)[kCap]) {
  Acc s = 0;
#pragma unroll
  for (int h = 0; h < kCap; ++h)
    if (h < H) s += w[h * stride] * v[h];
  return s;
}

// Entry (i, j) of window w, whose raw products q_h . k_h sit at entry[h * pitch]: a[h] = scale *
// raw + table bias (the scores S_h, returned), and entry[g * pitch] = sum_h pre[g, h] a[h] + mask
// (the mixed scores S'_g).
template <typename Acc, int kCap>
__device__ __forceinline__ void mix_scores(const WindowAttentionParams& p, const MixWeights<Acc>& mw, int64_t w,
                                           int i, int j, Acc* entry, int64_t pitch, Acc (&a)[kCap]) {
  const int H = p.heads;
  const Acc scale = static_cast<Acc>(p.scale);
#pragma unroll
  for (int h = 0; h < kCap; ++h) a[h] = h < H ? entry[h * pitch] * scale + mix_table_bias<Acc>(p, h, i, j) : Acc(0);
  const Acc m = mix_mask<Acc>(p, w, i, j);
  for (int g = 0; g < H; ++g) entry[g * pitch] = m + dot_heads<Acc, kCap>(H, mw.pre + g * H, 1, a);
}

// entry[g * pitch] = exp(entry[g * pitch] - lse[g * lse_pitch]): mixed scores -> probabilities P_g.
template <typename Acc>
__device__ __forceinline__ void to_probabilities(int H, Acc* entry, int64_t pitch, const Acc* lse, int lse_pitch) {
  for (int g = 0; g < H; ++g) entry[g * pitch] = wa::acc_exp(entry[g * pitch] - lse[g * lse_pitch]);
}

// out[g * out_pitch] = sum_h post[g, h] P_h + post_bias[g] (the mixed probabilities P'_g, in the
// input dtype for the tensor cores), with P_h at entry[h * pitch].
template <typename T, typename Acc, int kCap>
__device__ __forceinline__ void post_mix_to(int H, const MixWeights<Acc>& mw, const Acc* entry, int64_t pitch, T* out,
                                            int64_t out_pitch) {
  Acc pr[kCap];
  load_heads<Acc, kCap>(H, entry, pitch, pr);
  for (int g = 0; g < H; ++g) out[g * out_pitch] = wa::from_acc<T>(mw.post_bias[g] + dot_heads<Acc, kCap>(H, mw.post + g * H, 1, pr));
}

// dP'_g at dp[g * pitch] -> dP_h = sum_g post[g, h] dP'_g at dp[h * pitch]; returns dP' in dpm.
template <typename Acc, int kCap>
__device__ __forceinline__ void to_prob_grads(int H, const MixWeights<Acc>& mw, Acc* dp, int64_t pitch,
                                              Acc (&dpm)[kCap]) {
  load_heads<Acc, kCap>(H, dp, pitch, dpm);
  for (int h = 0; h < H; ++h) dp[h * pitch] = dot_heads<Acc, kCap>(H, mw.post + h, H, dpm);
}

// dP'_g at dp[g * pitch] -> dS'_h = P_h (sum_g post[g, h] dP'_g - D_h) at dp[h * pitch], with P_h
// at probs[h * pitch] and D_h at dd[h * dd_pitch]. Returns dP' in dpm.
template <typename Acc, int kCap>
__device__ __forceinline__ void to_score_grads(int H, const MixWeights<Acc>& mw, const Acc* probs, Acc* dp,
                                               int64_t pitch, const Acc* dd, int dd_pitch, Acc (&dpm)[kCap]) {
  load_heads<Acc, kCap>(H, dp, pitch, dpm);
  for (int h = 0; h < H; ++h)
    dp[h * pitch] = probs[h * pitch] * (dot_heads<Acc, kCap>(H, mw.post + h, H, dpm) - dd[h * dd_pitch]);
}

// Online softmax statistics (running max m, sum l of exp(x - m)) with empty states (m = -inf)
// contributing nothing: an all -inf row ends with l = 0, lse = -inf and NaN probabilities, as
// torch.softmax gives.
template <typename Acc>
__device__ __forceinline__ void stats_add(Acc& m, Acc& l, Acc x) {
  if (x == wa::neg_inf<Acc>()) return;
  if (x > m) {
    l = (m == wa::neg_inf<Acc>() ? Acc(0) : l * wa::acc_exp(m - x)) + Acc(1);
    m = x;
  } else {
    l += wa::acc_exp(x - m);
  }
}

template <typename Acc>
__device__ __forceinline__ void stats_merge(Acc& m, Acc& l, Acc m2, Acc l2) {
  if (m2 == wa::neg_inf<Acc>()) return;
  if (m == wa::neg_inf<Acc>()) {
    m = m2;
    l = l2;
    return;
  }
  const Acc mx = max(m, m2);
  l = l * wa::acc_exp(m - mx) + l2 * wa::acc_exp(m2 - mx);
  m = mx;
}

// Rows x keys element phases: thread -> (row, first key), keys strided by threads-per-row; the
// threads of a row are consecutive lanes (tpr <= 32), so shuffles reduce a row.
struct ElemMap {
  int tpr, row, col;
  __device__ __forceinline__ explicit ElemMap(int rows) {
    tpr = kMixThreads / rows;
    row = static_cast<int>(threadIdx.x) / tpr;
    col = static_cast<int>(threadIdx.x) % tpr;
  }
};

// Sum of v over the tpr lanes of this row, in a fixed butterfly order.
template <typename Acc>
__device__ __forceinline__ Acc row_sum(Acc v, int tpr) {
  for (int off = tpr / 2; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Where a block's accumulator lives: its shared-memory buffer, or (when shared memory is too
// small) its slice of a global scratch buffer.
template <typename Acc>
__device__ __forceinline__ Acc* accumulator(Acc* smem, Acc* scratch, int64_t per_block) {
  return smem != nullptr ? smem : scratch + static_cast<int64_t>(blockIdx.x) * per_block;
}

// Slots (windows in flight at once) for a kernel of `chunks` blocks per window: every window when
// nothing needs a per-block scratch, else enough blocks to fill the GPU twice, capped by `cap`.
inline int64_t mix_slots(int64_t windows, int chunks, bool scratch, int64_t cap) {
  if (!scratch) return std::min(windows, cap);
  const int64_t want = std::max<int64_t>(1, (2LL * device_sms() + chunks - 1) / chunks);
  return std::max<int64_t>(1, std::min({windows, want, cap}));
}

inline int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }

// VITFAST_HEAD_MIX_SCRATCH=1 puts every accumulator in global scratch even where shared memory
// would hold it: runs that path (tests, compute-sanitizer) on any shape.
inline bool force_scratch() {
  const char* v = std::getenv("VITFAST_HEAD_MIX_SCRATCH");
  return v != nullptr && v[0] == '1';
}

// Key-tile widths the element phases allow for `rows` rows (rows * keys <= kMixMaxTileElems).
inline int mix_max_keys(int rows) { return std::min(64, kMixMaxTileElems / rows); }

}  // namespace
}  // namespace vitfast
