// A CPU emulator for the subset of CUDA that vitfast's kernels use, so CI (no GPU) can run the
// kernels' own source: compile a .cu file as C++20 with -DVITFAST_CUDA_EMULATION.
//
// Faithful where bugs hide: every CUDA thread of a block is a fiber (its own stack and registers,
// switched in user space, so a barrier costs nanoseconds instead of an OS context switch); a
// seeded random scheduler picks which waiting thread runs next, so the order in which threads
// reach memory between two barriers changes from launch to launch, as on a GPU, and a run can be
// replayed (VITFAST_EMU_SEED). __syncthreads and __syncwarp are real barriers, and a barrier some
// threads never reach stops the run with a message instead of hanging; shuffles exchange through
// the warp; dynamic shared memory is a per-block buffer; WMMA fragments check the pointer
// (32-byte) and leading-dimension alignment rules and store their tile collectively (each lane
// writes its share, so reading another lane's part before __syncwarp shows up as a wrong result).
// Blocks run one after another, in a random order. Not emulated: timing, occupancy, bank
// conflicts, memory-model subtleties beyond the barriers.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#include <type_traits>
#include <vector>

#include "dtype.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))  // GNU: allowed among decl-specifiers
// Static shared memory: blocks run one at a time, so a function-local static is per block (and,
// like real shared memory, starts with whatever the previous block left).
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline unsigned emu_linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
// Resident blocks per SM: two (the emulated device has few SMs, so launches that size themselves
// by occupancy still get several blocks).
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  // a small H100: few SMs, Hopper's shared memory; compute capability 9 unless
  // VITFAST_EMU_CC_MAJOR says otherwise (to run the pre-Ampere fallbacks)
  const char* cc = std::getenv("VITFAST_EMU_CC_MAJOR");
  *v = a == cudaDevAttrMultiProcessorCount ? 4
       : a == cudaDevAttrComputeCapabilityMajor ? (cc ? std::atoi(cc) : 9)
                                                : 227 * 1024;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

[[noreturn]] inline void __trap() { std::abort(); }

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

// 16-bit float storage types with round-to-nearest-even conversions (vitfast/dtype.h).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return vitfast::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {vitfast::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return vitfast::bf16_bits_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {vitfast::float_to_bf16_bits(f)}; }
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return {b}; }

template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

namespace vitfast {
namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "vitfast CUDA emulator: %s\n", what);
  std::abort();
}

// One cp.async copy in flight (cp_async.cuh): its source is read at issue; it lands at issue or
// at the wait that covers its group (chosen at random per copy).
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
  int n;
  long long group;  // -1 until committed
};

// An emulated CUDA thread: a fiber with its own stack, run by the block's scheduler on the
// launching OS thread.
struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;  // saved stack pointer while switched out
#else
  ucontext_t ctx;
#endif
  unsigned char* stack = nullptr;
  dim3 tid;
  bool done = false;
  std::vector<AsyncCopy> pending;  // this thread's cp.async copies that have not landed
  long long committed = 0;         // cp.async groups this thread has committed
};

struct Barrier {
  unsigned expected = 0, arrived = 0;
  std::vector<Fiber*> waiting;
};

// A block's dynamic shared memory: exactly the launch's bytes, 128-byte aligned like
// __align__(128) shared memory, on the heap by itself, so that an emulator built with
// AddressSanitizer (run_cases.py, VITFAST_EMU_ASAN=1) reports any access past its end.
struct SharedBytes {
  void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t(128)); }
};

struct Block {
  std::unique_ptr<unsigned char, SharedBytes> storage;
  unsigned char* smem = nullptr;
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<uint64_t> lanes;  // shuffle exchange, one slot per thread
  std::atomic<int> vote{0};     // __syncthreads_or
  std::vector<Fiber*> runnable;
};

inline thread_local Block* current = nullptr;
inline thread_local Fiber* self_fiber = nullptr;
inline thread_local void (*kernel_body)(void*) = nullptr;  // the launch's kernel call, type-erased
inline thread_local void* kernel_args = nullptr;

inline unsigned char* dynamic_smem() { return current->smem; }

// The scheduler's random choices: xorshift64*, seeded once per process from VITFAST_EMU_SEED.
inline uint64_t random_u64() {
  static thread_local uint64_t state = [] {
    const char* s = std::getenv("VITFAST_EMU_SEED");
    const uint64_t seed = s ? std::strtoull(s, nullptr, 0) : 0x9E3779B97F4A7C15ull;
    return seed ? seed : 1ull;
  }();
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 0x2545F4914F6CDD1Dull;
}

constexpr size_t kFiberStack = size_t(8) << 20;  // like a pthread's default; pages are touched lazily

inline void fiber_main() {
  kernel_body(kernel_args);
  self_fiber->done = true;
}

