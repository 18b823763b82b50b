// head_mix_attention's backward kernels for __half (one dtype per unit: see head_mix_entry.h).
#define VF_HM_T __half
#define VF_HM_NAME f16
#define VF_HM_STREAM_BWD 1
#include "head_mix_dtype.cuh"
