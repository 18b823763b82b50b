// Self-test of the CUDA emulator (csrc/common/cuda_emulation.h): a correct kernel must pass, and
// each classic synchronisation bug must be caught, not hidden by a lucky thread order. Built with
// g++ and run by tests/test_cuda_emulation.py, one mode per process:
//   ok        double-buffered cp.async tile sums, barriers, shuffles, dynamic shared memory: prints
//             "ok" three times and exits 0
//   deadlock  one thread returns early, the others wait at __syncthreads: the emulator aborts
//   war       the same kernel without the barrier before a buffer is refilled: wrong sums
//   raw       the same kernel reading a tile before waiting for its copies: wrong sums
//   shuffle   a lane reads a neighbour's shared-memory slot without __syncwarp: wrong values
// Built with -fsanitize=address (the emulator's memcheck, VITFAST_EMU_ASAN=1 in run_cases.py):
//   smem_overflow    a thread stores one float past the end of the launch's dynamic shared memory
//   global_overflow  a thread loads one float past the end of a global buffer
// each of which AddressSanitizer must report (heap-buffer-overflow); the ok mode must run clean.
// A wrong result prints "wrong" and exits 1.
#define VITFAST_CUDA_EMULATION
#include <cstdio>
#include <cstring>
#include <vector>

#include "common/cp_async.cuh"
#include "common/cuda_compat.cuh"

using namespace vitfast;

constexpr int kThreads = 64, kTile = 64, kTiles = 8;  // floats per tile = threads (one 4-byte copy each)

enum Bug { kNone, kWar, kRaw };

// Each block sums kTiles tiles of kTile floats, streamed through two shared buffers; thread t
// accumulates element (t + 1) % kTile of every tile, i.e. a value another thread copied in.
template <int kBug>
__global__ void tile_sums(const float* in, float* out) {
  __shared__ __align__(16) float buf[2][kTile];
  const int t = threadIdx.x;
  const float* src = in + blockIdx.x * kTiles * kTile;
  cp_async_4(&buf[0][t], src + t, true);
  cp_async_commit();
  float acc = 0.0f;
  for (int s = 0; s < kTiles; ++s) {
    if (s + 1 < kTiles) {
      cp_async_4(&buf[(s + 1) & 1][t], src + (s + 1) * kTile + t, true);
      cp_async_commit();
      if (kBug != kRaw) cp_async_wait_prior<1>();
    } else if (kBug != kRaw) {
      cp_async_wait_all();
    }
    __syncthreads();
    acc += buf[s & 1][(t + 1) % kTile];
    if (kBug != kWar) __syncthreads();  // buffer s & 1 is refilled by the issue of step s + 1
  }
  cp_async_wait_all();
  out[blockIdx.x * kThreads + t] = acc;
}

__global__ void early_exit(float*) {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

template <bool kSync>
__global__ void neighbours(float* out) {
  __shared__ float slot[kThreads];
  const int t = threadIdx.x;
  slot[t] = static_cast<float>(t);
  if (kSync) __syncwarp();
  const float mine = slot[(t & ~31) + ((t + 1) & 31)];  // lane + 1 of the same warp
  out[t] = mine + __shfl_xor_sync(0xffffffffu, mine, 1);
}

// thread t stores slot t + kOff of the launch's dynamic shared memory (kOff = 1 with kThreads
// slots: the last thread one past the end), then reads its own slot back
template <int kOff>
__global__ void smem_store(float* out) {
  VF_DYNAMIC_SMEM(raw);
  float* slots = reinterpret_cast<float*>(raw);
  slots[threadIdx.x + kOff] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = slots[threadIdx.x];
}

__global__ void shifted_copy(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

static int check_smem(bool overflow) {
  std::vector<float> out(kThreads);
  const size_t bytes = (overflow ? kThreads : kThreads + 1) * sizeof(float);  // the slots the threads store
  VF_LAUNCH(smem_store<1>, dim3(2), dim3(kThreads), bytes, nullptr, out.data());
  for (int t = 1; t < kThreads; ++t)
    if (out[t] != static_cast<float>(t - 1)) return std::puts("wrong"), 1;
  return std::puts("ok"), 0;
}

static int check_global_overflow() {
  std::vector<float> in(kThreads, 1.0f), out(kThreads);  // thread kThreads - 1 reads in[kThreads]
  VF_LAUNCH(shifted_copy, dim3(1), dim3(kThreads), 0, nullptr, in.data(), out.data());
  return std::puts("ok"), 0;
}

static int check_tiles(int bug) {
  const int blocks = 16;
  std::vector<float> in(blocks * kTiles * kTile), out(blocks * kThreads);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 97) + 0.25f * static_cast<float>(i / 97);
  for (int rep = 0; rep < 4; ++rep) {
    if (bug == kNone) VF_LAUNCH(tile_sums<kNone>, dim3(blocks), dim3(kThreads), 0, nullptr, in.data(), out.data());
    if (bug == kWar) VF_LAUNCH(tile_sums<kWar>, dim3(blocks), dim3(kThreads), 0, nullptr, in.data(), out.data());
    if (bug == kRaw) VF_LAUNCH(tile_sums<kRaw>, dim3(blocks), dim3(kThreads), 0, nullptr, in.data(), out.data());
    for (int b = 0; b < blocks; ++b)
      for (int t = 0; t < kThreads; ++t) {
        float want = 0.0f;
        for (int s = 0; s < kTiles; ++s) want += in[(b * kTiles + s) * kTile + (t + 1) % kTile];
        if (out[b * kThreads + t] != want) return std::puts("wrong"), 1;
      }
  }
  return std::puts("ok"), 0;
}

static int check_neighbours(bool sync) {
  std::vector<float> out(kThreads);
  for (int rep = 0; rep < 4; ++rep) {
    if (sync) VF_LAUNCH(neighbours<true>, dim3(1), dim3(kThreads), 0, nullptr, out.data());
    else VF_LAUNCH(neighbours<false>, dim3(1), dim3(kThreads), 0, nullptr, out.data());
    for (int t = 0; t < kThreads; ++t) {
      const int w = t & ~31, l = t & 31;
      const float want = static_cast<float>(w + ((l + 1) & 31) + w + (((l ^ 1) + 1) & 31));
      if (out[t] != want) return std::puts("wrong"), 1;
    }
  }
  return std::puts("ok"), 0;
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "ok";
  if (!std::strcmp(mode, "ok")) return check_tiles(kNone) | check_neighbours(true) | check_smem(false);
  if (!std::strcmp(mode, "smem_overflow")) return check_smem(true);
  if (!std::strcmp(mode, "global_overflow")) return check_global_overflow();
  if (!std::strcmp(mode, "war")) return check_tiles(kWar);
  if (!std::strcmp(mode, "raw")) return check_tiles(kRaw);
  if (!std::strcmp(mode, "shuffle")) return check_neighbours(false);
  if (!std::strcmp(mode, "deadlock")) {
    std::vector<float> out(1);
    VF_LAUNCH(early_exit, dim3(2), dim3(kThreads), 0, nullptr, out.data());
    return std::puts("no deadlock reported"), 0;
  }
  std::fprintf(stderr, "unknown mode %s\n", mode);
  return 2;
}