#if defined(__x86_64__)
// Saves the callee-saved registers and the stack pointer of the running context into *save_sp and
// resumes the one saved at to_sp. A new fiber's stack starts with a frame that "returns" into
// vitfast_emu_fiber_start, which calls the function in r13 (fiber_entry) and never returns.
extern "C" void vitfast_emu_switch(void** save_sp, void* to_sp);
extern "C" void vitfast_emu_fiber_start();
asm(R"(
  .pushsection .text
  .weak vitfast_emu_switch
  .type vitfast_emu_switch, @function
vitfast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size vitfast_emu_switch, .-vitfast_emu_switch
  .weak vitfast_emu_fiber_start
  .type vitfast_emu_fiber_start, @function
vitfast_emu_fiber_start:
  callq *%r13
  ud2
  .size vitfast_emu_fiber_start, .-vitfast_emu_fiber_start
  .popsection
)");

inline thread_local void* scheduler_sp = nullptr;

inline void fiber_entry() {
  fiber_main();
  vitfast_emu_switch(&self_fiber->sp, scheduler_sp);  // a finished fiber is never resumed
  __builtin_trap();
}
inline void prepare(Fiber& f) {
  const uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kFiberStack) & ~uintptr_t(15);
  // popped by vitfast_emu_switch: r15, r14, r13, r12, rbx, rbp, then the return address; the
  // start routine then runs with a 16-byte aligned stack, as the ABI wants before a call
  auto* sp = reinterpret_cast<uint64_t*>(top - 72);
  const uint64_t frame[7] = {0, 0, reinterpret_cast<uint64_t>(&fiber_entry), 0, 0, 0,
                             reinterpret_cast<uint64_t>(&vitfast_emu_fiber_start)};
  std::memcpy(sp, frame, sizeof(frame));
  f.sp = sp;
}
inline void switch_in(Fiber& f) { vitfast_emu_switch(&scheduler_sp, f.sp); }
inline void switch_out() { vitfast_emu_switch(&self_fiber->sp, scheduler_sp); }
#else
// Portable fallback (slower: glibc's swapcontext makes a system call per switch).
inline thread_local ucontext_t scheduler_ctx;
inline void fiber_entry() {
  fiber_main();
  swapcontext(&self_fiber->ctx, &scheduler_ctx);
  std::abort();
}
inline void prepare(Fiber& f) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kFiberStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry, 0);
}
inline void switch_in(Fiber& f) { swapcontext(&scheduler_ctx, &f.ctx); }
inline void switch_out() { swapcontext(&self_fiber->ctx, &scheduler_ctx); }
#endif

// Fibers (and their stacks) are kept for the process's life and reused by every block.
inline Fiber* fiber(unsigned t) {
  static thread_local std::vector<std::unique_ptr<Fiber>> pool;
  while (pool.size() <= t) {
    auto f = std::make_unique<Fiber>();
    void* p = mmap(nullptr, kFiberStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a thread's stack");
    mprotect(p, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    f->stack = static_cast<unsigned char*>(p);
    pool.push_back(std::move(f));
  }
  return pool[t].get();
}

// A thread waits at a barrier; the last one to arrive makes every waiter runnable again. Each
// arrival hands control back to the scheduler, which picks the next thread at random.
inline void barrier_wait(Barrier& b) {
  Fiber* f = self_fiber;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    for (Fiber* w : b.waiting) current->runnable.push_back(w);
    b.waiting.clear();
    current->runnable.push_back(f);
  } else {
    b.waiting.push_back(f);
  }
  switch_out();
}

inline void run_block(dim3 grid3, dim3 block3, unsigned b, size_t smem) {
  const unsigned n = block3.x * block3.y * block3.z;
  Block blk;
  blk.storage.reset(static_cast<unsigned char*>(::operator new(smem, std::align_val_t(128))));
  blk.smem = blk.storage.get();
  std::memset(blk.smem, 0xA5, smem);  // garbage, like real shared memory
  blk.all.expected = n;
  blk.warps.resize(n / 32);
  for (auto& w : blk.warps) w.expected = 32;
  blk.lanes.assign(n, 0);
  for (unsigned t = 0; t < n; ++t) {
    Fiber* f = fiber(t);
    f->tid = dim3(t % block3.x, t / block3.x % block3.y, t / (block3.x * block3.y));
    f->done = false;
    f->pending.clear();
    f->committed = 0;
    prepare(*f);
    blk.runnable.push_back(f);
  }
  current = &blk;
  blockIdx = dim3(b % grid3.x, b / grid3.x % grid3.y, b / (grid3.x * grid3.y));
  blockDim = block3;
  gridDim = grid3;
  unsigned finished = 0;
  while (!blk.runnable.empty()) {
    const size_t i = random_u64() % blk.runnable.size();
    Fiber* f = blk.runnable[i];
    blk.runnable[i] = blk.runnable.back();
    blk.runnable.pop_back();
    self_fiber = f;
    threadIdx = f->tid;
    switch_in(*f);  // back here when the thread waits at a barrier, arrives last at one, or ends
    finished += f->done;
  }
  current = nullptr;
  self_fiber = nullptr;
  if (finished != n) {
    static char msg[200];
    std::snprintf(msg, sizeof msg,
                  "deadlock: %u of %u threads of block %u wait at a barrier that the others never reach "
                  "(they ended, or wait at a different one)",
                  n - finished, n, b);
    fail(msg);
  }
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid3, dim3 block3, size_t smem, Args... args) {
  const unsigned block = block3.x * block3.y * block3.z;
  if (block % 32 != 0) fail("block size must be a multiple of 32");
  auto call = [&] { kernel(args...); };
  kernel_body = [](void* c) { (*static_cast<decltype(call)*>(c))(); };
  kernel_args = &call;
  // blocks in a random order: a kernel must not depend on the order in which blocks run
  const unsigned blocks = grid3.x * grid3.y * grid3.z;
  std::vector<unsigned> order(blocks);
  for (unsigned b = 0; b < blocks; ++b) order[b] = b;
  for (unsigned b = blocks; b > 1; --b) std::swap(order[b - 1], order[random_u64() % b]);
  for (unsigned b : order) run_block(grid3, block3, b, smem);
  kernel_body = nullptr;
  kernel_args = nullptr;
}

}  // namespace emu
}  // namespace vitfast

