// reparameterize: the torch glue. reparameterize_glue.h checks what the kernels
// assume, allocates the output and fills the params struct (the same code fills
// them for the emulated CUDA kernel of tests/cuda_emu/reparameterize_ops.cpp);
// here the CPU or CUDA kernel is launched.
#include "reparameterize/reparameterize.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/torch_utils.h"
#include "reparameterize/reparameterize_glue.h"

#ifdef VAE_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace vae_ext {
namespace {

using glue::AtenMemory;

at::Tensor reparameterize_impl(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
                               int64_t num_samples, std::optional<int64_t> seed,
                               const std::optional<at::Generator>& generator) {
  reparameterize_glue::ForwardCall call =
      reparameterize_glue::prepare_forward(mu, logvar, eps, num_samples, AtenMemory(mu.device()));
  ReparameterizeParams& p = call.params;
  if (mu.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(mu.device());
    if (p.eps == nullptr) p.philox = philox_state_cuda(seed, generator, 4);
    reparameterize_forward_cuda(p, at::cuda::getCurrentCUDAStream());
#else
    TORCH_CHECK(false, "reparameterize: this build has no CUDA kernels");
#endif
  } else {
    if (p.eps == nullptr) p.philox = philox_state_cpu(seed, generator);
    VAE_EXT_CPU_DISPATCH(reparameterize_forward_cpu, p);
  }
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward_impl(const at::Tensor& grad_z, const at::Tensor& z,
                                                                const at::Tensor& mu) {
  const reparameterize_glue::BackwardCall call =
      reparameterize_glue::prepare_backward(grad_z, z, mu, AtenMemory(mu.device()));
  if (mu.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(mu.device());
    reparameterize_backward_cuda(call.params, at::cuda::getCurrentCUDAStream());
#else
    TORCH_CHECK(false, "reparameterize_backward: this build has no CUDA kernels");
#endif
  } else {
    VAE_EXT_CPU_DISPATCH(reparameterize_backward_cpu, call.params);
  }
  return {call.grad_mu, call.grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) {
  m.impl("reparameterize", &reparameterize_impl);
  m.impl("reparameterize_backward", &reparameterize_backward_impl);
}

#ifdef VAE_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("reparameterize", &reparameterize_impl);
  m.impl("reparameterize_backward", &reparameterize_backward_impl);
}
#endif

}  // namespace vae_ext
