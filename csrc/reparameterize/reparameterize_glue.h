// reparameterize: the torch half of the glue, shared by the extension
// (reparameterize.cpp) and the emulated CUDA tests (tests/cuda_emu/reparameterize_ops.cpp),
// as attention_glue.h and elbo_glue.h are for the other ops. It checks what the
// kernels assume, makes the inputs contiguous, allocates the outputs through the
// caller's Memory (common/glue_memory.h) and fills the params. ATen only; the
// caller sets the Philox state and launches the kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "common/glue_memory.h"
#include "common/torch_utils.h"
#include "reparameterize/reparameterize.h"

namespace vae_ext::reparameterize_glue {

using glue::Memory;

// One reparameterize call: the params and the tensors they point into.
struct ForwardCall {
  ReparameterizeParams params{};
  at::Tensor mu, logvar, eps;  // what the kernel reads (eps undefined: drawn in the kernel)
  at::Tensor out;              // (num_samples, *mu.shape)
};

inline ForwardCall prepare_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                   const std::optional<at::Tensor>& eps, int64_t num_samples, const Memory& mem) {
  TORCH_CHECK(mu.sizes() == logvar.sizes(), "reparameterize: logvar must have the shape of mu ", mu.sizes(),
              ", got ", logvar.sizes());
  TORCH_CHECK(mu.scalar_type() == logvar.scalar_type(), "reparameterize: logvar dtype ", logvar.scalar_type(),
              " differs from mu dtype ", mu.scalar_type());
  TORCH_CHECK(mu.device() == logvar.device(), "reparameterize: mu and logvar are on different devices");
  TORCH_CHECK(num_samples >= 1, "reparameterize: num_samples must be >= 1, got ", num_samples);
  std::vector<int64_t> shape{num_samples};
  shape.insert(shape.end(), mu.sizes().begin(), mu.sizes().end());
  if (eps.has_value()) {
    TORCH_CHECK(eps->sizes() == at::IntArrayRef(shape), "reparameterize: eps must have shape ", at::IntArrayRef(shape),
                ", got ", eps->sizes());
    TORCH_CHECK(eps->scalar_type() == mu.scalar_type(), "reparameterize: eps dtype must match mu");
    TORCH_CHECK(eps->device() == mu.device(), "reparameterize: eps must be on the device of mu");
  }
  ForwardCall c;
  c.mu = mem.contiguous(mu);
  c.logvar = mem.contiguous(logvar);
  if (eps.has_value()) c.eps = mem.contiguous(*eps);
  c.out = mem.empty(shape, mu.scalar_type());
  ReparameterizeParams& p = c.params;
  p.out = c.out.data_ptr();
  p.mu = c.mu.const_data_ptr();
  p.logvar = c.logvar.const_data_ptr();
  p.eps = c.eps.defined() ? c.eps.const_data_ptr() : nullptr;
  p.n = mu.numel();
  p.num_samples = num_samples;
  p.dtype = to_dtype(mu.scalar_type(), "reparameterize");
  return c;
}

// One reparameterize_backward call.
struct BackwardCall {
  ReparameterizeBackwardParams params{};
  at::Tensor grad_z, z, mu;         // what the kernel reads
  at::Tensor grad_mu, grad_logvar;  // of mu's shape
};

inline BackwardCall prepare_backward(const at::Tensor& grad_z, const at::Tensor& z, const at::Tensor& mu,
                                     const Memory& mem) {
  TORCH_CHECK(grad_z.sizes() == z.sizes(), "reparameterize_backward: grad_z must have the shape of z");
  TORCH_CHECK(z.dim() == mu.dim() + 1 && z.sizes().slice(1) == mu.sizes(),
              "reparameterize_backward: z must have shape (num_samples, *mu.shape)");
  TORCH_CHECK(grad_z.scalar_type() == mu.scalar_type() && z.scalar_type() == mu.scalar_type(),
              "reparameterize_backward: dtypes differ");
  TORCH_CHECK(grad_z.device() == mu.device() && z.device() == mu.device(),
              "reparameterize_backward: grad_z, z and mu must be on one device");
  BackwardCall c;
  c.grad_z = mem.contiguous(grad_z);
  c.z = mem.contiguous(z);
  c.mu = mem.contiguous(mu);
  c.grad_mu = mem.empty(mu.sizes(), mu.scalar_type());
  c.grad_logvar = mem.empty(mu.sizes(), mu.scalar_type());
  ReparameterizeBackwardParams& p = c.params;
  p.grad_mu = c.grad_mu.data_ptr();
  p.grad_logvar = c.grad_logvar.data_ptr();
  p.grad_z = c.grad_z.const_data_ptr();
  p.z = c.z.const_data_ptr();
  p.mu = c.mu.const_data_ptr();
  p.n = mu.numel();
  p.num_samples = z.size(0);
  p.dtype = to_dtype(mu.scalar_type(), "reparameterize_backward");
  return c;
}

}  // namespace vae_ext::reparameterize_glue
