// Test binding: vitfast's CUDA kernels compiled as C++ against the CPU emulator
// (csrc/common/cuda_emulation.h, -DVITFAST_CUDA_EMULATION), each driven through the op's own
// argument glue (*_op.cpp built with -DVITFAST_NO_REGISTRATION). CPU tensors stand in for device
// memory. Built and run by tests/cuda_emulation/run_cases.py.
#include <torch/extension.h>

void register_window_attention(pybind11::module_& m);
void register_head_mix_attention(pybind11::module_& m);
void register_topk_softmax(pybind11::module_& m);
void register_soft_target_ce(pybind11::module_& m);
void register_covariance(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_window_attention(m);
  register_head_mix_attention(m);
  register_topk_softmax(m);
  register_soft_target_ce(m);
  register_covariance(m);
}
