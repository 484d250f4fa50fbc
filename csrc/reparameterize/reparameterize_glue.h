// reparameterize: filling the params structs from tensors, shared by the torch glue
// (reparameterize.cpp) and the emulated CUDA tests (tests/cuda_emu/reparameterize_ops.cpp), as
// attention_glue.h and elbo_glue.h do for the other ops. ATen only; the tensors are contiguous and
// already on the kernel's device; the caller allocates the outputs and sets the Philox state.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/torch_utils.h"
#include "reparameterize/reparameterize.h"

namespace vae_ext {

// out (num_samples, *mu.shape); eps undefined: drawn in the kernel.
inline ReparameterizeParams make_reparameterize_params(const at::Tensor& out, const at::Tensor& mu,
                                                       const at::Tensor& logvar, const at::Tensor& eps) {
  ReparameterizeParams p{};
  p.out = out.data_ptr();
  p.mu = mu.const_data_ptr();
  p.logvar = logvar.const_data_ptr();
  p.eps = eps.defined() ? eps.const_data_ptr() : nullptr;
  p.n = mu.numel();
  p.num_samples = out.size(0);
  p.dtype = to_dtype(mu.scalar_type(), "reparameterize");
  return p;
}

inline ReparameterizeBackwardParams make_reparameterize_backward_params(const at::Tensor& grad_mu,
                                                                        const at::Tensor& grad_logvar,
                                                                        const at::Tensor& grad_z, const at::Tensor& z,
                                                                        const at::Tensor& mu) {
  ReparameterizeBackwardParams p{};
  p.grad_mu = grad_mu.data_ptr();
  p.grad_logvar = grad_logvar.data_ptr();
  p.grad_z = grad_z.const_data_ptr();
  p.z = z.const_data_ptr();
  p.mu = mu.const_data_ptr();
  p.n = mu.numel();
  p.num_samples = z.size(0);
  p.dtype = to_dtype(mu.scalar_type(), "reparameterize_backward");
  return p;
}

}  // namespace vae_ext
