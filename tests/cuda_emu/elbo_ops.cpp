// Glue of csrc/elbo/elbo_cuda.cu: the elbo_loss CUDA entry points, run under the
// CPU emulation, as vae_ext_emu ops on CPU tensors, with the schemas of
// vae_ext::elbo_forward / elbo_scale_grad (plus where to misalign the inputs).
//
// The params are filled by the extension's own glue code (csrc/elbo/elbo_glue.h:
// checks, contiguous copies, the stride-0 prior rows, obs_logvar strides, output
// and gradient buffers, grad_factor, the workspace); only the allocator differs:
// here every tensor the kernels touch is in guarded, 0xFF-poisoned emulated device
// memory. The inputs are copied there with their strides (an expanded prior stays
// a stride-0 broadcast, a non-contiguous view is made contiguous by the glue, as
// on a GPU), each `misalign[i]` bytes past a 16-byte boundary.
#include <array>
#include <string_view>
#include <vector>

#include "elbo/elbo.h"
#include "elbo/elbo_glue.h"
#include "emu_glue.h"

namespace vae_ext::emu_glue::elbo {
namespace {

int64_t misalign_of(const std::vector<int64_t>& misalign, size_t i) {
  return i < misalign.size() ? misalign[i] : 0;
}

std::optional<at::Tensor> to_device_opt(const std::optional<at::Tensor>& t, int64_t misalign) {
  if (!t.has_value()) return std::nullopt;
  return to_device_strided(*t, misalign);
}

// elbo_forward_cuda on device copies of the inputs. misalign: bytes past a 16-byte boundary for recon,
// target, mu, logvar, prior_mu, prior_logvar, obs_logvar (missing entries: 0).
elbo_glue::ForwardResult elbo_forward(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                      const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                                      const std::optional<at::Tensor>& prior_logvar,
                                      const std::optional<at::Tensor>& obs_logvar, c10::string_view likelihood,
                                      c10::string_view reduction, double beta, double free_bits, int64_t ignore_index,
                                      std::array<bool, 6> needs_grad, std::vector<int64_t> misalign) {
  const at::Tensor d_recon = to_device_strided(recon, misalign_of(misalign, 0));
  const at::Tensor d_target = to_device_strided(target, misalign_of(misalign, 1));
  const at::Tensor d_mu = to_device_strided(mu, misalign_of(misalign, 2));
  const at::Tensor d_logvar = to_device_strided(logvar, misalign_of(misalign, 3));
  const std::optional<at::Tensor> d_prior_mu = to_device_opt(prior_mu, misalign_of(misalign, 4));
  const std::optional<at::Tensor> d_prior_logvar = to_device_opt(prior_logvar, misalign_of(misalign, 5));
  const std::optional<at::Tensor> d_obs = to_device_opt(obs_logvar, misalign_of(misalign, 6));
  const DeviceMemory mem;
  elbo_glue::ForwardCall call = elbo_glue::prepare_forward(
      d_recon, d_target, d_mu, d_logvar, d_prior_mu, d_prior_logvar, d_obs,
      std::string_view(likelihood.data(), likelihood.size()), std::string_view(reduction.data(), reduction.size()),
      beta, free_bits, ignore_index, needs_grad, mem);
  const at::Tensor workspace = elbo_glue::attach_cuda_workspace(call.params, mem);
  elbo_forward_cuda(call.params, /*stream=*/nullptr);
  return elbo_glue::finish_forward(call);
}

// elbo_scale_grad_cuda on device copies of grad (misaligned by `misalign` bytes) and scale.
at::Tensor elbo_scale_grad(const at::Tensor& grad, const at::Tensor& scale, int64_t misalign) {
  const at::Tensor d_grad = to_device_strided(grad, misalign);
  const at::Tensor d_scale = to_device_strided(scale, 0);
  const elbo_glue::ScaleCall call = elbo_glue::prepare_scale_grad(d_grad, d_scale, DeviceMemory());
  if (call.params.rows == 0) return call.out;
  elbo_scale_grad_cuda(call.params, /*stream=*/nullptr);
  return call.out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vae_ext_emu, m) {
  m.def(
      "elbo_forward(Tensor recon, Tensor target, Tensor mu, Tensor logvar, Tensor? prior_mu, "
      "Tensor? prior_logvar, Tensor? obs_logvar, str likelihood, str reduction, float beta, float free_bits, "
      "int ignore_index, bool[6] needs_grad, int[] misalign=[]) -> (Tensor loss, Tensor recon_loss, Tensor kl, "
      "Tensor grad_recon, Tensor grad_mu, Tensor grad_logvar, Tensor grad_prior_mu, Tensor grad_prior_logvar, "
      "Tensor grad_obs_logvar)",
      &elbo_forward);
  m.def("elbo_scale_grad(Tensor grad, Tensor scale, int misalign=0) -> Tensor", &elbo_scale_grad);
}

}  // namespace vae_ext::emu_glue::elbo
