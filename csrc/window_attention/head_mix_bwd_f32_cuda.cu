// head_mix_attention's backward kernels for float (one dtype per unit: see head_mix_entry.h).
#define VF_HM_T float
#define VF_HM_NAME f32
#include "head_mix_dtype.cuh"
