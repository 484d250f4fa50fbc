// reparameterize: the torch glue. Checks what the kernels assume, allocates,
// fills the params struct and launches the CPU or CUDA kernel.
#include "reparameterize/reparameterize.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/torch_utils.h"
#include "reparameterize/reparameterize_glue.h"

#ifdef VAE_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace vae_ext {
namespace {

void check_forward_inputs(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
                          int64_t num_samples) {
  TORCH_CHECK(mu.sizes() == logvar.sizes(), "reparameterize: logvar must have the shape of mu ", mu.sizes(),
              ", got ", logvar.sizes());
  TORCH_CHECK(mu.scalar_type() == logvar.scalar_type(), "reparameterize: logvar dtype ", logvar.scalar_type(),
              " differs from mu dtype ", mu.scalar_type());
  TORCH_CHECK(mu.device() == logvar.device(), "reparameterize: mu and logvar are on different devices");
  TORCH_CHECK(num_samples >= 1, "reparameterize: num_samples must be >= 1, got ", num_samples);
  if (eps.has_value()) {
    std::vector<int64_t> shape{num_samples};
    shape.insert(shape.end(), mu.sizes().begin(), mu.sizes().end());
    TORCH_CHECK(eps->sizes() == at::IntArrayRef(shape), "reparameterize: eps must have shape ", at::IntArrayRef(shape),
                ", got ", eps->sizes());
    TORCH_CHECK(eps->scalar_type() == mu.scalar_type(), "reparameterize: eps dtype must match mu");
    TORCH_CHECK(eps->device() == mu.device(), "reparameterize: eps must be on the device of mu");
  }
}

at::Tensor reparameterize_impl(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
                               int64_t num_samples, std::optional<int64_t> seed,
                               const std::optional<at::Generator>& generator) {
  check_forward_inputs(mu, logvar, eps, num_samples);
  const at::Tensor mu_c = mu.contiguous();
  const at::Tensor logvar_c = logvar.contiguous();
  const at::Tensor eps_c = eps.has_value() ? eps->contiguous() : at::Tensor();
  std::vector<int64_t> shape{num_samples};
  shape.insert(shape.end(), mu.sizes().begin(), mu.sizes().end());
  at::Tensor out = at::empty(shape, mu.options());

  ReparameterizeParams p = make_reparameterize_params(out, mu_c, logvar_c, eps_c);
  if (mu.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(mu.device());
    if (!eps_c.defined()) p.philox = philox_state_cuda(seed, generator, 4);
    reparameterize_forward_cuda(p, at::cuda::getCurrentCUDAStream());
#endif
  } else {
    if (!eps_c.defined()) p.philox = philox_state_cpu(seed, generator);
    VAE_EXT_CPU_DISPATCH(reparameterize_forward_cpu, p);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward_impl(const at::Tensor& grad_z, const at::Tensor& z,
                                                                const at::Tensor& mu) {
  TORCH_CHECK(grad_z.sizes() == z.sizes(), "reparameterize_backward: grad_z must have the shape of z");
  TORCH_CHECK(z.dim() == mu.dim() + 1 && z.sizes().slice(1) == mu.sizes(),
              "reparameterize_backward: z must have shape (num_samples, *mu.shape)");
  TORCH_CHECK(grad_z.scalar_type() == mu.scalar_type() && z.scalar_type() == mu.scalar_type(),
              "reparameterize_backward: dtypes differ");
  const at::Tensor grad_c = grad_z.contiguous();
  const at::Tensor z_c = z.contiguous();
  const at::Tensor mu_c = mu.contiguous();
  at::Tensor grad_mu = at::empty_like(mu_c);
  at::Tensor grad_logvar = at::empty_like(mu_c);

  const ReparameterizeBackwardParams p = make_reparameterize_backward_params(grad_mu, grad_logvar, grad_c, z_c, mu_c);
  if (mu.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(mu.device());
    reparameterize_backward_cuda(p, at::cuda::getCurrentCUDAStream());
#endif
  } else {
    VAE_EXT_CPU_DISPATCH(reparameterize_backward_cpu, p);
  }
  return {grad_mu, grad_logvar};
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
