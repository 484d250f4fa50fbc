// elbo_loss: the torch glue. elbo_glue.h checks what the kernels assume,
// allocates the outputs and the gradient buffers that were asked for and fills
// the params struct (the same code fills them for the emulated CUDA kernels of
// tests/cuda_emu/elbo_ops.cpp); here the CPU or CUDA kernel is launched.
#include "elbo/elbo.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <string_view>

#include "elbo/elbo_glue.h"

#ifdef VAE_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace vae_ext {
namespace {

using glue::AtenMemory;

elbo_glue::ForwardResult elbo_forward_impl(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                           const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                                           const std::optional<at::Tensor>& prior_logvar,
                                           const std::optional<at::Tensor>& obs_logvar,
                                           c10::string_view likelihood, c10::string_view reduction, double beta,
                                           double free_bits, int64_t ignore_index, std::array<bool, 6> needs_grad) {
  const AtenMemory mem(recon.device());
  elbo_glue::ForwardCall call = elbo_glue::prepare_forward(
      recon, target, mu, logvar, prior_mu, prior_logvar, obs_logvar,
      std::string_view(likelihood.data(), likelihood.size()), std::string_view(reduction.data(), reduction.size()),
      beta, free_bits, ignore_index, needs_grad, mem);
  if (recon.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(recon.device());
    const at::Tensor workspace = elbo_glue::attach_cuda_workspace(call.params, mem);
    elbo_forward_cuda(call.params, at::cuda::getCurrentCUDAStream());
#else
    TORCH_CHECK(false, "elbo_forward: this build has no CUDA kernels");
#endif
  } else {
    VAE_EXT_CPU_DISPATCH(elbo_forward_cpu, call.params);
  }
  return elbo_glue::finish_forward(call);
}

at::Tensor elbo_scale_grad_impl(const at::Tensor& grad, const at::Tensor& scale) {
  const elbo_glue::ScaleCall call = elbo_glue::prepare_scale_grad(grad, scale, AtenMemory(grad.device()));
  if (call.params.rows == 0) return call.out;
  if (grad.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(grad.device());
    elbo_scale_grad_cuda(call.params, at::cuda::getCurrentCUDAStream());
#endif
  } else {
    VAE_EXT_CPU_DISPATCH(elbo_scale_grad_cpu, call.params);
  }
  return call.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) {
  m.impl("elbo_forward", &elbo_forward_impl);
  m.impl("elbo_scale_grad", &elbo_scale_grad_impl);
}

#ifdef VAE_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("elbo_forward", &elbo_forward_impl);
  m.impl("elbo_scale_grad", &elbo_scale_grad_impl);
}
#endif

}  // namespace vae_ext
