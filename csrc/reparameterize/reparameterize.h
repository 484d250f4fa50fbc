// reparameterize: the parameter structs the CPU and CUDA kernels take, and the
// kernels' entry points. Only reparameterize.cpp knows about at::Tensor.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "common/philox.h"

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace vae_ext {

// out[k, i] = mu[i] + eps[k, i] * exp(0.5 * logvar[i]) for k < num_samples, i < n.
// All tensors contiguous and of `dtype`. eps == nullptr: eps[k, i] is the
// Philox normal of flat element k * n + i (layout in common/philox.h).
struct ReparameterizeParams {
  void* out;
  const void* mu;
  const void* logvar;
  const void* eps;
  int64_t n;
  int64_t num_samples;
  DType dtype;
  PhiloxState philox;
};

// grad_mu[i] = sum_k grad_z[k, i];
// grad_logvar[i] = 0.5 * sum_k grad_z[k, i] * (z[k, i] - mu[i]).
struct ReparameterizeBackwardParams {
  void* grad_mu;
  void* grad_logvar;
  const void* grad_z;
  const void* z;
  const void* mu;
  int64_t n;
  int64_t num_samples;
  DType dtype;
};

VAE_EXT_DECLARE_CPU_KERNEL(void reparameterize_forward_cpu(const ReparameterizeParams& p))
VAE_EXT_DECLARE_CPU_KERNEL(void reparameterize_backward_cpu(const ReparameterizeBackwardParams& p))

#ifdef VAE_EXT_WITH_CUDA
void reparameterize_forward_cuda(const ReparameterizeParams& p, CUstream_st* stream);
void reparameterize_backward_cuda(const ReparameterizeBackwardParams& p, CUstream_st* stream);
#endif

}  // namespace vae_ext