inline void __syncthreads() { vitfast::emu::barrier_wait(vitfast::emu::current->all); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  vitfast::emu::barrier_wait(vitfast::emu::current->warps[emu_linear_tid() / 32]);
}
inline int __syncthreads_or(int predicate) {
  auto* blk = vitfast::emu::current;
  __syncthreads();
  if (predicate) blk->vote.store(1);
  __syncthreads();
  const int result = blk->vote.load();
  __syncthreads();
  if (emu_linear_tid() == 0) blk->vote.store(0);
  __syncthreads();
  return result;
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  auto* blk = vitfast::emu::current;
  const unsigned tid = emu_linear_tid(), lane = tid & 31, base = tid - lane;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  blk->lanes[tid] = bits;
  __syncwarp();
  const uint64_t other = blk->lanes[base + (lane ^ static_cast<unsigned>(lane_mask))];
  __syncwarp();
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

template <typename T>
inline T __shfl_up_sync(unsigned, T value, unsigned delta) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  auto* blk = vitfast::emu::current;
  const unsigned tid = emu_linear_tid(), lane = tid & 31;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  blk->lanes[tid] = bits;
  __syncwarp();
  const uint64_t other = lane >= delta ? blk->lanes[tid - delta] : bits;
  __syncwarp();
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

// WMMA: every lane holds the whole tile (loads are reads; mma is lane-local); stores are split
// across the lanes. Shapes m16n16k16 (fp16/bf16) and m16n16k8 (tf32).
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_a> ? M : (std::is_same_v<Use, matrix_b> ? K : M);
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[rows * cols];
};

inline void check_ptr(const void* p, unsigned ldm, unsigned elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) vitfast::emu::fail(what);
  if ((ldm * elem) % 16 != 0) vitfast::emu::fail("WMMA ldm must be a multiple of 16 bytes");
}

inline float to_f(const __half& v) { return __half2float(v); }
inline float to_f(const __nv_bfloat16& v) { return __bfloat162float(v); }
// The tensor cores read a tf32 operand's top 19 bits (inputs should come from __float_to_tf32).
inline float to_f(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xFFFFE000u;
  std::memcpy(&v, &u, 4);
  return v;
}

// float -> tf32 (10-bit mantissa), round to nearest, ties away from zero (as cvt.rna.tf32.f32)
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&v, &u, 4);
  return v;
}

template <typename Frag, typename Layout, typename E>
void load_tile(Frag& f, const E* p, unsigned ldm) {
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c) f.x[r * Frag::cols + c] = to_f(row ? p[r * ldm + c] : p[c * ldm + r]);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  check_ptr(p, ldm, sizeof(T), "WMMA operand pointer not 32-byte aligned");
  load_tile<fragment<Use, M, N, K, T, Layout>, Layout>(f, p, ldm);
}

template <typename Use, int M, int N, int K, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, precision::tf32, Layout>& f, const float* p, unsigned ldm) {
  check_ptr(p, ldm, sizeof(float), "WMMA tf32 operand pointer not 32-byte aligned");
  load_tile<fragment<Use, M, N, K, precision::tf32, Layout>, Layout>(f, p, ldm);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  check_ptr(p, ldm, sizeof(float), "WMMA accumulator pointer not 32-byte aligned");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  __syncwarp();  // a collective op: no lane runs ahead into a store that others still load
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < N; ++n) {
      float s = c.x[r * N + n];
      for (int k = 0; k < K; ++k) s += a.x[r * K + k] * b.x[k * N + n];
      out[r * N + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_ptr(p, ldm, sizeof(float), "WMMA store pointer not 32-byte aligned");
  __syncwarp();  // every lane has loaded before any lane overwrites
  const unsigned lane = emu_linear_tid() & 31;
  for (unsigned e = lane; e < M * N; e += 32) {
    const unsigned r = e / N, c = e % N;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}

}  // namespace wmma
}  // namespace nvcuda
