// CUDA headers, kernel launch and dynamic shared memory, spelled so that the same kernel source
// also compiles as C++ against the CPU emulator (cuda_emulation.h, -DVITFAST_CUDA_EMULATION),
// which is how CI runs the CUDA kernels' logic on machines without a GPU.
#pragma once

#ifdef VITFAST_CUDA_EMULATION
#include "cuda_emulation.h"
#define VF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::vitfast::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define VF_DYNAMIC_SMEM(name) unsigned char* name = ::vitfast::emu::dynamic_smem()
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
// `kernel` must be a single token (a function or a function pointer variable)
#define VF_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define VF_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
