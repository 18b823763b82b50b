// Branch-free math for the CPU kernels' bulk loops, written so that `#pragma omp simd` loops
// vectorise (std::exp is a library call per element).
#pragma once

#include <cstdint>

// Hot CPU loops are compiled twice, for baseline x86-64 (SSE2: what the wheel must run on) and
// for x86-64-v3 (AVX2 + FMA); glibc picks the clone at load time. Elsewhere: one version.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(VITFAST_CUDA_EMULATION)
#define VF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VF_CPU_CLONES
#endif

namespace vitfast {

// exp(x) for x <= 0 (the softmax case: x - max), NaN propagated, ~2 ulp (Cephes expf polynomial).
// Below -87.3 (and -inf) it returns 0: e^x is within 2% of FLT_MIN or below there. A tiny but
// nonzero probability (a masked score, -100) made the products it enters (P V, dS = P (dP - D))
// subnormal, and x86 takes a slow path for those (Swin's shifted-window mask slowed the CPU
// window attention that way).
inline float exp_nonpositive(float x) {
  const float xc = x > -87.3f ? x : -87.3f;  // NaN -> -87.3 here; restored below
  // round to nearest with the 1.5 * 2^23 trick: plain adds vectorise on baseline x86-64 (SSE2
  // has no vector floor)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  const float out = x >= -87.3f ? p * scale : 0.0f;
  return x == x ? out : x;
}

}  // namespace vitfast
