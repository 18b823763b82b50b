// Run-time choice of the CPU instruction set for kernels whose register tiles depend on it (the
// window-attention family: a tile row is two vector registers wide, so AVX-512 doubles the columns
// of AVX2). VF_CPU_CLONES (cpu_math.h) cannot do that: every clone shares one source, so one tile
// size. Here each kernel body is a template on the tile width, instantiated inside three wrappers
// compiled for baseline x86-64, x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512), and cpu_isa()
// picks one per call. Elsewhere (other compilers, other CPUs, the CUDA emulator): the baseline.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(VITFAST_CUDA_EMULATION)
#define VF_ISA_VARIANTS 1
#define VF_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define VF_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define VF_ISA_VARIANTS 0
#define VF_TARGET_AVX2
#define VF_TARGET_AVX512
#endif

namespace vitfast {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "base";
}

// The widest instruction set this CPU (and its OS: libgcc checks the saved register state) runs.
inline CpuIsa cpu_isa_supported() {
#if VF_ISA_VARIANTS
  static const CpuIsa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return CpuIsa::kAvx512;
    if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::kAvx2;
    return CpuIsa::kBase;
  }();
  return best;
#else
  return CpuIsa::kBase;
#endif
}

// What the kernels use: the supported set, lowered by VITFAST_CPU_ISA=base|avx2|avx512 (for tests
// and comparisons; asking for more than the CPU has gives what it has). Read per call, so a test
// can switch it; an unknown value throws (the op reports it as a RuntimeError).
inline CpuIsa cpu_isa() {
  const CpuIsa best = cpu_isa_supported();
  const char* env = std::getenv("VITFAST_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  CpuIsa want;
  if (std::strcmp(env, "base") == 0) {
    want = CpuIsa::kBase;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = CpuIsa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = CpuIsa::kAvx512;
  } else {
    throw std::invalid_argument(std::string("vitfast: environment variable VITFAST_CPU_ISA must be 'base', 'avx2' "
                                            "or 'avx512', got '") + env + "'");
  }
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

// Columns of a register tile row of Acc: two vector registers (16 / 32 / 64 bytes each).
template <CpuIsa I, typename Acc>
constexpr int32_t tile_cols() {
  return static_cast<int32_t>(2 * (I == CpuIsa::kAvx512 ? 64 : I == CpuIsa::kAvx2 ? 32 : 16) / sizeof(Acc));
}

// Rows of the tallest register tile: 8 rows x 2 vectors = 16 accumulators fit AVX-512's 32
// registers; AVX2 and SSE have 16, so they keep 4 rows.
template <CpuIsa I>
constexpr int32_t tile_rows_max() {
  return I == CpuIsa::kAvx512 ? 8 : 4;
}

}  // namespace vitfast
