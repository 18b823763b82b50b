// head_mix_attention's backward kernels for __nv_bfloat16 (one dtype per unit: see head_mix_entry.h).
#define VF_HM_T __nv_bfloat16
#define VF_HM_NAME bf16
#define VF_HM_STREAM_BWD 1
#include "head_mix_dtype.cuh"
