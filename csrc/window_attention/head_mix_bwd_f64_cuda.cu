// head_mix_attention's backward kernels for double (one dtype per unit: see head_mix_entry.h).
#define VF_HM_T double
#define VF_HM_NAME f64
#include "head_mix_dtype.cuh"
