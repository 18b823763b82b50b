// Asynchronous global -> shared copies (sm_80+ cp.async): a kernel issues the next tile's loads,
// computes on the current one, and waits only when it needs the next. Torch-free.
//
//   cp_async_16(dst, src, valid)  16 bytes (both addresses 16-byte aligned); zeros when !valid
//   cp_async_4(dst, src, valid)   4 bytes; zeros when !valid
//   cp_async_commit()             closes the thread's current group of copies
//   cp_async_wait_all()           waits for all of the thread's copies; other threads see them
//                                 after a following __syncthreads()
//   cp_async_wait_prior<N>()      waits for all but the thread's N most recently committed groups
//                                 (double buffering: the next tile's group stays in flight)
//
// Under the CPU emulator a copy reads its source when issued and lands in shared memory at one of
// the two ends of the window the hardware allows, chosen at random per copy: at once, or only at
// the issuing thread's wait that covers its group (cp_async_wait_all, or cp_async_wait_prior<N>
// once N newer groups are committed). A kernel that reads a buffer before waiting for it (or
// before the barrier after the wait) reads stale bytes, and one that refills a buffer other
// threads still read (a missing barrier before the issue) overwrites it under them: either
// fails its test.
#pragma once

#include <cstdint>

#include "cuda_compat.cuh"

#ifdef VITFAST_CUDA_EMULATION
#include <cstring>
#include <vector>
#endif

namespace vitfast {

#ifdef VITFAST_CUDA_EMULATION

namespace emu_async {
using Pending = emu::AsyncCopy;
// each emulated CUDA thread (a fiber of cuda_emulation.h) keeps its own copies and group count
inline std::vector<Pending>& pending() { return emu::self_fiber->pending; }

// Lands (and forgets) the copies for which `done` is true, in issue order.
template <typename F>
inline void land(F&& done) {
  std::vector<Pending> rest;
  for (const auto& p : pending()) {
    if (done(p)) std::memcpy(p.dst, p.bytes, p.n);
    else rest.push_back(p);
  }
  pending().swap(rest);
}

inline void issue(void* dst, const void* src, int n, bool valid, int align) {
  if (reinterpret_cast<uintptr_t>(dst) % align != 0 || (valid && reinterpret_cast<uintptr_t>(src) % align != 0))
    emu::fail("cp.async address not aligned to the copy size");
  Pending p{dst, {}, n, -1};
  if (valid) std::memcpy(p.bytes, src, n);
  if (emu::random_u64() & 1) std::memcpy(dst, p.bytes, n);  // landed at issue
  else pending().push_back(p);
}
}  // namespace emu_async

inline void cp_async_16(void* dst, const void* src, bool valid) { emu_async::issue(dst, src, 16, valid, 16); }
inline void cp_async_4(void* dst, const void* src, bool valid) { emu_async::issue(dst, src, 4, valid, 4); }
inline void cp_async_commit() {
  for (auto& p : emu_async::pending())
    if (p.group < 0) p.group = emu::self_fiber->committed;
  ++emu::self_fiber->committed;
}
inline void cp_async_wait_all() {
  emu_async::land([](const emu_async::Pending&) { return true; });
}
template <int N>
inline void cp_async_wait_prior() {
  const long long limit = emu::self_fiber->committed - N;
  emu_async::land([limit](const emu_async::Pending& p) { return p.group >= 0 && p.group < limit; });
}

#else  // real device code

// kBytes (16 or 4) from src to dst; src-size 0 (valid false) reads nothing and fills them with
// zeros, but src must still be a valid generic address, so callers pass a base pointer then.
// 16-byte copies bypass L1 (.cg, the only kind PTX allows for 16 bytes), 4-byte ones use it (.ca).
template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
  static_assert(kBytes == 16 || kBytes == 4, "cp.async copies 16 or 4 bytes here");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (kBytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0));
#else
  (void)dst;
  (void)src;
  (void)valid;
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) { cp_async<16>(dst, src, valid); }
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) { cp_async<4>(dst, src, valid); }

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait_prior() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

#endif

}  // namespace vitfast
