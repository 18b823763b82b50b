// Glue shared by the CPU and CUDA registrations of the sparse soft-target cross-entropy ops.
#pragma once

#include <ATen/ATen.h>

#include "soft_target_ce.h"

namespace vitfast {

struct SoftTargetCECall {
  at::Tensor logits, values, indices;  // as the kernels take them
  at::Tensor loss, lse;                // forward outputs
  at::Tensor grad_loss, grad_logits;   // backward
  SoftTargetCEParams params{};
};

SoftTargetCECall prepare_soft_target_ce_forward(const at::Tensor& logits, const at::Tensor& values,
                                                const at::Tensor& indices, int64_t num_classes);

SoftTargetCECall prepare_soft_target_ce_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                 const at::Tensor& values, const at::Tensor& indices,
                                                 const at::Tensor& lse);

}  // namespace vitfast
